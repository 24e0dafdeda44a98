"""What the model worker does, free of BentoML so it can be tested without a server: load the model folder once,
read users' sequences from the Feast online store, rank batches of queries and push events."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

from m2rec.data.errors import DataError
from m2rec.inference import Recommendation, Recommender
from m2rec.serving.schemas import (EventResponse, EventResult, Failure, RankQuery, RankResult, RecommendedItem,
                                   RecommendResponse)

log = logging.getLogger(__name__)
BAD_REQUEST, UNAVAILABLE = 400, 503
MIN_BUCKET_LENGTH = 16  # histories this short are cheap: no need to split them further
FEATURE_REPO_FIX = ("set M2REC_FEATURE_REPO (or `m2rec package --feature-repo`) to a repository built by "
                    "`m2rec features build` from the model's dataset; /recommend_by_history works without one")


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


class Ranker:
    """Top-k lists for users (sequences from Feast) and for item histories, one batch at a time."""

    def __init__(self, model_dir: str | Path, feature_repo: str | Path | None = None, model_version: str = ""):
        self.recommender = Recommender(model_dir)
        self.model_version = model_version or self.recommender.config["model_type"]
        dataset_version = self.recommender.config.get("dataset_version")
        self.features, self.features_problem = open_feature_client(feature_repo, dataset_version)
        if self.features is None:
            log.warning("user recommendations and events are off: %s", self.features_problem)
        else:
            log.info("reading user sequences from the feature repository %s", feature_repo)
        log.info("model %s loaded from %s: %d items, dataset %s", self.model_version, model_dir,
                 self.recommender.num_items, dataset_version)
        self._warm_up()

    def _warm_up(self) -> None:
        """One lookup and one ranking before the first request, so it does not pay for first-call setup."""
        started = time.perf_counter()
        self.rank([RankQuery(item_ids=self.recommender.popular(1).item_ids, k=1, exclude_seen=True)]
                  + ([RankQuery(user_id="", k=1, exclude_seen=True)] if self.features is not None else []))
        log.info("warm-up ranking took %.0f ms", (time.perf_counter() - started) * 1000)

    def _features_unavailable(self, field: str) -> Failure:
        return Failure(status=UNAVAILABLE, field=field,
                       message=f"user features are unavailable: {self.features_problem}. Fix: {FEATURE_REPO_FIX}")

    def _user_histories(self, queries: list[RankQuery], failures: dict[int, Failure]) -> dict[int, list[int]]:
        """Histories of the user queries: one online-store lookup for the whole batch."""
        rows = [i for i, query in enumerate(queries) if query.user_id is not None]
        if not rows:
            return {}
        if self.features is None:
            failures.update({i: self._features_unavailable("user_id") for i in rows})
            return {}
        try:
            sequences = self.features.user_sequences([queries[i].user_id for i in rows])
        except Exception as err:  # the online store went away: refuse these queries, keep serving the others
            log.exception("online feature lookup failed")
            failures.update({i: Failure(status=UNAVAILABLE, field="user_id",
                                        message=f"the feature store lookup failed ({err}). Fix: check the online "
                                                "store, then retry") for i in rows})
            return {}
        return {i: sequence or [] for i, sequence in zip(rows, sequences)}

    def rank(self, queries: list[RankQuery]) -> list[RankResult]:
        """One result per query, in order: a ranked list, or a failure naming the field at fault."""
        failures: dict[int, Failure] = {}
        histories = self._user_histories(queries, failures)
        for i, query in enumerate(queries):
            if query.item_ids is not None:
                try:
                    histories[i] = self.recommender.to_indices(query.item_ids, field="item_ids")
                except DataError as err:
                    failures[i] = Failure(status=BAD_REQUEST, field="item_ids", message=str(err))
        groups: dict[tuple[int, bool], list[int]] = defaultdict(list)  # one model call per (k, exclude_seen)
        for i in histories:
            groups[(queries[i].k, queries[i].exclude_seen)].append(i)
        results: dict[int, RankResult] = {i: RankResult(failure=failure) for i, failure in failures.items()}
        calls = [(key, bucket) for key, rows in groups.items()
                 for bucket in length_buckets(rows, histories, self.recommender.model.max_length)]
        for (k, exclude_seen), rows in calls:
            try:
                ranked = self.recommender.recommend([histories[i] for i in rows], k, exclude_seen)
            except DataError as err:  # k out of range: the same for the whole group
                results.update({i: RankResult(failure=Failure(status=BAD_REQUEST, field="k", message=str(err)))
                                for i in rows})
                continue
            for i, recommendation in zip(rows, ranked):
                results[i] = RankResult(response=self._response(queries[i], histories[i], recommendation))
        return [results[i] for i in range(len(queries))]

    def _response(self, query: RankQuery, history: list[int], recommendation: Recommendation) -> RecommendResponse:
        items = [RecommendedItem(item_id=i, title=t, score=s)
                 for i, t, s in zip(recommendation.item_ids, recommendation.titles, recommendation.scores)]
        return RecommendResponse(user_id=query.user_id, strategy=recommendation.strategy, items=items,
                                 gates=recommendation.gates, history_length=len(history),
                                 model_version=self.model_version)

    def push_event(self, user_id: str, item_id: str, timestamp: datetime | None = None) -> EventResult:
        """Append an interaction to the user's online sequence, so the next ranking for the user includes it."""
        if self.features is None:
            return EventResult(failure=self._features_unavailable("user_id"))
        try:
            self.recommender.to_indices([item_id], field="item_id")
        except DataError as err:
            return EventResult(failure=Failure(status=BAD_REQUEST, field="item_id", message=str(err)))
        when = timestamp or datetime.now(timezone.utc)
        when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)  # a time without zone is UTC
        try:
            sequence = self.features.push_event(user_id, item_id, when)
        except DataError as err:  # the item is known, so what is left is an event older than the stored ones
            return EventResult(failure=Failure(status=BAD_REQUEST, field="timestamp", message=str(err)))
        log.info("event: user %s item %s at %s; sequence now %d items", user_id, item_id, when, len(sequence))
        return EventResult(response=EventResponse(user_id=user_id, item_id=item_id, timestamp=when,
                                                  sequence_length=len(sequence)))
