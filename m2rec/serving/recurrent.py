"""Users' recurrent states for one model version over one feature build's live sequences.

Guarantees:
- exact: a state is the model's `state_from_history` of the user's whole sequence (the build's snapshot and every
  event since, in time order), whether it was carried event by event or rebuilt, so the hidden state served equals
  a re-encoding of that sequence (for sequences up to max_length; past it the state keeps the whole history);
- applied once: an accepted event advances its user's state in the event's own transaction (user locked), and a
  retried event (a duplicate in the log) advances nothing;
- never stale: a state records the highest event seq it reflects; a reader serves it only if the log holds no
  later event of the user, and otherwise (or when it is missing: new version, evicted, first request, a late event
  that landed before the last one, an event recorded by another version) rebuilds it from the sequence.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Sequence

import torch

from m2rec.events.log import Appended, LoggedEvent, Tail
from m2rec.features.live import LiveSequences
from m2rec.model.base import RecurrentRecommender
from m2rec.serving.state_store import StateCodec, StateStore, StoredState

log = logging.getLogger(__name__)


class UserStates:
    """Read, advance and rebuild users' states in `store` under `scope` (the model version and feature build)."""

    def __init__(self, model: RecurrentRecommender, sequences: LiveSequences, store: StateStore, scope: str,
                 float_dtype: torch.dtype = torch.float32):
        self.model, self.sequences, self.store, self.scope = model, sequences, store, scope
        self.codec = StateCodec(model.init_state(1), float_dtype)

    def _load(self, users: Sequence[str]) -> dict[str, StoredState]:
        records = self.store.get_many(self.scope, users)
        decoded = {user: self.codec.decode(data) for user, data in records.items()}
        return {user: stored for user, stored in decoded.items() if stored is not None}

    def _save(self, states: dict[str, StoredState]) -> None:
        self.store.put_many(self.scope, {user: self.codec.encode(stored) for user, stored in states.items()})

    @torch.no_grad()
    def _rebuild(self, users: Sequence[str], tail: Tail | None = None) -> dict[str, StoredState]:
        """States from users' whole sequences (users without history get none)."""
        rebuilt = {}
        for user, (history, seq) in zip(users, self.sequences.whole_histories(users, tail)):
            if history:
                rebuilt[user] = StoredState(seq, self.model.state_from_history(torch.as_tensor(history)))
        return rebuilt

    def advance(self, appended: list[Appended], tail: Tail) -> None:
        """In the events' transaction: step each user's state over the user's new events when they come last in
        time order and the state reflects everything before them; rebuild it otherwise. Duplicates are skipped.
        A state store that fails does not refuse the events: the states it missed are rebuilt when next read."""
        try:
            self._advance(appended, tail)
        except Exception:  # noqa: BLE001 - a derived, verified cache never costs an event
            log.exception("recurrent states of %s not advanced; they are rebuilt when next read", self.scope)

    @torch.no_grad()
    def _advance(self, appended: list[Appended], tail: Tail) -> None:
        new: dict[str, set[int]] = defaultdict(set)
        for result in appended:
            if not result.duplicate:
                new[result.event.user_id].add(result.event.seq)
        if not new:
            return
        users = sorted(new)
        tails, stored = tail(users, self.sequences.after_seq), self._load(users)
        updated, stale = {}, []
        for user in users:
            carried = self._step_over(stored.get(user), tails.get(user, []), new[user])
            if carried is None:
                stale.append(user)
            else:
                updated[user] = carried
        updated.update(self._rebuild(stale, tail))
        self._save(updated)

    def _step_over(self, stored: StoredState | None, events: list[LoggedEvent], new: set[int]
                   ) -> StoredState | None:
        """`stored` carried over the `new` events (seqs) of a user's time-ordered tail `events`, or None when that
        would not be exact: no state, a state that misses earlier events, or a new event placed before an old."""
        before = max((e.seq for e in events if e.seq not in new), default=self.sequences.after_seq)
        last = events[len(events) - len(new):]
        if stored is None or stored.seq != before or {e.seq for e in last} != new:
            return None
        for item in self.sequences.items(last):
            self.model.step(torch.tensor([item]), stored.state)
        return StoredState(max(new), stored.state)

    def current(self, users: Sequence[str]) -> dict[str, StoredState]:
        """Each user's state as of every event the log holds (users without history are left out); stale or
        missing states are rebuilt and stored."""
        users = sorted(set(users))
        stored = self._load(users)
        by_seq: dict[int, list[str]] = defaultdict(list)
        for user, state in stored.items():
            by_seq[state.seq].append(user)
        for seq, group in by_seq.items():  # one indexed lookup per seq: users with later events are stale
            for user in self.sequences.events.tail(group, seq):
                del stored[user]
        missing = [user for user in users if user not in stored]
        if missing:
            rebuilt = self._rebuild(missing)
            self._save(rebuilt)
            stored.update(rebuilt)
        return stored
