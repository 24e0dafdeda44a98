"""M2Rec online service (BentoML), thin over `m2rec.serving`.

Endpoints: `POST /recommend`, `POST /recommend_by_history`, `POST /events`, plus BentoML's `/healthz`, `/readyz`,
`/metrics` and the OpenAPI docs at `/` and `/docs.json`. Each worker loads the model once; concurrent requests
are ranked in adaptive batches (one feature-store lookup and one model call per batch) on one model thread, so
the event loop keeps parsing requests meanwhile. Batching happens in the serving process rather than through a
`batchable` dependency service: BentoML 1.4.40's inter-service client closes its session every 100 requests
with calls still in flight, which fail ("Cannot write to closing transport"; cf. bentoml/BentoML#5540), and one
process saves an HTTP hop and a serialization per request.

Configuration:
- the model: BentoML model `m2rec:latest` from the model store (`BENTOML_HOME`), or `--arg model_tag=NAME:VERSION`;
  `m2rec package` builds a Bento that pins the one it imported.
- the feature repository: `M2REC_FEATURE_REPO` (a folder built by `m2rec features build`), else the one
  `m2rec package --feature-repo` recorded with the model. Without one, /recommend and /events answer 503 with
  the reason; /recommend_by_history still works.
- workers (processes, each loading the model): `BENTOML_CONFIG_OPTIONS='services.m2rec_service.workers=2'`;
  one per core suits a CPU box. `M2REC_TORCH_THREADS` (default 1) sets each worker's model threads: more only
  help on idle cores. `M2REC_MAX_BATCH` (default 64) caps a batch.

Run from the repository root: `bentoml serve serving.service:M2RecService --port 3000`, or serve the packaged
Bento: `bentoml serve m2rec_service:latest`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import bentoml
from pydantic import BaseModel

from m2rec.serving.batching import AdaptiveBatcher
from m2rec.serving.http import BodySizeLimit, failure_response
from m2rec.serving.schemas import (EventResponse, EventTime, ExcludeSeen, History, ItemId, RankQuery,
                                   RecommendResponse, TopK, UserId)

logging.getLogger("m2rec").setLevel(logging.INFO)  # BentoML's server logging passes only warnings by default


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

        from m2rec.serving.core import Ranker

        torch.set_num_threads(int(os.environ.get("M2REC_TORCH_THREADS", 1)))  # per worker; see the docstring
        labels = self.model.info.labels  # written by `m2rec package`: the registry version behind this model
        version = (f"{labels['registered_model']} v{labels['registry_version']}" if "registry_version" in labels
                   else str(self.model.tag))
        repo = os.environ.get("M2REC_FEATURE_REPO") or self.model.info.metadata.get("feature_repo")
        self.ranker = Ranker(self.model.path, repo, version)
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="m2rec-model")
        self.rank = AdaptiveBatcher(self.ranker.rank, self.model_thread, int(os.environ.get("M2REC_MAX_BATCH", 64)),
                                    BATCH_SIZE.observe)

    async def _respond(self, query: RankQuery):
        result = await self.rank(query)
        return result.response if result.failure is None else failure_response(result.failure)

    @bentoml.api
    async def recommend(self, user_id: UserId, k: TopK = 10, exclude_seen: ExcludeSeen = True
                        ) -> RecommendResponse:
        """Top-k items for a user, from the user's recent items in the feature store; a user without history gets
        the most popular items (strategy `popularity`)."""
        return await self._respond(RankQuery(user_id=user_id, k=k, exclude_seen=exclude_seen))

    @bentoml.api
    async def recommend_by_history(self, item_ids: History, k: TopK = 10, exclude_seen: ExcludeSeen = True
                                   ) -> RecommendResponse:
        """Top-k items after the given history of item ids (oldest first)."""
        return await self._respond(RankQuery(item_ids=item_ids, k=k, exclude_seen=exclude_seen))

    @bentoml.api
    async def events(self, user_id: UserId, item_id: ItemId, timestamp: EventTime = None) -> EventResponse:
        """Record that a user interacted with an item: the user's next /recommend includes it."""
        result = await asyncio.get_running_loop().run_in_executor(
            self.model_thread, self.ranker.push_event, user_id, item_id, timestamp)
        return result.response if result.failure is None else failure_response(result.failure)


M2RecService.add_asgi_middleware(BodySizeLimit)
