"""Users' sequences as serving sees them: a feature build's snapshot, then the events logged since its cutoff.

Nothing is read, changed and written back: a sequence is derived from the build (fixed) and the event log (append
only, transactional), so no update is lost across threads, workers or replicas, late events fall into time order,
and a new build picks up every event after its own cutoff. Each accepted event also refreshes the user's
`user_recent_items` row in the build's online store (what Feast users look up), inside the event's transaction
with the user locked, so a stale sequence never overwrites a newer one.
"""

from __future__ import annotations

import logging
from typing import Sequence

from m2rec.events.log import Appended, Event, EventLog, LoggedEvent, Tail
from m2rec.features.store import FeatureClient

log = logging.getLogger(__name__)
PUBLISH_BATCH = 500  # users per online-store write when a whole build catches up


class LiveSequences:
    """Sequences of one feature build kept current by one event log."""

    def __init__(self, client: FeatureClient, events: EventLog | None):
        self.client, self.events = client, events  # without an event log: the build's snapshots, read only
        self.after_seq = client.events_through_seq  # the build saw every event up to here

    def _merge(self, snapshots: list[list[int] | None], users: Sequence[str],
               tails: dict[str, list[LoggedEvent]]) -> list[list[int]]:
        index, limit = self.client.item_index, self.client.max_sequence_length
        merged = []
        for user, snapshot in zip(users, snapshots):
            # an item the build's catalog lacks (dropped by its k-core filter) cannot be ranked: left out
            logged = [index[e.item_id] for e in tails.get(user, []) if e.item_id in index]
            merged.append(((snapshot or []) + logged)[-limit:])
        return merged

    def histories(self, user_ids: Sequence[str], tail: Tail | None = None) -> list[list[int]]:
        """Each user's item_idx sequence, oldest first (empty for a user with no history)."""
        users = list(user_ids)
        read_tail = tail or (self.events.tail if self.events is not None else None)
        tails = read_tail(users, self.after_seq) if read_tail is not None else {}
        return self._merge(self.client.snapshot_sequences(users), users, tails)

    def record(self, events: Sequence[Event]) -> tuple[list[Appended], dict[str, int]]:
        """Log `events` (durable and applied once) and refresh their users' online sequences before commit;
        return what the log did with each event and each user's sequence length after them."""
        lengths: dict[str, int] = {}
        appended = self.events.append(events, before_commit=lambda results, tail: lengths.update(self._publish(
            sorted({r.event.user_id for r in results}), tail)))
        return appended, lengths

    def _publish(self, users: list[str], tail: Tail) -> dict[str, int]:
        """Write `users`' current sequences to the online store; return each user's sequence length."""
        tails = tail(users, self.after_seq)
        sequences = self._merge(self.client.snapshot_sequences(users), users, tails)
        rows = {}
        for user, sequence in zip(users, sequences):
            if user in tails:  # the row's time: when its latest event arrived, so every write is newer (Redis)
                rows[user] = (sequence, max(e.received for e in tails[user]))
        self.client.write_current(rows)
        return {user: len(sequence) for user, sequence in zip(users, sequences)}

    def catch_up(self) -> int:
        """Refresh the online sequence of every user with events after the build's cutoff (a build about to serve
        did not see them); return how many users."""
        if self.events is None:
            return 0
        users = self.events.users_after(self.after_seq)
        for start in range(0, len(users), PUBLISH_BATCH):
            batch = users[start:start + PUBLISH_BATCH]
            self.events.with_users_locked(batch, lambda tail: self._publish(batch, tail))
        if users:
            log.info("carried %d users' events since seq %d over to build %s", len(users), self.after_seq,
                     self.client.repo_dir.name)
        return len(users)
