"""Items scored through their text: the ID embedding plus a linear projection of the frozen item-text embedding,
shared by M2Rec and the text-aware SASRec baseline, so both represent an item the same way."""

from __future__ import annotations

import torch
from torch import nn


class ScoredThroughText(nn.Module):
    """Mixin for a recommender with `item_embedding`: adds the frozen `item_text` buffer (I+1, T) and the
    `text_output` projection, and scores items against ID embedding + projected text. With `item_id_dropout`, a
    random share of items is represented by its text alone in each training step, so the projection learns to
    place an item that has no trained ID embedding."""

    item_embedding: nn.Embedding

    def _init_item_text(self, item_text_embeddings: torch.Tensor, hidden_size: int, item_id_dropout: float) -> None:
        self.register_buffer("item_text", item_text_embeddings.float().clone())  # (I+1, T), frozen
        self.text_output = nn.Linear(item_text_embeddings.shape[1], hidden_size, bias=False)
        nn.init.normal_(self.text_output.weight, std=0.02)
        self.item_id_dropout = item_id_dropout

    def projected_text(self, items: torch.Tensor) -> torch.Tensor:
        """(...) item ids -> (..., H) projected text; zero for padding."""
        return self.text_output(self.item_text[items]).masked_fill((items == 0).unsqueeze(-1), 0.0)

    def item_representations(self) -> torch.Tensor:
        """(I+1, H): ID embedding (dropped for a random share of items in training) plus projected text."""
        ids = self.item_embedding.weight  # (I+1, H)
        if self.training and self.item_id_dropout > 0:
            ids = ids * (torch.rand(len(ids), 1, device=ids.device) >= self.item_id_dropout)  # (I+1, H)
        return ids + self.projected_text(torch.arange(len(ids), device=ids.device))
