"""Users' sequences as serving sees them: a feature build's snapshot, then the events logged since its cutoff.

Nothing is read, changed and written back: a sequence is derived from the build (fixed) and the event log (append
only, transactional), so no update is lost across threads, workers or replicas, late events fall into time order,
and a new build picks up every event after its own cutoff. Each accepted event also refreshes the user's
`user_recent_items` row in the build's online store (what Feast users look up), inside the event's transaction
with the user locked, so a stale sequence never overwrites a newer one; in the same place, an `on_appended` hook
(the recurrent states of serving) sees the same results, a retried event marked as a duplicate.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from m2rec.events.log import Appended, Event, EventLog, LoggedEvent, Tail
from m2rec.features.store import FeatureClient

log = logging.getLogger(__name__)
PUBLISH_BATCH = 500  # users per online-store write when a whole build catches up
OnAppended = Callable[[list[Appended], Tail], None]  # runs in the events' transaction, their users locked


class LiveSequences:
    """Sequences of one feature build kept current by one event log."""

    def __init__(self, client: FeatureClient, events: EventLog | None):
        self.client, self.events = client, events  # without an event log: the build's snapshots, read only
        self.after_seq = client.events_through_seq  # the build saw every event up to here

    def items(self, events: Sequence[LoggedEvent]) -> list[int]:
        """The item_idx of each event; an item the build's catalog lacks (dropped by its k-core filter) cannot be
        ranked: left out."""
        index = self.client.item_index
        return [index[e.item_id] for e in events if e.item_id in index]

    def _merge(self, snapshots: list[list[int] | None], users: Sequence[str],
               tails: dict[str, list[LoggedEvent]], whole: bool = False) -> list[list[int]]:
        """Snapshot + logged items of each user, the last max_sequence_length of them (`whole`: all)."""
        start = 0 if whole else -self.client.max_sequence_length
        return [((snapshot or []) + self.items(tails.get(user, [])))[start:]
                for user, snapshot in zip(users, snapshots)]

    def whole_histories(self, user_ids: Sequence[str], tail: Tail | None = None) -> list[tuple[list[int], int]]:
        """Each user's snapshot and every event since, not cut to max_sequence_length, with the highest seq among
        those events (the build's cutoff when none)."""
        users = list(user_ids)
        tails = self._tails(users, tail)
        merged = self._merge(self.client.snapshot_sequences(users), users, tails, whole=True)
        return [(sequence, max((e.seq for e in tails.get(user, [])), default=self.after_seq))
                for user, sequence in zip(users, merged)]

    def histories(self, user_ids: Sequence[str], tail: Tail | None = None) -> list[list[int]]:
        """Each user's item_idx sequence, oldest first (empty for a user with no history)."""
        users = list(user_ids)
        return self._merge(self.client.snapshot_sequences(users), users, self._tails(users, tail))

    def _tails(self, users: list[str], tail: Tail | None) -> dict[str, list[LoggedEvent]]:
        """The users' events after the build's cutoff (through `tail` inside a transaction); none without a log."""
        read_tail = tail or (self.events.tail if self.events is not None else None)
        return read_tail(users, self.after_seq) if read_tail is not None else {}

    def record(self, events: Sequence[Event], on_appended: OnAppended | None = None
               ) -> tuple[list[Appended], dict[str, int]]:
        """Log `events` (durable and applied once) and refresh their users' online sequences before commit, then
        run `on_appended` there too; return what the log did with each event and each user's sequence length
        after them."""
        lengths: dict[str, int] = {}

        def before_commit(results: list[Appended], tail: Tail) -> None:
            tail = _read_once(tail)  # the mirror and the recurrent states read the same rows: one query
            lengths.update(self._publish(sorted({r.event.user_id for r in results}), tail))
            if on_appended is not None:
                on_appended(results, tail)

        appended = self.events.append(events, before_commit=before_commit)
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


def _read_once(tail: Tail) -> Tail:
    """`tail`, answering a repeated question (the same users and cutoff) from its first answer."""
    answers: dict[tuple[tuple[str, ...], int], dict[str, list[LoggedEvent]]] = {}

    def read(users: Sequence[str], after_seq: int) -> dict[str, list[LoggedEvent]]:
        key = (tuple(sorted(set(users))), after_seq)
        if key not in answers:
            answers[key] = tail(users, after_seq)
        return answers[key]

    return read
