"""M2Rec online service (BentoML), thin over `m2rec.serving`.

Endpoints: `POST /recommend`, `POST /recommend_by_history`, `POST /events` (one event), `POST /events_batch` (a list,
all or none), `POST /reload` (check the registry now; needs `Authorization: Bearer $M2REC_RELOAD_TOKEN`),
`POST /items` (a new item by its text; needs `Authorization: Bearer $M2REC_ITEMS_TOKEN`), plus BentoML's `/healthz`,
`/readyz` (JSON: the version serving, the follower's last error), `/metrics` and the OpenAPI docs at `/` and
`/docs.json`. Each worker loads the model once; concurrent requests are ranked in adaptive batches
(one feature lookup and one model call per batch) on one model thread, so the event loop keeps parsing requests
meanwhile. Batching happens in the serving process rather than through a `batchable` dependency service:
BentoML 1.4.40's inter-service client closes its session every 100 requests with calls still in flight, which fail
("Cannot write to closing transport"; cf. bentoml/BentoML#5540), and one process saves an HTTP hop per request.

What it serves: the packaged BentoML model at start, then whatever version the registry's `champion` alias names
(polled every `serving.poll_interval_s`; `/reload` has every worker check at once), each with the feature build it was trained
with. Events are recorded in the event log (durable and applied once before the reply) and reach the next
retraining. Configuration: what `m2rec package` recorded, overridden by MLFLOW_TRACKING_URI (or M2REC_TRACKING_URI),
M2REC_FEATURE_ROOT, M2REC_EVENTS_URL, M2REC_FOLLOW_ALIAS ("" pins the packaged version), M2REC_POLL_SECONDS,
M2REC_MODEL_CACHE, M2REC_FEATURE_REPO (a repository for the packaged version), M2REC_RECURRENT (1/0: rank users from
recurrent states, or re-encode), M2REC_STATE_PRECISION (float32/float16). Secrets (PGPASSWORD, M2REC_RELOAD_TOKEN,
M2REC_ITEMS_TOKEN, a Redis password) come from the environment only. Workers:
`BENTOML_CONFIG_OPTIONS='services.m2rec_service.workers=2'`; `M2REC_TORCH_THREADS` (default 1) model threads per
worker; `M2REC_MAX_BATCH` (default 64) caps a batch.

Run from the repository root: `bentoml serve serving.service:M2RecService --port 3000`, or serve the packaged
Bento: `bentoml serve m2rec_service:latest`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
from pydantic import BaseModel

from m2rec.serving.batching import AdaptiveBatcher
from m2rec.serving.http import BodySizeLimit, ReadinessDetails, failure_response, token_failure
from m2rec.serving.items import ItemText, ItemTitle
from m2rec.serving.schemas import (EventBatch, EventId, EventIn, EventResponse, EventsResponse, EventTime,
                                   ExcludeSeen, History, ItemId, RankQuery, RecommendResponse, TopK, UserId)

logging.getLogger("m2rec").setLevel(logging.INFO)  # BentoML's server logging passes only warnings by default
FOLLOWER = None  # this worker's ChampionFollower, once the service is up (read by /readyz)


class ServeArgs(BaseModel):
    """`--arg NAME=VALUE` of `bentoml build` (a built Bento keeps its build's values) or of `bentoml serve`."""

    model_tag: str = "m2rec:latest"  # `m2rec package` pins the tag it imported


ARGS = bentoml.use_arguments(ServeArgs)
BATCH_SIZE = bentoml.metrics.Histogram(name="m2rec_batch_size", documentation="Queries per model batch",
                                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))


@bentoml.service(name="m2rec_service", workers=1, traffic={"timeout": 30})
class M2RecService:
    """Top-k recommendations of the M2Rec model, explained by its gate weights."""

    model = bentoml.models.BentoModel(ARGS.model_tag)

    def __init__(self) -> None:
        import torch

        from m2rec.events.log import EventLog
        from m2rec.serving.core import Ranker
        from m2rec.serving.follower import ChampionFollower, ServiceSources

        global FOLLOWER
        torch.set_num_threads(int(os.environ.get("M2REC_TORCH_THREADS", 1)))  # per worker; see the docstring
        labels, metadata = self.model.info.labels, self.model.info.metadata
        home = Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml")
        sources = ServiceSources.resolve(metadata, os.environ, home)
        version = (f"{labels['registered_model']} v{labels['registry_version']}" if "registry_version" in labels
                   else str(self.model.tag))
        events = EventLog(sources.events_url) if sources.events_url else None
        repo = sources.feature_repo or sources.repo_for(sources.feature_build)
        initial = Ranker(self.model.path, repo, version, events, sources.event_params, sources.recurrent,
                         sources.state_precision)
        self.follower = FOLLOWER = ChampionFollower(initial, labels.get("registry_version"), sources, events)
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="m2rec-model")
        self.rank = AdaptiveBatcher(lambda queries: self.follower.current.rank(queries), self.model_thread,
                                    int(os.environ.get("M2REC_MAX_BATCH", 64)), BATCH_SIZE.observe)
        self.follower.check()  # the alias may have moved since packaging
        self.follower.start()

    async def _respond(self, query: RankQuery):
        result = await self.rank(query)
        return result.response if result.failure is None else failure_response(result.failure)

    async def _record(self, events: list[EventIn], batch: bool):
        result = await asyncio.get_running_loop().run_in_executor(
            self.model_thread, lambda: self.follower.current.record_events(events, batch))
        if result.failure is not None:
            return failure_response(result.failure)
        return result.response if batch else result.response.events[0]

    @bentoml.api
    async def recommend(self, user_id: UserId, k: TopK = 10, exclude_seen: ExcludeSeen = True
                        ) -> RecommendResponse:
        """Top-k items for a user, from the user's sequence (feature build + events since); a user without history
        gets the most popular items (strategy `popularity`)."""
        return await self._respond(RankQuery(user_id=user_id, k=k, exclude_seen=exclude_seen))

    @bentoml.api
    async def recommend_by_history(self, item_ids: History, k: TopK = 10, exclude_seen: ExcludeSeen = True
                                   ) -> RecommendResponse:
        """Top-k items after the given history of item ids (oldest first)."""
        return await self._respond(RankQuery(item_ids=item_ids, k=k, exclude_seen=exclude_seen))

    @bentoml.api
    async def events(self, user_id: UserId, item_id: ItemId, timestamp: EventTime = None,
                     event_id: EventId = None) -> EventResponse:
        """Record that a user interacted with an item: durable before the reply, applied once (retry with the same
        `event_id`), in the user's next /recommend and in the next retraining."""
        return await self._record([EventIn(user_id=user_id, item_id=item_id, timestamp=timestamp,
                                           event_id=event_id)], batch=False)

    @bentoml.api
    async def events_batch(self, events: EventBatch) -> EventsResponse:
        """Record several events in one request: all are stored, or none (the reply names the event at fault)."""
        return await self._record(events, batch=True)

    @bentoml.api
    async def reload(self, ctx: bentoml.Context) -> dict:
        """Ask the registry now where the followed alias points and move there: this worker at once, the service's
        other workers within a second, other replicas within their poll interval. Needs `Authorization: Bearer
        <M2REC_RELOAD_TOKEN>`."""
        failure = token_failure(ctx.request.headers, os.environ.get("M2REC_RELOAD_TOKEN"))
        if failure is not None:
            ctx.response.status_code = failure.status  # a dict endpoint: the status goes through the context
            return failure.body()
        return await asyncio.get_running_loop().run_in_executor(None, self.follower.request_reload)

    @bentoml.api
    async def items(self, ctx: bentoml.Context, item_id: ItemId, text: ItemText, title: ItemTitle = None
                    ) -> dict:
        """Add a new item by its text: placed by the model's text projection, recommendable at once (every worker
        within a second), kept in the event log for the next retraining. Needs `Authorization: Bearer
        <M2REC_ITEMS_TOKEN>`; a model without a text branch answers 409."""
        failure = token_failure(ctx.request.headers, os.environ.get("M2REC_ITEMS_TOKEN"), "M2REC_ITEMS_TOKEN",
                                "adding items")
        if failure is None:
            result = await asyncio.get_running_loop().run_in_executor(
                self.model_thread, lambda: self.follower.current.add_item(item_id, text, title))
            if result.failure is None:
                return result.response.model_dump()
            failure = result.failure
        ctx.response.status_code = failure.status  # a dict endpoint: the status goes through the context
        return failure.body()

    @bentoml.on_shutdown
    def _stop_following(self) -> None:
        self.follower.stop()


M2RecService.add_asgi_middleware(BodySizeLimit)
M2RecService.add_asgi_middleware(ReadinessDetails, status=lambda: FOLLOWER.status() if FOLLOWER else None)
