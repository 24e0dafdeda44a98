"""The M2Rec training pipeline: prepare -> validate -> features -> train (GPU node) -> evaluate -> [gate] register ->
package. One definition serves `m2rec pipeline compile` (YAML for a cluster), `m2rec pipeline run --local` /
`m2rec run` (kfp.local) and `m2rec pipeline submit/schedule` (a Kubeflow Pipelines endpoint).

The data source and the hyperparameters are run-time parameters: `params_json` holds every params.yaml section
(its default is the params.yaml given at compile time), `epochs` > 0 overrides train.epochs. The image, the
training node's resources and the retries are compile-time settings (`PipelineParams`).
"""

import json
from pathlib import Path
from typing import Any, Callable, Dict

from kfp import compiler, dsl

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
        tracking_uri: str = settings.tracking_uri,
        model_name: str = settings.model_name,
        experiment: str = settings.experiment,
        feature_repo: str = settings.feature_repo,
        bentoml_home: str = settings.bentoml_home,
    ) -> str:
        prepared = ops.prepare(source_format=source_format, source_input=source_input, source_items=source_items,
                               source_columns=source_columns, source_item_columns=source_item_columns,
                               source_encoding=source_encoding, params_json=params_json)
        prepared.set_caching_options(False)  # the source path may hold new data under the same name
        dataset = prepared.outputs["dataset"]
        validated = ops.validate(dataset=dataset, params_json=params_json)
        featured = ops.features(dataset=dataset, params_json=params_json, feature_repo=feature_repo)
        featured.after(validated)  # nothing is built from data that failed validation
        featured.set_env_variable("HF_HUB_OFFLINE", "1")
        trained = ops.train(dataset=dataset, feature_build=featured.outputs["feature_build"], model_type=model_type,
                            epochs=epochs, params_json=params_json)
        request_training_node(trained, settings)
        evaluated = ops.evaluate(dataset=dataset, model=trained.outputs["model"], params_json=params_json,
                                 gate_metric=gate_metric, gate_threshold=gate_threshold)
        with dsl.If(evaluated.outputs["passed"] == True, name="gate-passed"):  # noqa: E712 (a KFP condition)
            registered = ops.register(model=trained.outputs["model"], dataset=dataset, tracking_uri=tracking_uri,
                                      model_name=model_name, experiment=experiment)
            registered.set_caching_options(False)
            packaged = ops.package(registration_json=registered.output, tracking_uri=tracking_uri,
                                   model_name=model_name, bentoml_home=bentoml_home, feature_repo=feature_repo)
            packaged.set_caching_options(False)
            shipped = ops.summarize(evaluation_json=evaluated.outputs["evaluation_json"],
                                    lineage_json=prepared.outputs["lineage_json"],
                                    registration_json=registered.output, package_json=packaged.output)
        with dsl.Else(name="gate-failed"):
            rejected = ops.summarize(evaluation_json=evaluated.outputs["evaluation_json"],
                                     lineage_json=prepared.outputs["lineage_json"], registration_json="",
                                     package_json="")
        return dsl.OneOf(shipped.output, rejected.output)

    return m2rec_training


def compile_pipeline(package_path: str, settings: PipelineParams, params: Dict[str, Any]) -> str:
    """Write the pipeline's YAML (IR) for a Kubeflow Pipelines cluster to `package_path`."""
    Path(package_path).parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func=build_pipeline(settings, params), package_path=package_path)
    return package_path
