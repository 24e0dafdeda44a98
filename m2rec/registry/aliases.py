"""Champion / challenger: a new version takes `champion` only when it beats the current champion's validation
metric on the same dataset version; otherwise it becomes `challenger` and the champion stays."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from m2rec.registry.config import CHALLENGER, CHAMPION, SELECTION_METRIC, metric_key

log = logging.getLogger(__name__)


@dataclass
class AliasDecision:
    alias: str  # CHAMPION or CHALLENGER: what the new version got
    champion_version: str  # the champion after the decision
    reason: str


def current_champion(client, model_name: str):
    """The model version holding the champion alias, or None."""
    version = client.get_registered_model(model_name).aliases.get(CHAMPION)
    return None if version is None else client.get_model_version(model_name, version)


def decide(version: str, dataset_version: str, score: float, champion_version: str | None,
           champion_dataset: str | None, champion_score: float | None) -> AliasDecision:
    """The alias rule, free of MLflow: strictly better on the same dataset version wins."""
    name = f"valid {SELECTION_METRIC}"
    if champion_version is None:
        return AliasDecision(CHAMPION, version, "first version with a validation score")
    if champion_dataset != dataset_version or champion_score is None:
        return AliasDecision(CHALLENGER, champion_version,
                             f"champion v{champion_version} was scored on dataset {champion_dataset}, this version "
                             f"on {dataset_version}: not comparable, the champion stays (move the alias by hand "
                             "after comparing them on one dataset)")
    if score > champion_score:
        return AliasDecision(CHAMPION, version, f"{name} {score:.4f} beats champion v{champion_version}'s "
                                                f"{champion_score:.4f} on dataset {dataset_version}")
    return AliasDecision(CHALLENGER, champion_version, f"{name} {score:.4f} does not beat champion "
                                                       f"v{champion_version}'s {champion_score:.4f}")


def assign_alias(client, model_name: str, version: str, dataset_version: str, score: float) -> AliasDecision:
    """Compare `version` with the current champion (its run's tags and metrics) and set one alias."""
    champion = current_champion(client, model_name)
    champion_dataset = champion_score = None
    if champion is not None and champion.run_id:
        run = client.get_run(champion.run_id)
        champion_dataset = run.data.tags.get("dataset_version")
        champion_score = run.data.metrics.get(f"valid_{metric_key(SELECTION_METRIC)}")
    decision = decide(version, dataset_version, score, str(champion.version) if champion else None,
                      champion_dataset, champion_score)
    client.set_registered_model_alias(model_name, decision.alias, version)
    log.info("%s v%s is %s: %s", model_name, version, decision.alias, decision.reason)
    return decision
