"""One Kubeflow component per stage, each a thin wrapper over the `m2rec` function the CLI calls.

Components pass typed artifacts (Dataset, Model, Metrics, Markdown, HTML); parameters are plain values, and
`params_json` is the whole params.yaml as JSON text (JSON, not a dict parameter: KFP turns a dict's integers into
floats). These are lightweight components: KFP ships each function's source alone, so every import sits inside
its body. `build_components` wraps them for an image; no `from __future__ import annotations` here, KFP reads
the annotations as types.
"""

from types import SimpleNamespace
from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output


def prepare(source_format: str, source_input: str, source_items: str, source_columns: str,
            source_item_columns: str, source_encoding: str, events_url: str, params_json: str,
            dataset: Output[Dataset]) -> NamedTuple("PrepareOutputs", dataset_version=str, lineage_json=str):
    """Read the source plus every event logged at `events_url` up to now (the run's cutoff), k-core filter and
    split it (m2rec.stages.prepare); record the input's DVC hash and how many events came from the log."""
    import json
    import logging

    from m2rec.data.prepare import PrepareParams
    from m2rec.data.sources import SourceSpec
    from m2rec.data.synthetic import SyntheticParams
    from m2rec.params import section
    from m2rec.pipeline.lineage import write_lineage
    from m2rec.spark.session import SparkParams
    from m2rec.stages.prepare import prepare as prepare_stage

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = json.loads(params_json)
    source = SourceSpec(source_format, source_input or None, source_items or None, source_columns or None,
                        source_item_columns or None, source_encoding or None)
    stats = prepare_stage(source, dataset.path, section(params, "prepare", PrepareParams),
                          section(params, "synthetic", SyntheticParams), events_url or None,
                          section(params, "spark", SparkParams))
    lineage = write_lineage(source, dataset.path, stats)
    dataset.metadata.update({"dataset_version": stats["dataset_version"], "dvc_md5": lineage["dvc_md5"] or "",
                             "events_merged": stats["events"]["merged"],
                             "events_through_seq": stats["events"]["through_seq"],
                             **{k: v for k, v in stats["after_filter"].items()}})
    return NamedTuple("PrepareOutputs", dataset_version=str, lineage_json=str)(
        stats["dataset_version"], json.dumps(lineage))


def validate(dataset: Input[Dataset], params_json: str, report: Output[Markdown]):
    """Check the tables with Great Expectations (m2rec.stages.validate); a failure fails the task, which stops the
    pipeline before training. The Markdown report is written either way (and printed on failure)."""
    import json
    import logging
    import shutil
    from pathlib import Path

    from m2rec.params import section
    from m2rec.stages.validate import validate as validate_stage
    from m2rec.validation.report import REPORT_NAME
    from m2rec.validation.suites import ValidationParams

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = section(json.loads(params_json), "validation", ValidationParams)
    report_dir = Path(report.path).with_name("validation")  # report.md and results.json, beside the artifact
    try:
        summary = validate_stage(dataset.path, params, report_dir)
    finally:
        if (report_dir / REPORT_NAME).is_file():
            shutil.copyfile(report_dir / REPORT_NAME, report.path)
    report.metadata.update({"success": summary["success"], "expectations": len(summary["results"])})


def features(dataset: Input[Dataset], params_json: str, feature_root: str, feature_build: Output[Artifact]
             ) -> NamedTuple("FeatureOutputs", build_key=str, users=int, items=int):
    """Embed item texts, write the Feast offline tables, apply and materialize into a new build under
    `feature_root` (m2rec.stages.features), beside the build a service reads. The `feature_build` artifact
    describes the build (key, counts, files, the repository) and is what training reads its features through."""
    import json
    import logging
    from pathlib import Path

    from m2rec.features.repo import FeatureParams
    from m2rec.params import section
    from m2rec.spark.session import SparkParams
    from m2rec.stages.features import build_features
    from m2rec.text.embeddings import TextEncoderParams

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = json.loads(params_json)
    summary = build_features(dataset.path, feature_root or None, section(params, "features", FeatureParams),
                             section(params, "text", TextEncoderParams), section(params, "spark", SparkParams))
    Path(feature_build.path).write_text(json.dumps(summary, indent=2, default=str))
    counts = summary["counts"]
    feature_build.metadata.update({"build_key": summary["build_key"], "repo_dir": summary["repo_dir"],
                                   "text_model": summary["text_model"], "embedding_dim": summary["embedding_dim"],
                                   **counts})
    return NamedTuple("FeatureOutputs", build_key=str, users=int, items=int)(
        summary["build_key"], counts["users"], counts["items"])


def train(dataset: Input[Dataset], feature_build: Input[Artifact], model_type: str, epochs: int, params_json: str,
          model: Output[Model], metrics: Output[Metrics],
          curves: Output[HTML]) -> NamedTuple("TrainOutputs", best_epoch=int, epochs_run=int, train_seconds=float):
    """Train `model_type` (m2rec.stages.train.train) on sequences and item text embeddings read through the
    feature store the `feature_build` step filled; `epochs` > 0 overrides train.epochs. A retried task resumes
    from the checkpoint in its output when there is one."""
    import json
    import logging
    from pathlib import Path

    from m2rec.model.config import ModelParams
    from m2rec.params import section
    from m2rec.pipeline.reports import training_curves_html
    from m2rec.model.files import HISTORY_FILE
    from m2rec.stages.train import train as train_stage
    from m2rec.text.embeddings import TextEncoderParams
    from m2rec.training.trainer import TrainParams

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = json.loads(params_json)
    build = json.loads(Path(feature_build.path).read_text())
    result = train_stage(
        dataset.path, model.path, model_type, section(params, "model", ModelParams),
        section(params, "train", TrainParams, epochs=epochs if epochs > 0 else None, progress=False),
        section(params, "text", TextEncoderParams), resume=True, feature_repo=build["repo_dir"])
    for split in ("valid", "test"):
        for name, value in result[split].items():
            metrics.log_metric(f"{split}_{name}", float(value))
    history = json.loads((Path(model.path) / HISTORY_FILE).read_text())
    Path(curves.path).write_text(training_curves_html(history, f"{model_type} training curves"))
    model.metadata.update({"model_type": model_type, "dataset_version": result["dataset_version"],
                           "best_epoch": result["best_epoch"]})
    return NamedTuple("TrainOutputs", best_epoch=int, epochs_run=int, train_seconds=float)(
        int(result["best_epoch"]), int(result["epochs_run"]), float(result["train_seconds"]))


def evaluate(dataset: Input[Dataset], model: Input[Model], params_json: str, gate_metric: str,
             gate_threshold: float, gate_min_improvement: float, tracking_uri: str, model_name: str,
             metrics: Output[Metrics], report: Output[Markdown]
             ) -> NamedTuple("EvaluateOutputs", passed=bool, score=float, evaluation_json=str):
    """Full-ranking metrics of the trained model (m2rec.stages.train.evaluate) and the promotion gate
    (m2rec.stages.register.gate): the validation `gate_metric` must reach `gate_threshold` and beat the current
    champion's on the same new validation data. The test split is reported, never used to choose."""
    import json
    import logging
    from pathlib import Path

    from m2rec.params import section
    from m2rec.pipeline.reports import evaluation_markdown
    from m2rec.stages.register import gate as gate_stage
    from m2rec.stages.train import evaluate as evaluate_stage
    from m2rec.training.trainer import TrainParams

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    train_params = section(json.loads(params_json), "train", TrainParams)
    result = evaluate_stage(model.path, dataset.path, train_params.mask_history)
    gate = gate_stage(model.path, dataset.path, tracking_uri or None, model_name, gate_metric, gate_threshold,
                      gate_min_improvement, train_params.mask_history)
    for split in ("valid", "test"):
        for name, value in result[split].items():
            metrics.log_metric(f"{split}_{name}", float(value))
    Path(report.path).write_text(evaluation_markdown(result, gate))
    logging.getLogger("m2rec.pipeline").info("gate %s: %s", "passed" if gate["passed"] else "failed", gate["reason"])
    return NamedTuple("EvaluateOutputs", passed=bool, score=float, evaluation_json=str)(
        bool(gate["passed"]), float(gate["value"]), json.dumps({**result, "gate": gate}))


def track(model: Input[Model], dataset: Input[Dataset], evaluation_json: str, tracking_uri: str,
          experiment: str) -> str:
    """Record the training run in MLflow (m2rec.stages.register.track) whether or not it passed the gate: params,
    per-epoch metrics, the dataset, plots and the verdict; tagged with the dataset's lineage. Returns the run id."""
    import json
    import logging

    from m2rec.pipeline.lineage import tag_run
    from m2rec.registry.config import resolve_tracking_uri
    from m2rec.stages.register import track as track_stage

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    verdict = json.loads(evaluation_json)["gate"]
    run_id = track_stage(model.path, dataset.path, verdict, tracking_uri or None, experiment)
    tag_run(resolve_tracking_uri(tracking_uri or None), run_id, dataset.path)  # the input's DVC hash and more
    return run_id


def register(run_id: str, model: Input[Model], tracking_uri: str, model_name: str, feature_build_key: str) -> str:
    """Register the tracked run's model as a new version with the `champion` alias (m2rec.stages.register.promote);
    only a run that passed the gate gets here. Returns the registration as JSON."""
    import json
    import logging

    from m2rec.stages.register import promote

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    registration = promote(run_id, model.path, True, tracking_uri or None, model_name, feature_build_key)
    return json.dumps({"model_name": model_name, **registration}, default=str)


def package(registration_json: str, tracking_uri: str, model_name: str, bentoml_home: str, feature_root: str,
            events_url: str, params_json: str) -> str:
    """Build a Bento of the new champion (m2rec.stages.package) that serves it with its feature build, records
    events at `events_url` and follows the champion alias. Returns bento_tag, bentoml_model_tag and the
    `bentoml serve` command."""
    import json
    import logging

    from m2rec.events.log import EventParams
    from m2rec.params import section
    from m2rec.serving.follower import ServingParams
    from m2rec.stages.package import package as package_stage

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = json.loads(params_json)
    registration = json.loads(registration_json)
    bento = package_stage(f"models:/{model_name}/{registration['version']}", tracking_uri or None,
                          bentoml_home or None, feature_root or None, events_url or None, build=True,
                          serving=section(params, "serving", ServingParams),
                          events=section(params, "events", EventParams))
    return json.dumps(bento, default=str)


def summarize(evaluation_json: str, lineage_json: str, run_id: str, registration_json: str,
              package_json: str) -> str:
    """The run's summary as JSON: evaluation and gate, dataset version and the events it took from the log, the
    MLflow run, registration and Bento (empty when the gate failed)."""
    import json

    evaluation = json.loads(evaluation_json)
    lineage = json.loads(lineage_json)
    summary = {
        "evaluation": {k: v for k, v in evaluation.items() if k != "gate"},
        "gate": evaluation["gate"],
        "dataset_version": lineage.get("dataset_version"),
        "dvc_md5": lineage.get("dvc_md5"),
        "source": lineage.get("source_name"),
        "events": lineage.get("events"),
        "run_id": run_id,
        "registration": json.loads(registration_json) if registration_json else None,
        "package": json.loads(package_json) if package_json else None,
    }
    print(json.dumps(summary, indent=2))
    return json.dumps(summary)


STAGES = (prepare, validate, features, train, evaluate, track, register, package, summarize)


def build_components(image: str, packages: List[str]) -> SimpleNamespace:
    """The components for one image: `packages` are pip-installed at start (none: the image holds m2rec and kfp)."""
    return SimpleNamespace(**{
        stage.__name__: dsl.component(stage, base_image=image, packages_to_install=list(packages) or None,
                                      install_kfp_package=False)
        for stage in STAGES
    })
