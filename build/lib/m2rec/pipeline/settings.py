"""Settings of the Kubeflow pipeline (params.yaml section `pipeline`): the component image, the training node's
resources, the evaluation gate, and where the stores that outlive a run live on a cluster."""

from __future__ import annotations

from dataclasses import dataclass, field

from m2rec.errors import ConfigError


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
    # The gate: registration (with `champion`) and packaging run only when the validation `gate_metric`
    # ("valid/METRIC") reaches `gate_threshold` and beats the champion's on the same new validation data by more
    # than `gate_min_improvement`. Every run is tracked in MLflow with the verdict, passed or not.
    gate_metric: str = "valid/NDCG@10"
    gate_threshold: float = 0.02
    gate_min_improvement: float = 0.0
    # Stores shared by runs and the service; on a cluster: an MLflow server, and paths on the shared volume below.
    tracking_uri: str = "http://mlflow.m2rec.svc.cluster.local:5000"
    feature_root: str = "/mnt/m2rec/features"
    bentoml_home: str = "/mnt/m2rec/bentoml"
    events_url: str = "postgresql://m2rec@postgres.m2rec.svc.cluster.local:5432/m2rec"  # password: secret_env
    model_name: str = "m2rec"
    experiment: str = "m2rec"
    # On a cluster every pod has its own filesystem: the steps that read or write the stores mount this
    # PersistentVolumeClaim at `volume_mount_path`, and get store credentials as environment variables from the
    # Kubernetes secret `secret_name` (secret key -> variable); nothing secret is a pipeline parameter.
    volume_claim: str = "m2rec-stores"
    volume_mount_path: str = "/mnt/m2rec"
    secret_name: str = "m2rec-stores"
    secret_env: dict[str, str] = field(default_factory=lambda: {
        "postgres-password": "PGPASSWORD", "mlflow-username": "MLFLOW_TRACKING_USERNAME",
        "mlflow-password": "MLFLOW_TRACKING_PASSWORD", "redis-password": "M2REC_REDIS_PASSWORD"})
    # Kubeflow Pipelines endpoint of `m2rec pipeline submit/schedule` (or set KF_PIPELINES_ENDPOINT).
    host: str = ""

    def __post_init__(self) -> None:
        from m2rec.registry.config import split_metric

        split_metric(self.gate_metric)
        if self.accelerator_limit < 0 or self.train_retries < 0:
            raise ConfigError("pipeline.accelerator_limit and pipeline.train_retries must be >= 0",
                            "set 0 for no GPU or no retries")
