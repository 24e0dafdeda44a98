"""What the model worker does, free of BentoML so it can be tested without a server: load a model version and the
feature build it was trained with, derive users' sequences (the build's snapshot plus the events logged since),
rank batches of queries and record events. With `recurrent` (M2Rec, Mamba4Rec), a user is ranked from a recurrent
state that each accepted event advances by one step (`m2rec.serving.recurrent`): a lookup and one scoring instead
of re-encoding the sequence."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path
from functools import partial
from typing import Callable

import torch

from m2rec.data.errors import DataError
from m2rec.events.log import Event, EventConflict, EventLog, EventParams
from m2rec.inference import Recommendation, Recommender
from m2rec.model.base import RecurrentRecommender
from m2rec.serving.items import ItemAdded, ItemResult, ServedCatalog, failure_of
from m2rec.serving.schemas import (EventIn, EventResponse, EventsResponse, EventsResult, Failure, RankQuery,
                                   RankResult, RecommendedItem, RecommendResponse)
from m2rec.serving.state_store import StatePrecision, StoredState

log = logging.getLogger(__name__)
BAD_REQUEST, CONFLICT, UNAVAILABLE = 400, 409, 503
MIN_BUCKET_LENGTH = 16  # histories this short are cheap: no need to split them further
FEATURE_REPO_FIX = ("set M2REC_FEATURE_ROOT (or `m2rec package --feature-root`) to the folder of the feature builds "
                    "`m2rec features build` wrote for the model's dataset; /recommend_by_history works without one")


def open_feature_client(repo: str | Path | None, dataset_version: str | None):
    """(FeatureClient, None) for a usable repository, else (None, why not)."""
    if not repo:
        return None, "no feature repository is configured"
    from m2rec.features.store import FeatureClient

    try:
        client = FeatureClient(repo)
    except Exception as err:  # a missing build, a broken registry, an unreachable online store: all mean "none"
        return None, f"feature repository {repo} cannot be opened ({err})"
    if client.build.get("dataset_version") != dataset_version:
        return None, (f"feature repository {repo} was built from dataset {client.build.get('dataset_version')}, "
                      f"but the model was trained on {dataset_version}")
    return client, None


def length_buckets(rows: list[int], histories: dict[int, list[int]], max_length: int, ratio: float = 1.5
                   ) -> list[list[int]]:
    """Split `rows` into runs of similar history length (the longest at most `ratio` times the shortest, or
    short anyway): a batch is padded to its longest history and the model's cost grows with the padded size."""
    length = {i: max(1, min(len(histories[i]), max_length)) for i in rows}
    buckets: list[list[int]] = []
    for i in sorted(rows, key=length.__getitem__):
        if buckets and length[i] <= max(ratio * length[buckets[-1][0]], MIN_BUCKET_LENGTH):
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


def _by_options(queries: list[RankQuery], rows: dict[int, object]) -> dict[tuple[int, bool], list[int]]:
    """`rows` grouped by (k, exclude_seen): one model call each."""
    groups: dict[tuple[int, bool], list[int]] = defaultdict(list)
    for i in rows:
        groups[(queries[i].k, queries[i].exclude_seen)].append(i)
    return groups


class Ranker:
    """One model version and its feature build: top-k lists for users (sequences from the build and the event
    log, or their recurrent states) and for item histories, one batch at a time, and events recorded through the
    log."""

    def __init__(self, model_dir: str | Path, feature_repo: str | Path | None = None, model_version: str = "",
                 events: EventLog | None = None, event_params: EventParams | None = None, recurrent: bool = True,
                 state_precision: StatePrecision = "float32"):
        from m2rec.features.live import LiveSequences

        self.recommender = Recommender(model_dir)
        self.model_version = model_version or self.recommender.config["model_type"]
        self.event_params = event_params or EventParams()
        dataset_version = self.recommender.config.get("dataset_version")
        self.features, self.features_problem = open_feature_client(feature_repo, dataset_version)
        self.sequences = None if self.features is None else LiveSequences(self.features, events)
        if self.features is None:
            log.warning("user recommendations and events are off: %s", self.features_problem)
        elif events is None:
            log.warning("no event log is configured (M2REC_EVENTS_URL): users are ranked from the feature build "
                        "%s alone, and /events answers 503", feature_repo)
        else:
            log.info("reading user sequences from the feature build %s and the event log %s", feature_repo, events)
        self.states = None
        if (recurrent and self.sequences is not None and self.sequences.events is not None  # states follow the log
                and isinstance(self.recommender.model, RecurrentRecommender)):
            self.states = self._open_states(state_precision)
        log.info("model %s loaded from %s: %d items, dataset %s", self.model_version, model_dir,
                 self.recommender.num_items, dataset_version)
        self.catalog = None if events is None else ServedCatalog(self.recommender, events, self.features)
        if self.catalog is not None:
            self.catalog.sync()  # items added while an earlier version served
        self._warm_up()

    def _open_states(self, precision: StatePrecision):
        """Recurrent states of this version in the store beside the feature build."""
        from m2rec.errors import ConfigError
        from m2rec.serving.recurrent import UserStates
        from m2rec.serving.state_store import open_state_store

        if precision not in ("float32", "float16"):
            raise ConfigError(f"serving.state_precision={precision!r} is not a state precision",
                              "set serving.state_precision (or M2REC_STATE_PRECISION) to float32 or float16")
        store = open_state_store(self.features.repo_dir, self.features.store.config.online_store)
        scope = f"{self.model_version}@{self.features.repo_dir.name}"  # never another version's or build's states
        log.info("serving users from recurrent states (%s) in %s", precision, type(store).__name__)
        return UserStates(self.recommender.model, self.sequences, store, scope, getattr(torch, precision))

    def _warm_up(self) -> None:
        """One lookup and one ranking before the first request, so it does not pay for first-call setup."""
        started = time.perf_counter()
        self.rank([RankQuery(item_ids=self.recommender.popular(1).item_ids, k=1, exclude_seen=True)]
                  + ([RankQuery(user_id="", k=1, exclude_seen=True)] if self.features is not None else []))
        log.info("warm-up ranking took %.0f ms", (time.perf_counter() - started) * 1000)

    def _features_unavailable(self, field: str) -> Failure:
        return Failure(status=UNAVAILABLE, field=field,
                       message=f"user features are unavailable: {self.features_problem}. Fix: {FEATURE_REPO_FIX}")

    def _user_inputs(self, queries: list[RankQuery], failures: dict[int, Failure]
                     ) -> tuple[dict[int, list[int]], dict[int, StoredState]]:
        """Histories, or (recurrent) states, of the user queries: one lookup for the whole batch. A user without a
        state has no history."""
        rows = [i for i, query in enumerate(queries) if query.user_id is not None]
        if not rows:
            return {}, {}
        if self.features is None:
            failures.update({i: self._features_unavailable("user_id") for i in rows})
            return {}, {}
        users = [queries[i].user_id for i in rows]
        try:
            if self.states is not None:
                states = self.states.current(users)
                return ({i: [] for i, user in zip(rows, users) if user not in states},
                        {i: states[user] for i, user in zip(rows, users) if user in states})
            sequences = self.sequences.histories(users)
        except Exception as err:  # the online store went away: refuse these queries, keep serving the others
            log.exception("online feature lookup failed")
            failures.update({i: Failure(status=UNAVAILABLE, field="user_id",
                                        message=f"the feature store lookup failed ({err}). Fix: check the online "
                                                "store, then retry") for i in rows})
            return {}, {}
        return {i: sequence or [] for i, sequence in zip(rows, sequences)}, {}

    def rank(self, queries: list[RankQuery]) -> list[RankResult]:
        """One result per query, in order: a ranked list, or a failure naming the field at fault."""
        failures: dict[int, Failure] = {}
        histories, states = self._user_inputs(queries, failures)
        for i, query in enumerate(queries):
            if query.item_ids is not None:
                try:
                    histories[i] = self.recommender.to_indices(query.item_ids, field="item_ids")
                except DataError as err:
                    failures[i] = Failure(status=BAD_REQUEST, field="item_ids", message=str(err))
        results: dict[int, RankResult] = {i: RankResult(failure=failure) for i, failure in failures.items()}
        for (k, exclude_seen), rows in _by_options(queries, histories).items():
            for bucket in length_buckets(rows, histories, self.recommender.model.max_length):
                self._answer(queries, bucket, results, partial(
                    self._rank_histories, [histories[i] for i in bucket], k, exclude_seen))
        for (k, exclude_seen), rows in _by_options(queries, states).items():
            self._answer(queries, rows, results, partial(self._rank_states, [states[i] for i in rows], k,
                                                         exclude_seen))
        return [results[i] for i in range(len(queries))]

    def _answer(self, queries: list[RankQuery], rows: list[int], results: dict[int, RankResult],
                rank: Callable[[], tuple[list[Recommendation], list[int]]]) -> None:
        """Results of `rows` from one model call `rank` (ranked lists and history lengths)."""
        try:
            ranked, lengths = rank()
        except DataError as err:  # k out of range: the same for the whole group
            results.update({i: RankResult(failure=Failure(status=BAD_REQUEST, field="k", message=str(err)))
                            for i in rows})
            return
        for i, recommendation, length in zip(rows, ranked, lengths):
            results[i] = RankResult(response=self._response(queries[i], length, recommendation))

    def _rank_histories(self, histories: list[list[int]], k: int, exclude_seen: bool
                        ) -> tuple[list[Recommendation], list[int]]:
        """Histories re-encoded, and their lengths."""
        return self.recommender.recommend(histories, k, exclude_seen), [len(h) for h in histories]

    @torch.no_grad()
    def _rank_states(self, states: list[StoredState], k: int, exclude_seen: bool
                     ) -> tuple[list[Recommendation], list[int]]:
        """Top-k from stored states, and each user's sequence length as the feature build counts it."""
        hidden = torch.cat([s.state["hidden"] for s in states])  # (B, H)
        gates = torch.cat([s.state["gates"] for s in states]) if "gates" in states[0].state else None  # (B, n)
        windows = [s.state["window"][0] for s in states]  # (max_length,) each, 0 where empty
        ranked = self.recommender.rank_hidden(hidden, gates, [w[w > 0].tolist() for w in windows], k, exclude_seen)
        limit = self.features.max_sequence_length
        return ranked, [min(int(s.state["length"][0]), limit) for s in states]

    def _response(self, query: RankQuery, history_length: int, recommendation: Recommendation) -> RecommendResponse:
        items = [RecommendedItem(item_id=i, title=t, score=s)
                 for i, t, s in zip(recommendation.item_ids, recommendation.titles, recommendation.scores)]
        return RecommendResponse(user_id=query.user_id, strategy=recommendation.strategy, items=items,
                                 gates=recommendation.gates, history_length=history_length,
                                 model_version=self.model_version)

    def _check_event(self, event: EventIn, now: datetime, field: str) -> tuple[Event | None, Failure | None]:
        """The event to log, or why not: its item must be in the catalog, its time within the accepted window."""
        try:
            self.recommender.to_indices([event.item_id], field=f"{field}item_id")
        except DataError as err:
            return None, Failure(status=BAD_REQUEST, field=f"{field}item_id", message=str(err))
        when = event.timestamp or now
        when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)  # a time without zone is UTC
        earliest = now - timedelta(seconds=self.event_params.late_window_s)
        latest = now + timedelta(seconds=self.event_params.future_skew_s)
        if not earliest <= when <= latest:
            return None, Failure(status=BAD_REQUEST, field=f"{field}timestamp", message=(
                f"event time {when.isoformat()} is outside the accepted window {earliest.isoformat()} .. "
                f"{latest.isoformat()}. Fix: send events within events.late_window_s "
                f"({self.event_params.late_window_s:.0f} s) of now, never in the future; older history belongs in "
                "the training source"))
        return Event(event.user_id, event.item_id, when, event.event_id), None

    def record_events(self, events: list[EventIn], batch: bool = False) -> EventsResult:
        """Record `events` (all or none): durable in the event log and applied once before this returns."""
        if self.sequences is None:
            return EventsResult(failure=self._features_unavailable("user_id"))
        if self.sequences.events is None:
            return EventsResult(failure=Failure(status=UNAVAILABLE, field="user_id", message=(
                "events are off: no event log is configured. Fix: set M2REC_EVENTS_URL (or `m2rec package "
                "--events-url`) to the event log retraining reads")))
        now = datetime.now(timezone.utc)
        checked = []
        for position, event in enumerate(events):
            logged, failure = self._check_event(event, now, f"events[{position}]." if batch else "")
            if failure is not None:
                return EventsResult(failure=failure)
            checked.append(logged)
        try:
            appended, lengths = self.sequences.record(checked, None if self.states is None else self.states.advance)
        except EventConflict as err:
            return EventsResult(failure=Failure(status=CONFLICT, field="event_id", message=str(err)))
        for result in appended:
            log.info("event %s: user %s item %s at %s (seq %d)%s", result.event.event_id, result.event.user_id,
                     result.event.item_id, result.event.timestamp, result.event.seq,
                     " again: a retry, nothing changed" if result.duplicate else "")
        return EventsResult(response=EventsResponse(events=[EventResponse(
            user_id=r.event.user_id, item_id=r.event.item_id, timestamp=r.event.timestamp, event_id=r.event.event_id,
            seq=r.event.seq, duplicate=r.duplicate, sequence_length=lengths[r.event.user_id],
            model_version=self.model_version) for r in appended]))

    def add_item(self, item_id: str, text: str, title: str | None = None) -> ItemResult:
        """Add a new item by its text (durable in the event log, then in the served catalog), or say why not."""
        if self.catalog is None:
            return ItemResult(failure=Failure(status=UNAVAILABLE, field="item_id", message=(
                "adding items is off: no event log is configured to keep them. Fix: set M2REC_EVENTS_URL")))
        try:
            item = self.catalog.add(item_id, text, title)
        except DataError as err:
            return ItemResult(failure=failure_of(err))
        log.info("item %s added (seq %d): %d items", item.item_id, item.seq, self.recommender.num_items)
        return ItemResult(response=ItemAdded(item_id=item.item_id, title=item.title, seq=item.seq,
                                             item_count=self.recommender.num_items, model_version=self.model_version))
