"""SASRec with item text: the baseline that tells what the text gives any model from what M2Rec's branches add.

Items are represented as M2Rec scores them: the ID embedding plus a linear projection of the frozen item-text
embedding (with `item_id_dropout`, a share of items by its text alone in training), and the sequence is read with
the same representations (tied input and output, as in SASRec).
"""

from __future__ import annotations

import torch
from torch import nn

from m2rec.model.config import ModelParams
from m2rec.model.sasrec import SASRec


class SASRecText(SASRec):
    """SASRec over ID-plus-projected-text item representations."""

    model_type = "sasrec_text"

    def __init__(self, num_items: int, params: ModelParams, item_text_embeddings: torch.Tensor):
        if item_text_embeddings is None or item_text_embeddings.shape[0] != num_items + 1:
            raise ValueError("sasrec_text needs item_text_embeddings of shape (num_items + 1, text_dim)")
        super().__init__(num_items, params)
        self.item_id_dropout = params.item_id_dropout
        self.register_buffer("item_text", item_text_embeddings.float().clone())  # (I+1, T), frozen
        self.text_output = nn.Linear(item_text_embeddings.shape[1], params.hidden_size, bias=False)
        nn.init.normal_(self.text_output.weight, std=0.02)

    def _text(self, items: torch.Tensor) -> torch.Tensor:
        """(...) item ids -> (..., H) projected text; zero for padding."""
        return self.text_output(self.item_text[items]).masked_fill((items == 0).unsqueeze(-1), 0.0)

    def embed_items(self, items: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, L, H)
        return self.item_embedding(items) + self._text(items)

    def item_representations(self) -> torch.Tensor:
        """(I+1, H): ID embedding plus projected text; in training, with `item_id_dropout`, a random share of
        items is represented by its text alone."""
        ids = self.item_embedding.weight  # (I+1, H)
        if self.training and self.item_id_dropout > 0:
            ids = ids * (torch.rand(len(ids), 1, device=ids.device) >= self.item_id_dropout)  # (I+1, H)
        return ids + self._text(torch.arange(len(ids), device=ids.device))
