"""What every sequential recommender here shares: item embeddings, scoring against all items, gathering."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


# A user's recurrent state, batched: name -> (B, ...) tensor. Every model's state holds "hidden" (B, H), the output
# after the last item (what is scored), "window" (B, max_length), the last items right-aligned (0: none; what a
# served user has seen), and "length" (B,), the number of items carried.
RecurrentState = dict[str, torch.Tensor]


def empty_window(batch: int, max_length: int, device: torch.device) -> RecurrentState:
    """"window" (B, max_length) and "length" (B,) of empty histories."""
    return {"window": torch.zeros(batch, max_length, dtype=torch.long, device=device),
            "length": torch.zeros(batch, dtype=torch.long, device=device)}


def window_of(items: torch.Tensor, max_length: int) -> RecurrentState:
    """"window" (1, max_length) and "length" (1,) after the history `items` (L,)."""
    state = empty_window(1, max_length, items.device)
    last = items[-max_length:]
    state["window"][0, max_length - len(last):] = last
    state["length"][0] = len(items)
    return state


def push_window(state: RecurrentState, items: torch.Tensor) -> None:
    """Append items (B,) to each row's "window" (dropping the oldest) and count them in "length", in place."""
    state["window"].copy_(torch.roll(state["window"], -1, dims=1))
    state["window"][:, -1] = items
    state["length"] += 1


def gather_last(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each row's last real position of right-padded states: (B, L, H), (B,) -> (B, 1, H)."""
    index = (lengths - 1).clamp_min(0).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
    return hidden.gather(1, index)


class SequentialRecommender(nn.Module):
    """Base class: `encode` maps right-padded item sequences (B, L) to hidden states (B, L, H); items are
    scored by a dot product with `item_representations()` (tied to the input embeddings)."""

    model_type = "base"
    branch_names: Sequence[str] = ()  # names of the gated branches (M2Rec); none for single-path models

    def __init__(self, num_items: int, hidden_size: int, max_length: int):
        super().__init__()
        self.num_items = num_items  # real items are 1..num_items; 0 is padding
        self.max_length = max_length
        self.item_embedding = nn.Embedding(num_items + 1, hidden_size, padding_idx=0)
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    def encode(self, items: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, L, H)
        raise NotImplementedError

    def item_representations(self) -> torch.Tensor:
        """(num_items + 1, H): what hidden states are scored against."""
        return self.item_embedding.weight

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., num_items + 1) logits over all items."""
        return hidden @ self.item_representations().t()

    def last_hidden(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Hidden state at each sequence's last real position: (B, L), (B,) -> (B, H). Models override this to
        skip position-wise work at positions whose output is not needed."""
        return gather_last(self.encode(items), lengths).squeeze(1)

    def encode_with_gates(self, items: torch.Tensor, lengths: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, L) -> hidden (B, L, H) and per-position branch weights (B, L, n_branches) over
        `self.branch_names`, or None for a model without branches; with `lengths`, only each row's last real
        position (B, 1, ...). What a recommendation is explained with."""
        if lengths is None:
            return self.encode(items), None
        return self.last_hidden(items, lengths).unsqueeze(1), None

    def forward(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Next-item logits after each sequence: (B, L), (B,) -> (B, num_items + 1)."""
        return self.scores(self.last_hidden(items, lengths))


class RecurrentRecommender(SequentialRecommender):
    """A model whose output after a history can be carried forward one item at a time (serving): `step` costs
    O(1) in the history's length, and `state_from_history` followed by steps equals `last_hidden` of the whole
    history (up to `max_length` items; past it, the state keeps the whole history, see the README)."""

    def init_state(self, batch: int) -> RecurrentState:
        """The state of `batch` empty histories."""
        raise NotImplementedError

    def step(self, items: torch.Tensor, state: RecurrentState
             ) -> tuple[torch.Tensor, torch.Tensor | None, RecurrentState]:
        """Carry `state` over one more item each: items (B,) -> hidden (B, H), gates (B, n_branches) or None, and
        the new state (tensors updated in place)."""
        raise NotImplementedError

    def state_from_history(self, items: torch.Tensor) -> RecurrentState:
        """The state after a whole history, in one pass: items (L,) oldest first, L >= 1 -> a state of batch 1."""
        raise NotImplementedError
