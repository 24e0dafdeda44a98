"""Top-k recommendations from a trained model folder: what the registry, the service and the CLI share."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from m2rec.data.errors import DataError
from m2rec.model.cold_start import TextToId
from m2rec.model.factory import load_model, read_model_config
from m2rec.model.files import ITEMS_FILE
from m2rec.training.batching import pad_right

log = logging.getLogger(__name__)
CATALOG_SYNC_INTERVAL_S = 1.0  # how stale a worker's view of items added elsewhere may get


class TextUnsupported(DataError):
    """The model has no text branch, so an item cannot be placed by its text."""

    http_status = 409


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
        # training occurrences per item_idx, for placing added items (a catalog without counts: every item once)
        self.train_counts = torch.as_tensor(np.concatenate([[0], counts if counts.any() else np.ones(len(items))]))
        self._text_to_id: TextToId | None = None  # fitted on the trained items at the first add_items
        with torch.no_grad():  # fixed once loaded: computed once here, not for every batch
            self.item_matrix = self.model.item_representations().detach()  # (I+1, H)
        # Set by a server whose catalog grows while it serves (m2rec.serving.items): brings in items added
        # elsewhere; called when an unknown item id arrives, and before ranking at most every interval.
        self.sync_catalog: Callable[[], object] | None = None
        self._synced_at = -float("inf")

    @property
    def text_model(self) -> str | None:
        """The text encoder the model was trained with; None for a model without a text branch."""
        has_text = isinstance(getattr(self.model, "item_text", None), torch.Tensor)
        return self.config.get("text_model") if has_text else None

    def require_text_branch(self) -> None:
        """Raise `TextUnsupported` unless the model can place items by their text."""
        if self.text_model is None:
            raise TextUnsupported(f"model {self.config['model_type']} has no text branch (use_text false), so text "
                                  "cannot place a new item", "serve an M2Rec model with use_text true, or add the "
                                  "item to the source and retrain")

    def add_items(self, item_ids: Sequence[str], text_embeddings: np.ndarray, titles: Sequence[str]) -> list[int]:
        """Add items the model was not trained on, placed by their text: the next item indices, the text
        embedding (N, T) from the model's encoder and the ID embedding that text predicts (`TextToId`, fitted once
        on the trained items), so a new item competes with trained ones on the same terms; returns their item
        indices. Raises `TextUnsupported` for a model without a text branch."""
        self.require_text_branch()
        known = [i for i in item_ids if i in self.index_of]
        if known or len(set(item_ids)) != len(item_ids):
            raise DataError(f"item_id {(known or list(item_ids))[:5]} already in the catalog", "add new ids once")
        model, count = self.model, len(item_ids)
        weight, item_text = model.item_embedding.weight, getattr(model, "item_text")  # (I+1, H), (I+1, T)
        text = torch.as_tensor(text_embeddings, dtype=item_text.dtype, device=self.device)  # (N, T)
        with torch.no_grad():
            if self._text_to_id is None:
                self._text_to_id = TextToId.fit(weight[1:], item_text[1:], self.train_counts[1:].to(self.device))
            placed = self._text_to_id(text).to(weight.dtype)  # (N, H)
            model.item_embedding.weight = torch.nn.Parameter(torch.cat([weight, placed]))
            model.item_embedding.num_embeddings += count
            model.item_text = torch.cat([item_text, text])  # (I+N+1, T)
            model.num_items += count
            self.item_matrix = model.item_representations().detach()  # (I+N+1, H)
        first = len(self.item_ids)
        self.item_ids = np.concatenate([self.item_ids, np.array(list(item_ids), dtype=object)])
        self.titles = np.concatenate([self.titles, np.array(list(titles), dtype=object)])
        self.index_of.update({item_id: first + i for i, item_id in enumerate(item_ids)})
        self.popular_order = np.concatenate([self.popular_order, np.arange(first, first + count)])  # no count yet
        return list(range(first, first + count))

    def _sync(self, now: bool) -> None:
        """Bring in items added elsewhere: `now`, or if the last look is older than the interval."""
        if self.sync_catalog is None or not (now or time.monotonic() - self._synced_at >= CATALOG_SYNC_INTERVAL_S):
            return
        self._synced_at = time.monotonic()
        try:
            self.sync_catalog()
        except Exception:  # the items table is unreachable: rank with the catalog as it is, retry next interval
            log.exception("catalog sync failed; serving %d items as they are", self.num_items)

    @property
    def num_items(self) -> int:
        return len(self.item_ids) - 1

    def to_indices(self, item_ids: Sequence[str], field: str = "item_ids") -> list[int]:
        """Original item ids -> item indices; unknown ids raise a DataError naming them."""
        unknown = [i for i in item_ids if str(i) not in self.index_of]
        if unknown:  # perhaps added by another worker a moment ago
            self._sync(now=True)
            unknown = [i for i in unknown if str(i) not in self.index_of]
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
        self._sync(now=False)
        self._check_k(k)
        results: list[Recommendation | None] = [None] * len(histories)
        rows = [i for i, h in enumerate(histories) if len(h) > 0]
        if rows:
            items, lengths = pad_right([np.asarray(histories[i]) for i in rows], self.model.max_length)
            items, lengths = items.to(self.device), lengths.to(self.device)
            hidden, gates = self.model.encode_with_gates(items, lengths)  # (B, 1, H), (B, 1, n_branches) or None
            ranked = self.rank_hidden(hidden.squeeze(1), None if gates is None else gates.squeeze(1),
                                      [histories[i] for i in rows], k, exclude_seen)
            for i, recommendation in zip(rows, ranked):
                results[i] = recommendation
        for i, history in enumerate(histories):
            if results[i] is None:
                results[i] = self.popular(k, exclude=history if exclude_seen else ())
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def rank_hidden(self, hidden: torch.Tensor, gates: torch.Tensor | None, seen: Sequence[Sequence[int]], k: int,
                    exclude_seen: bool) -> list[Recommendation]:
        """Top-k for last hidden states (B, H), with their gate weights (B, n_branches) or None; with
        `exclude_seen`, each row's `seen` item indices are left out. Encoding and recurrent serving share it."""
        self._check_k(k)
        scores = (hidden @ self.item_matrix.t()).float()  # (B, I+1): self.model.scores(hidden), cached
        scores[:, 0] = -torch.inf
        if exclude_seen:
            for row, items in enumerate(seen):
                scores[row, torch.as_tensor(list(items), dtype=torch.long)] = -torch.inf
        top_scores, top_items = scores.topk(k, dim=1)
        results = []
        for row in range(len(hidden)):
            idx = top_items[row].cpu().numpy()
            gate = None if gates is None else {
                name: round(float(w), 4) for name, w in zip(self.model.branch_names, gates[row].tolist())}
            results.append(Recommendation(self.item_ids[idx].tolist(), self.titles[idx].tolist(),
                                          top_scores[row].cpu().tolist(), gate))
        return results

    def popular(self, k: int = 10, exclude: Sequence[int] = ()) -> Recommendation:
        """The k most popular training items (the fallback for users without history)."""
        self._check_k(k)
        excluded = set(exclude)
        chosen = [i for i in self.popular_order if i not in excluded][:k]
        return Recommendation(self.item_ids[chosen].tolist(), self.titles[chosen].tolist(),
                              [float(k - r) / k for r in range(len(chosen))], None, strategy="popularity")
