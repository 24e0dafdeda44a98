"""The registered MLflow model, logged "from code": a pyfunc over `m2rec.inference.Recommender`.

The weights travel as the artifact `model_dir` (safetensors + JSON + parquet), so loading never unpickles.
Input: a DataFrame with column `item_ids` (each row a user's history of original item ids, oldest first).
Params (defaults in the signature): `k`, `exclude_seen`. Output: one row per input row with `item_ids`, `titles`,
`scores`, `strategy` ("model", or "popularity" for an empty history) and `gates` (branch -> weight, or None).
This file is what MLflow runs to load the model; nothing else imports it.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext

from m2rec.registry.config import MODEL_DIR_ARTIFACT


class M2RecPyfunc(PythonModel):
    """Top-k recommendations for histories of item ids, from a trained m2rec model folder."""

    def load_context(self, context: PythonModelContext) -> None:
        from m2rec.inference import Recommender

        self.recommender = Recommender(context.artifacts[MODEL_DIR_ARTIFACT])

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict | None = None) -> pd.DataFrame:
        params = params or {}
        histories = [self.recommender.to_indices(list(ids)) for ids in model_input["item_ids"]]
        recommendations = self.recommender.recommend(histories, int(params["k"]), bool(params["exclude_seen"]))
        return pd.DataFrame({
            "item_ids": [r.item_ids for r in recommendations],
            "titles": [r.titles for r in recommendations],
            "scores": [r.scores for r in recommendations],
            "strategy": [r.strategy for r in recommendations],
            "gates": [r.gates for r in recommendations],
        })


mlflow.models.set_model(M2RecPyfunc())
