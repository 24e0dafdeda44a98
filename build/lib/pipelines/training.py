"""The M2Rec training pipeline: prepare (source + logged events) -> validate -> features (a new build) -> train
(GPU node) -> evaluate and gate (against the champion, on validation) -> track (always) -> [gate passed] register as
champion -> package. One definition serves `m2rec pipeline compile` (YAML for a cluster), `m2rec pipeline run
--local` / `m2rec run` (kfp.local) and `m2rec pipeline submit/schedule` (a Kubeflow Pipelines endpoint).

The data source and the hyperparameters are run-time parameters: `params_json` holds every params.yaml section
(its default is the params.yaml given at compile time), `epochs` > 0 overrides train.epochs. The image, the
training node's resources, the retries, the shared volume and the secret are compile-time settings
(`PipelineParams`). On a cluster the steps that touch the stores mount the volume claim and read store credentials
from the secret as environment variables (kfp-kubernetes); kfp.local ignores both. A run that fails its gate
changes nothing a service reads: its feature build sits beside the serving one, and no alias moves.
"""

import json
from pathlib import Path
from typing import Any, Callable, Dict

from kfp import compiler, dsl, kubernetes

from components.stages import build_components
from m2rec.pipeline.settings import PipelineParams

PIPELINE_NAME = "m2rec-training"
DESCRIPTION = ("Prepare and validate the data, build features, train M2Rec on a GPU node, evaluate, and register and "
               "package the model when it passes the gate.")


def request_training_node(task: dsl.PipelineTask, settings: PipelineParams) -> dsl.PipelineTask:
    """Ask for a GPU node (unless accelerator_limit is 0) with CPU and memory, and retry the step on failure."""
    if settings.accelerator_limit > 0:
        task.set_accelerator_type(settings.accelerator_type).set_accelerator_limit(settings.accelerator_limit)
    task.set_cpu_request(settings.train_cpu_request).set_cpu_limit(settings.train_cpu_limit)
    task.set_memory_request(settings.train_memory_request).set_memory_limit(settings.train_memory_limit)
    if settings.train_retries > 0:
        task.set_retry(num_retries=settings.train_retries, backoff_duration=settings.retry_backoff)
    return task


def use_stores(task: dsl.PipelineTask, settings: PipelineParams) -> dsl.PipelineTask:
    """Mount the shared volume (feature builds, BENTOML_HOME, a SQLite event log) and expose the store credentials
    from the Kubernetes secret as environment variables."""
    kubernetes.mount_pvc(task, pvc_name=settings.volume_claim, mount_path=settings.volume_mount_path)
    if settings.secret_env:
        kubernetes.use_secret_as_env(task, secret_name=settings.secret_name,
                                     secret_key_to_env=dict(settings.secret_env), optional=True)
    return task


def build_pipeline(settings: PipelineParams, params: Dict[str, Any]) -> Callable:
    """The pipeline function for `settings` (image, resources, defaults), with `params` (params.yaml's content)
    as the default hyperparameters."""
    ops = build_components(settings.image, settings.packages)
    default_params = json.dumps(params, sort_keys=True)

    @dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)
    def m2rec_training(
        source_format: str = "synthetic",
        source_input: str = "",
        source_items: str = "",
        source_columns: str = "",
        source_item_columns: str = "",
        source_encoding: str = "",
        params_json: str = default_params,
        model_type: str = "m2rec",
        epochs: int = 0,
        gate_metric: str = settings.gate_metric,
        gate_threshold: float = settings.gate_threshold,
        gate_min_improvement: float = settings.gate_min_improvement,
        tracking_uri: str = settings.tracking_uri,
        model_name: str = settings.model_name,
        experiment: str = settings.experiment,
        feature_root: str = settings.feature_root,
        bentoml_home: str = settings.bentoml_home,
        events_url: str = settings.events_url,
    ) -> str:
        prepared = use_stores(ops.prepare(
            source_format=source_format, source_input=source_input, source_items=source_items,
            source_columns=source_columns, source_item_columns=source_item_columns, source_encoding=source_encoding,
            events_url=events_url, params_json=params_json), settings)
        prepared.set_caching_options(False)  # new data under the same name, new events in the log
        dataset = prepared.outputs["dataset"]
        validated = ops.validate(dataset=dataset, params_json=params_json)
        featured = use_stores(ops.features(dataset=dataset, params_json=params_json, feature_root=feature_root),
                              settings)
        featured.after(validated)  # nothing is built from data that failed validation
        featured.set_env_variable("HF_HUB_OFFLINE", "1")
        trained = use_stores(ops.train(dataset=dataset, feature_build=featured.outputs["feature_build"],
                                       model_type=model_type, epochs=epochs, params_json=params_json), settings)
        request_training_node(trained, settings)
        evaluated = use_stores(ops.evaluate(
            dataset=dataset, model=trained.outputs["model"], params_json=params_json, gate_metric=gate_metric,
            gate_threshold=gate_threshold, gate_min_improvement=gate_min_improvement, tracking_uri=tracking_uri,
            model_name=model_name), settings)
        evaluated.set_caching_options(False)  # the champion it is compared with may have changed
        tracked = use_stores(ops.track(model=trained.outputs["model"], dataset=dataset,
                                       evaluation_json=evaluated.outputs["evaluation_json"],
                                       tracking_uri=tracking_uri, experiment=experiment), settings)
        tracked.set_caching_options(False)
        with dsl.If(evaluated.outputs["passed"] == True, name="gate-passed"):  # noqa: E712 (a KFP condition)
            registered = use_stores(ops.register(run_id=tracked.output, model=trained.outputs["model"],
                                                 tracking_uri=tracking_uri, model_name=model_name,
                                                 feature_build_key=featured.outputs["build_key"]), settings)
            registered.set_caching_options(False)
            packaged = use_stores(ops.package(registration_json=registered.output, tracking_uri=tracking_uri,
                                              model_name=model_name, bentoml_home=bentoml_home,
                                              feature_root=feature_root, events_url=events_url,
                                              params_json=params_json), settings)
            packaged.set_caching_options(False)
            shipped = ops.summarize(evaluation_json=evaluated.outputs["evaluation_json"],
                                    lineage_json=prepared.outputs["lineage_json"], run_id=tracked.output,
                                    registration_json=registered.output, package_json=packaged.output)
        with dsl.Else(name="gate-failed"):
            rejected = ops.summarize(evaluation_json=evaluated.outputs["evaluation_json"],
                                     lineage_json=prepared.outputs["lineage_json"], run_id=tracked.output,
                                     registration_json="", package_json="")
        return dsl.OneOf(shipped.output, rejected.output)

    return m2rec_training


def compile_pipeline(package_path: str, settings: PipelineParams, params: Dict[str, Any]) -> str:
    """Write the pipeline's YAML (IR) for a Kubeflow Pipelines cluster to `package_path`."""
    Path(package_path).parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func=build_pipeline(settings, params), package_path=package_path)
    return package_path
