"""Settings of the Kubeflow pipeline (params.yaml section `pipeline`): the component image, the training node's
resources, the evaluation gate, and where the stores that outlive a run live on a cluster."""

from __future__ import annotations

from dataclasses import dataclass, field

from m2rec.data.errors import DataError


@dataclass
class PipelineParams:
    """Compile-time settings (image, resources, retries) and the defaults of the pipeline's run-time parameters."""

    # Components run in `image`; `packages` are pip-installed when a component starts (e.g. to try a branch of
    # m2rec on a stock Python image). The default image is built from components/Dockerfile.
    image: str = "m2rec:0.1.0"
    packages: list[str] = field(default_factory=list)
    # The train step's node: a GPU by default (accelerator_limit 0 asks for none), with CPU and memory requests.
    accelerator_type: str = "nvidia.com/gpu"
    accelerator_limit: int = 1
    train_cpu_request: str = "4"
    train_cpu_limit: str = "8"
    train_memory_request: str = "16G"
    train_memory_limit: str = "32G"
    train_retries: int = 2  # a retried train step resumes from its last checkpoint when its output survives
    retry_backoff: str = "60s"
    # Registration and packaging run only when `gate_metric` ("split/metric") reaches `gate_threshold`.
    gate_metric: str = "test/NDCG@10"
    gate_threshold: float = 0.02
    # Stores shared by runs; on a cluster: an MLflow server and paths on a shared volume.
    tracking_uri: str = "http://mlflow.m2rec.svc.cluster.local:5000"
    feature_repo: str = "/mnt/m2rec/feature_repo"
    bentoml_home: str = "/mnt/m2rec/bentoml"
    model_name: str = "m2rec"
    experiment: str = "m2rec"
    # Kubeflow Pipelines endpoint of `m2rec pipeline submit/schedule` (or set KF_PIPELINES_ENDPOINT).
    host: str = ""

    def __post_init__(self) -> None:
        split, _, metric = self.gate_metric.partition("/")
        if split not in ("valid", "test") or not metric:
            raise DataError(f"pipeline.gate_metric={self.gate_metric!r} is not 'split/metric'",
                            "use e.g. test/NDCG@10 or valid/HR@10")
        if self.accelerator_limit < 0 or self.train_retries < 0:
            raise DataError("pipeline.accelerator_limit and pipeline.train_retries must be >= 0",
                            "set 0 for no GPU or no retries")
