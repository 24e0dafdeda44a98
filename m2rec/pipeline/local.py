"""Run the Kubeflow pipeline on this machine with `kfp.local`: each component is a subprocess of the current
interpreter (no Docker, no venv), artifacts live under `<workdir>/kfp/`, and the stores that outlive a run (MLflow,
the Feast repository, BENTOML_HOME) default to the working folder."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from m2rec.data.errors import DataError
from m2rec.data.sources import SourceSpec
from m2rec.pipeline.settings import PipelineParams

log = logging.getLogger(__name__)
PIPELINE_ROOT = "kfp"  # inside the working folder


class PipelineFailed(RuntimeError):
    """A task of the local run failed; `task` names it and `report` points at its report when it wrote one."""

    def __init__(self, task: str, pipeline_root: Path, report: Path | None):
        where = f"; its report: {report}" if report else ""
        super().__init__(f"the pipeline stopped: task '{task}' failed{where}. Task outputs: {pipeline_root}")
        self.task, self.report = task, report


def local_arguments(workdir: Path, source: SourceSpec, model_type: str = "m2rec", epochs: int = 0,
                    gate_metric: str | None = None, gate_threshold: float | None = None,
                    gate_min_improvement: float | None = None, tracking_uri: str | None = None,
                    feature_root: str | None = None, bentoml_home: str | None = None,
                    events_url: str | None = None, model_name: str | None = None,
                    experiment: str | None = None) -> dict[str, Any]:
    """The pipeline's run-time arguments for a local run: absolute paths, stores under `workdir` by default."""
    def absolute(path: str | None) -> str:
        return str(Path(path).expanduser().resolve()) if path else ""

    arguments = {
        "source_format": source.format, "source_input": absolute(source.input), "source_items": absolute(source.items),
        "source_columns": source.columns or "", "source_item_columns": source.item_columns or "",
        "source_encoding": source.encoding or "", "model_type": model_type, "epochs": int(epochs),
        "tracking_uri": tracking_uri or f"sqlite:///{workdir / 'mlflow.db'}",
        "feature_root": absolute(feature_root) or str(workdir / "features"),
        "bentoml_home": absolute(bentoml_home) or str(workdir / "bentoml_home"),
        "events_url": events_url or f"sqlite:///{workdir / 'events.db'}",
        "gate_metric": gate_metric, "gate_threshold": gate_threshold,
        "gate_min_improvement": gate_min_improvement, "model_name": model_name,
        "experiment": experiment,
    }
    return {k: v for k, v in arguments.items() if v is not None}


@contextlib.contextmanager
def _inside(workdir: Path) -> Iterator[None]:
    """Run the components in `workdir` (stray relative outputs such as ./mlruns land there) without progress bars
    (their carriage returns garble the streamed logs)."""
    previous_dir, previous_tqdm = Path.cwd(), os.environ.get("TQDM_DISABLE")
    os.chdir(workdir)
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        os.chdir(previous_dir)
        if previous_tqdm is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous_tqdm


TASK_OUTPUT = "executor_output.json"  # what kfp.local's executor writes into a task's folder when the task succeeds


def _this_run(pipeline_root: Path, started: float) -> Path | None:
    """The folder kfp.local made for the run that started at `started` (the newest one since)."""
    runs = [p for p in pipeline_root.glob("*") if p.is_dir() and p.stat().st_mtime >= started - 1]
    return max(runs, key=lambda p: p.stat().st_ctime, default=None)


def _failed_task(run_dir: Path | None, task_order: Sequence[str]) -> str:
    """The first task, in pipeline order, that left no executor output in `run_dir`: the tasks before it
    succeeded, and it stopped the run."""
    for task in task_order:
        if run_dir is None or not (run_dir / task / TASK_OUTPUT).is_file():
            return task
    return "unknown"


def run_local(build_pipeline: Callable[[PipelineParams, dict], Callable], task_order: Sequence[str],
              workdir: str | Path, params: dict, source: SourceSpec, settings: PipelineParams | None = None,
              **arguments: Any) -> dict:
    """Run the pipeline that `build_pipeline(settings, params)` defines (pipelines.training.build_pipeline; its
    tasks in `task_order`) here with kfp.local and return its summary (components.stages.summarize), with the
    run's wall time and where its outputs are. Raises `PipelineFailed` naming the task that failed."""
    from kfp import local

    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    pipeline_root = workdir / PIPELINE_ROOT
    run_arguments = local_arguments(workdir, source, **arguments)
    # the image and packages matter only on a cluster: locally the components import this interpreter's m2rec.
    # Retries are for lost nodes; here a failure is deterministic, and kfp.local would back off for minutes.
    settings = replace(settings or PipelineParams(), image=f"python:{sys.version_info.major}.{sys.version_info.minor}",
                       packages=[], train_retries=0)
    pipeline = build_pipeline(settings, params)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=False)  # a failed run returns no outputs; its folder says which task failed
    log.info("running the pipeline locally: %s", json.dumps(run_arguments))
    started = time.time()
    with _inside(workdir):
        task = pipeline(**run_arguments)
    if not task.outputs:
        run_dir = _this_run(pipeline_root, started)
        failed = _failed_task(run_dir, task_order)
        report = run_dir / failed / "report" if run_dir else None
        raise PipelineFailed(failed, pipeline_root, report if report and report.is_file() else None)
    summary = json.loads(task.output)
    summary.update(seconds=round(time.time() - started, 1), workdir=str(workdir), pipeline_root=str(pipeline_root),
                   arguments=run_arguments, settings=asdict(settings))
    return summary


def source_spec(data: str | None, fmt: str | None, items: str | None = None, columns: str | None = None,
                item_columns: str | None = None, encoding: str | None = None) -> SourceSpec:
    """The source of a run: the embedded synthetic dataset unless `data` names a file or folder (with `fmt`)."""
    if data is None:
        if fmt not in (None, "synthetic"):
            raise DataError(f"--format {fmt} needs --data", "pass --data PATH, or leave both out for the synthetic set")
        return SourceSpec("synthetic")
    if fmt in (None, "synthetic"):
        raise DataError("--data needs --format", "pass --format movielens|recbole|sequences|table")
    return SourceSpec(fmt, data, items, columns, item_columns, encoding)
