"""SASRec with item text: the baseline that tells what the text gives any model from what M2Rec's branches add.

Items are represented as M2Rec scores them: the ID embedding plus a linear projection of the frozen item-text
embedding (with `item_id_dropout`, a share of items by its text alone in training), and the sequence is read with
the same representations (tied input and output, as in SASRec).
"""

from __future__ import annotations

import torch

from m2rec.model.config import ModelParams
from m2rec.model.item_text import ScoredThroughText
from m2rec.model.sasrec import SASRec


class SASRecText(ScoredThroughText, SASRec):
    """SASRec over ID-plus-projected-text item representations."""

    model_type = "sasrec_text"

    def __init__(self, num_items: int, params: ModelParams, item_text_embeddings: torch.Tensor):
        if item_text_embeddings is None or item_text_embeddings.shape[0] != num_items + 1:
            raise ValueError("sasrec_text needs item_text_embeddings of shape (num_items + 1, text_dim)")
        super().__init__(num_items, params)
        self._init_item_text(item_text_embeddings, params.hidden_size, params.item_id_dropout)

    def embed_items(self, items: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, L, H)
        return self.item_embedding(items) + self.projected_text(items)
