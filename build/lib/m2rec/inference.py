"""Top-k recommendations from a trained model folder: what the registry, the service and the CLI share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from m2rec.data.errors import DataError
from m2rec.model.factory import load_model, read_model_config
from m2rec.model.files import ITEMS_FILE
from m2rec.training.batching import pad_right


@dataclass
class Recommendation:
    """One ranked list: original item ids, titles, scores and (M2Rec) the gate weights behind it."""

    item_ids: list[str]
    titles: list[str]
    scores: list[float]
    gates: dict[str, float] | None = None
    strategy: str = "model"  # "model", or "popularity" for users without history


class Recommender:
    """Loads a model folder once and ranks all items for batches of histories (item indices)."""

    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        model_dir = Path(model_dir)
        self.config = read_model_config(model_dir)
        self.model = load_model(model_dir, device)
        self.device = torch.device(device)
        items = pd.read_parquet(model_dir / ITEMS_FILE).sort_values("item_idx")
        self.item_ids = np.array([""] + items["item_id"].astype(str).tolist(), dtype=object)  # index = item_idx
        title = items["title"] if "title" in items.columns else items["text"]
        self.titles = np.array([""] + title.astype(str).tolist(), dtype=object)
        self.index_of = {item_id: idx for idx, item_id in enumerate(self.item_ids) if idx > 0}
        counts = items["train_count"].to_numpy() if "train_count" in items.columns else np.zeros(len(items))
        self.popular_order = np.argsort(-counts, kind="stable") + 1  # item_idx by popularity
        with torch.no_grad():  # fixed once loaded: computed once here, not for every batch
            self.item_matrix = self.model.item_representations().detach()  # (I+1, H)

    @property
    def num_items(self) -> int:
        return len(self.item_ids) - 1

    def to_indices(self, item_ids: Sequence[str], field: str = "item_ids") -> list[int]:
        """Original item ids -> item indices; unknown ids raise a DataError naming them."""
        unknown = [i for i in item_ids if str(i) not in self.index_of]
        if unknown:
            raise DataError(f"{field} has {len(unknown)} unknown item id(s): {unknown[:5]}",
                            "send ids of items in the model's catalog")
        return [self.index_of[str(i)] for i in item_ids]

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.num_items:
            raise DataError(f"k={k} is out of range", f"use 1 <= k <= {self.num_items} (the catalog size)")

    @torch.no_grad()
    def recommend(self, histories: Sequence[Sequence[int]], k: int = 10, exclude_seen: bool = True
                  ) -> list[Recommendation]:
        """Top-k for each history of item indices (oldest first); empty histories get popular items."""
        self._check_k(k)
        results: list[Recommendation | None] = [None] * len(histories)
        rows = [i for i, h in enumerate(histories) if len(h) > 0]
        if rows:
            items, lengths = pad_right([np.asarray(histories[i]) for i in rows], self.model.max_length)
            items, lengths = items.to(self.device), lengths.to(self.device)
            hidden, gates = self.model.encode_with_gates(items, lengths)  # (B, 1, H), (B, 1, n_branches) or None
            hidden, gates = hidden.squeeze(1), None if gates is None else gates.squeeze(1)
            scores = (hidden @ self.item_matrix.t()).float()  # (B, I+1): self.model.scores(hidden), cached
            scores[:, 0] = -torch.inf
            if exclude_seen:
                for row, i in enumerate(rows):
                    scores[row, torch.as_tensor(list(histories[i]), dtype=torch.long)] = -torch.inf
            top_scores, top_items = scores.topk(k, dim=1)
            for row, i in enumerate(rows):
                idx = top_items[row].cpu().numpy()
                gate = None if gates is None else {
                    name: round(float(w), 4) for name, w in zip(self.model.branch_names, gates[row].tolist())}
                results[i] = Recommendation(self.item_ids[idx].tolist(), self.titles[idx].tolist(),
                                            top_scores[row].cpu().tolist(), gate)
        for i, history in enumerate(histories):
            if results[i] is None:
                results[i] = self.popular(k, exclude=history if exclude_seen else ())
        return results  # type: ignore[return-value]

    def popular(self, k: int = 10, exclude: Sequence[int] = ()) -> Recommendation:
        """The k most popular training items (the fallback for users without history)."""
        self._check_k(k)
        excluded = set(exclude)
        chosen = [i for i in self.popular_order if i not in excluded][:k]
        return Recommendation(self.item_ids[chosen].tolist(), self.titles[chosen].tolist(),
                              [float(k - r) / k for r in range(len(chosen))], None, strategy="popularity")
