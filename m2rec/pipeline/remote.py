"""Send the compiled pipeline to a Kubeflow Pipelines endpoint, as one run or as a recurring run (scheduled
retraining), with the official `kfp.Client`."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from m2rec.errors import UsageError

log = logging.getLogger(__name__)


def connect(host: str | None, namespace: str | None = None):
    """A `kfp.Client` for `host` (default: $KF_PIPELINES_ENDPOINT)."""
    import kfp

    host = host or os.environ.get("KF_PIPELINES_ENDPOINT")
    if not host:
        raise UsageError("no Kubeflow Pipelines endpoint given",
                        "pass --host URL, set pipeline.host in params.yaml, or set KF_PIPELINES_ENDPOINT")
    with warnings.catch_warnings():  # "only works with Kubeflow Pipeline v2.0.0-beta.2 and later", on every call
        warnings.filterwarnings("ignore", category=FutureWarning, message="This client only works")
        return kfp.Client(host=host, namespace=namespace or "kubeflow")


def kfp_cron(expression: str) -> str:
    """KFP's cron has 6 fields (seconds first); a 5-field (Unix) expression gets second 0 prepended."""
    fields = expression.split()
    if len(fields) == 5:
        return " ".join(["0", *fields])
    if len(fields) == 6:
        return " ".join(fields)
    raise UsageError(f"--cron {expression!r} has {len(fields)} fields",
                    "give 5 fields (minute hour day month weekday, e.g. '0 3 * * *') or 6 with seconds first")


def submit_run(package_path: str, host: str | None, arguments: dict[str, Any] | None = None,
               experiment: str = "m2rec", run_name: str | None = None, namespace: str | None = None) -> dict:
    """Start one run of the compiled pipeline; return its ids and UI link."""
    client = connect(host, namespace)
    result = client.create_run_from_pipeline_package(package_path, arguments=arguments or {}, run_name=run_name,
                                                     experiment_name=experiment, namespace=namespace)
    return {"run_id": result.run_id, "url": f"{client._get_url_prefix()}/#/runs/details/{result.run_id}"}


def schedule_run(package_path: str, host: str | None, cron: str, arguments: dict[str, Any] | None = None,
                 experiment: str = "m2rec", name: str = "m2rec-retraining", namespace: str | None = None,
                 max_concurrency: int = 1, catchup: bool = False, start_time: str | None = None,
                 end_time: str | None = None) -> dict:
    """Create a recurring run of the compiled pipeline on `cron`; return its id, experiment and schedule."""
    client = connect(host, namespace)
    experiment_id = client.create_experiment(name=experiment, namespace=namespace).experiment_id
    recurring = client.create_recurring_run(
        experiment_id=experiment_id, job_name=name, cron_expression=kfp_cron(cron), params=arguments or {},
        pipeline_package_path=package_path, max_concurrency=max_concurrency, no_catchup=not catchup,
        start_time=start_time, end_time=end_time, enabled=True)
    return {"recurring_run_id": recurring.recurring_run_id, "experiment_id": experiment_id,
            "cron": kfp_cron(cron), "name": name}
