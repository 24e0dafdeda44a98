"""The Kubeflow pipeline: the compiled YAML asks for a GPU node and gates registration; `m2rec run` runs it end to
end with kfp.local on tiny data; a failed validation stops it before training; submit and schedule send what the
real `kfp.Client` sends to a recording Kubeflow Pipelines server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from m2rec.cli import cli
from m2rec.data.synthetic import SyntheticParams, generate_synthetic
from m2rec.pipeline.lineage import dvc_hash
from m2rec.errors import UsageError
from m2rec.pipeline.remote import kfp_cron

REPO = Path(__file__).resolve().parents[1]
M2REC = Path(sys.executable).parent / "m2rec"
STAGES = ("prepare", "validate", "features", "train", "evaluate", "track", "register", "package")
STORE_STEPS = ("prepare", "features", "train", "evaluate", "track", "register", "package")  # mount the volume
# a tiny dataset and model: the whole pipeline in well under a minute on two cores
TINY = ["-S", "synthetic.n_users=120", "-S", "synthetic.n_items=80", "-S", "synthetic.max_length=30",
        "-S", "model.hidden_size=16", "-S", "model.d_state=8", "-S", "model.max_length=20", "--epochs", "1"]


def write_raw_table(folder: Path, years_back: int = 0) -> tuple[Path, Path]:
    """Raw interactions and items as CSV (the `table` format) from the synthetic generator; `years_back` moves
    every timestamp into the past."""
    raw = generate_synthetic(SyntheticParams(n_users=120, n_items=80, max_length=30))
    folder.mkdir(parents=True, exist_ok=True)
    interactions = raw.interactions.assign(
        timestamp=(raw.interactions["timestamp"] - pd.DateOffset(years=years_back)).astype("int64") // 10**9)
    interactions.to_csv(folder / "interactions.csv", index=False)
    raw.items[["item_id", "title", "text"]].to_csv(folder / "items.csv", index=False)
    return folder / "interactions.csv", folder / "items.csv"


def table_source(interactions: Path, items: Path) -> list[str]:
    return ["--data", str(interactions), "--format", "table", "--items", str(items),
            "--item-columns", "item_id=item_id,text=text"]


def m2rec(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([str(M2REC), *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def compile_to(path: Path, *args: str) -> dict:
    result = CliRunner().invoke(cli, ["pipeline", "compile", "--output", str(path), "--params",
                                      str(REPO / "params.yaml"), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return next(yaml.safe_load_all(path.read_text()))


def spec_platform(path: Path) -> dict:
    """The Kubernetes platform spec of a compiled pipeline (the YAML's second document): executor -> config."""
    documents = list(yaml.safe_load_all(path.read_text()))
    assert len(documents) == 2, "the compiled pipeline has no platform spec"
    return documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_compiled_pipeline_requests_a_gpu_for_training_and_gates_registration(tmp_path):
    spec = compile_to(tmp_path / "pipeline.yaml", "--image", "registry.example/m2rec:1.2", "--package", "extra==1",
                      "-S", "pipeline.train_memory_request=24G", "-S", "pipeline.train_retries=3")
    executors = spec["deploymentSpec"]["executors"]
    train = executors["exec-train"]["container"]
    assert train["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert train["resources"]["accelerator"]["resourceCount"] == "1"
    assert train["resources"]["resourceCpuRequest"] == "4" and train["resources"]["resourceMemoryRequest"] == "24G"
    assert train["resources"]["resourceMemoryLimit"] == "32G"
    # every stage is a component of the configured image, installing the configured packages
    assert {f"exec-{stage}" for stage in STAGES} <= set(executors)
    for executor in executors.values():
        assert executor["container"]["image"] == "registry.example/m2rec:1.2"
        assert "extra==1" in " ".join(executor["container"]["command"])
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["train"]["retryPolicy"]["maxRetryCount"] == 3
    assert "validate" in tasks["features"]["dependentTasks"]  # nothing is built from unvalidated data
    # register and package run inside the gate's branch, on the evaluate step's verdict
    gate = tasks["condition-branches-1"]["componentRef"]["name"]
    branches = spec["components"][gate]["dag"]["tasks"]
    passed = next(t for t in branches.values() if "passed" in t["triggerPolicy"].get("condition", "")
                  and "!" not in t["triggerPolicy"]["condition"])
    inner = spec["components"][passed["componentRef"]["name"]]["dag"]["tasks"]
    assert {"register", "package"} <= set(inner) and "track" in tasks  # every run is tracked, passed or not
    # the data source and the hyperparameters are run-time parameters; params.yaml is the default
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert {"source_format", "source_input", "params_json", "epochs", "model_type", "gate_threshold"} <= set(parameters)
    expected = yaml.safe_load((REPO / "params.yaml").read_text())
    expected.setdefault("pipeline", {}).update(train_memory_request="24G", train_retries=3)  # the -S overrides
    assert json.loads(parameters["params_json"]["defaultValue"]) == expected

    # every step that touches a store mounts the shared volume and reads credentials from the secret; no
    # credential is a pipeline parameter
    platform = spec_platform(tmp_path / "pipeline.yaml")
    for step in STORE_STEPS:
        config = platform[f"exec-{step}"]
        assert config["pvcMount"] == [{"constant": "m2rec-stores", "mountPath": "/mnt/m2rec",
                                       "pvcNameParameter": {"runtimeValue": {"constant": "m2rec-stores"}}}]
        secret = config["secretAsEnv"][0]
        assert secret["secretName"] == "m2rec-stores" and secret["optional"] is True
        assert {k["envVar"] for k in secret["keyToEnv"]} == {"PGPASSWORD", "MLFLOW_TRACKING_USERNAME",
                                                              "MLFLOW_TRACKING_PASSWORD", "M2REC_REDIS_PASSWORD"}
    assert "exec-validate" not in platform  # it reads only its input artifact
    assert not {"password", "secret", "token"} & {word for name in parameters for word in name.split("_")}
    assert parameters["events_url"]["defaultValue"].startswith("postgresql://m2rec@")  # no password in it
    assert parameters["gate_metric"]["defaultValue"] == "valid/NDCG@10"  # chosen on validation, not test

    cpu_only = compile_to(tmp_path / "cpu.yaml", "--accelerator-limit", "0")
    assert "accelerator" not in cpu_only["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]


@pytest.mark.slow
def test_local_run_end_to_end_registers_and_packages_then_a_failed_gate_registers_nothing(tmp_path):
    interactions, items = write_raw_table(tmp_path / "raw")
    workdir = tmp_path / "work"
    done = m2rec("run", *table_source(interactions, items), *TINY, "--threshold", "0", "--workdir", str(workdir))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["gate"]["passed"] and summary["evaluation"]["test"]["NDCG@10"] > 0
    registration, bento = summary["registration"], summary["package"]
    assert registration["version"] == "1" and registration["alias"] == "champion"
    assert bento["bento_tag"] and "bentoml serve" in bento["serve_command"]
    for line in ("registered m2rec version 1 as champion", bento["bento_tag"], bento["serve_command"]):
        assert line in done.stdout
    # artifacts passed between the steps live in the local pipeline root
    run_dir = next((workdir / "kfp").iterdir())
    assert {*STAGES[:6]} <= {p.name for p in run_dir.iterdir()}
    assert (run_dir / "train" / "model" / "model.safetensors").is_file()
    assert "<img" in (run_dir / "train" / "curves").read_text()
    assert "NDCG@10" in (run_dir / "evaluate" / "report").read_text()
    # the MLflow run records the dataset version: the content hash and the raw input's DVC hash
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    tags = client.get_run(registration["run_id"]).data.tags
    assert tags["dataset.version"] == summary["dataset_version"]
    assert tags["dataset.dvc_md5"] == dvc_hash(interactions) == summary["dvc_md5"]

    # the default source (the embedded synthetic set), with a gate nothing passes: evaluated, not registered
    done = m2rec("run", *TINY, "--threshold", "1.0", "--workdir", str(workdir))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["source"].startswith("synthetic") and not summary["gate"]["passed"]
    assert summary["registration"] is None and summary["package"] is None
    assert "FAILED (tracked, not registered" in done.stdout
    assert [str(v.version) for v in client.search_model_versions("name='m2rec'")] == ["1"]
    # ... but tracked: its MLflow run holds the per-epoch metrics, the dataset and the verdict
    run = client.get_run(summary["run_id"])
    assert run.data.tags["gate.passed"] == "false" and "below the threshold 1.0" in run.data.tags["gate.reason"]
    assert run.data.metrics["gate_threshold"] == 1.0 and "epoch/loss" in run.data.metrics
    assert run.inputs.dataset_inputs[0].dataset.digest == summary["dataset_version"]


def test_failed_validation_stops_the_pipeline_before_training(tmp_path):
    interactions, items = write_raw_table(tmp_path / "raw", years_back=40)  # events in the 1980s
    workdir = tmp_path / "work"
    done = m2rec("run", *table_source(interactions, items), *TINY, "--workdir", str(workdir))
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "task 'validate' failed" in done.stderr
    run_dir = next((workdir / "kfp").iterdir())
    assert {p.name for p in run_dir.iterdir()} == {"prepare", "validate"}  # no features, no training
    report = (run_dir / "validate" / "report").read_text()
    assert "timestamp" in report and str(run_dir / "validate" / "report") in done.stderr
    assert not (workdir / "features").exists() and not (workdir / "mlflow.db").exists()
    assert not (workdir / "summary.json").exists()


class RecordingKFP(BaseHTTPRequestHandler):
    """Answers the Kubeflow Pipelines v2beta1 REST calls the client makes, and records each request."""

    requests: list[dict] = []

    def _answer(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        url = urlparse(self.path)
        record = {"method": self.command, "path": url.path, "query": parse_qs(url.query),
                  "body": json.loads(self.rfile.read(length)) if length else None}
        self.requests.append(record)
        return record

    def do_GET(self):  # noqa: N802 (http.server's naming)
        record = self._record()
        if record["path"].endswith("/healthz"):
            self._answer({"multi_user": False})
        else:  # no experiment of that name yet
            self._answer({"experiments": [], "total_size": 0})

    def do_POST(self):  # noqa: N802
        record = self._record()
        body = record["body"]
        if record["path"].endswith("/experiments"):
            self._answer({"experiment_id": "exp-1", "display_name": body["display_name"]})
        elif record["path"].endswith("/recurringruns"):
            self._answer({"recurring_run_id": "rr-1", "display_name": body["display_name"], "status": "ENABLED"})
        else:
            self._answer({"run_id": "run-1", "display_name": body["display_name"], "experiment_id": "exp-1"})

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def kfp_server(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no kfp context file of the user's
    RecordingKFP.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), RecordingKFP)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", RecordingKFP.requests
    server.shutdown()


def test_submit_sends_a_run_of_the_compiled_pipeline(kfp_server):
    host, requests = kfp_server
    result = CliRunner().invoke(cli, ["pipeline", "submit", "--host", host, "--params", str(REPO / "params.yaml"),
                                      "--experiment", "retraining", "--run-name", "nightly", "-a", "epochs=3",
                                      "-a", "source_format=movielens", "-a", "source_input=/data/ml-100k"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert '"run_id": "run-1"' in result.output
    calls = [(r["method"], r["path"]) for r in requests]
    assert ("GET", "/apis/v2beta1/healthz") in calls
    lookup = next(r for r in requests if r["method"] == "GET" and r["path"] == "/apis/v2beta1/experiments")
    assert "retraining" in lookup["query"]["filter"][0]
    assert next(r for r in requests if r["path"] == "/apis/v2beta1/experiments"
                and r["method"] == "POST")["body"]["display_name"] == "retraining"
    run = next(r for r in requests if r["path"] == "/apis/v2beta1/runs")["body"]
    assert run["display_name"] == "nightly" and run["experiment_id"] == "exp-1"
    assert run["runtime_config"]["parameters"] == {"epochs": 3, "source_format": "movielens",
                                                   "source_input": "/data/ml-100k"}
    sent = run["pipeline_spec"]  # the pipeline and, beside it, its Kubernetes platform spec (volumes, secrets)
    spec = sent["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "m2rec-training"
    assert spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]["accelerator"]
    assert sent["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]["pvcMount"]


def test_schedule_sends_a_recurring_run_with_a_kfp_cron(kfp_server, tmp_path):
    host, requests = kfp_server
    compiled = tmp_path / "compiled.yaml"
    compile_to(compiled, "--accelerator-type", "nvidia.com/a100")
    result = CliRunner().invoke(cli, ["pipeline", "schedule", "--host", host, "--pipeline-file", str(compiled),
                                      "--cron", "0 3 * * *", "--name", "nightly-retraining", "-a", "epochs=20"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{"):])["recurring_run_id"] == "rr-1"
    job = next(r for r in requests if r["path"] == "/apis/v2beta1/recurringruns")["body"]
    assert job["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert job["display_name"] == "nightly-retraining" and job["mode"] == "ENABLE"
    assert job["experiment_id"] == "exp-1" and job["no_catchup"] is True and int(job["max_concurrency"]) == 1
    assert job["runtime_config"]["parameters"] == {"epochs": 20}
    train = job["pipeline_spec"]["pipeline_spec"]["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert train["accelerator"]["resourceType"] == "nvidia.com/a100"


def test_kfp_cron_takes_five_or_six_fields():
    assert kfp_cron("30 2 * * 1") == "0 30 2 * * 1"
    assert kfp_cron("0 0 3 * * *") == "0 0 3 * * *"
    with pytest.raises(UsageError, match="fields"):
        kfp_cron("daily")


def test_an_installed_non_editable_m2rec_compiles_the_pipeline(tmp_path):
    """A wheel installed into a folder of its own (no checkout on the path) compiles the pipeline: the library
    reaches nothing outside its installed packages."""
    source = tmp_path / "source"  # the files git would ship, built outside the checkout (no build/ left in it)
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard"], capture_output=True,
                            text=True, check=True).stdout.splitlines()
    for name in listed:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert wheel.returncode == 0, wheel.stderr[-2000:]
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target),
                              *map(str, (tmp_path / "dist").glob("m2rec-*.whl"))], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    script = ("import m2rec, pipelines, feature_repo, serving, sys; from m2rec.cli import main; "
              "print(m2rec.__file__, pipelines.__file__, feature_repo.__file__, serving.__file__); "
              "sys.argv = ['m2rec', 'pipeline', 'compile', '--output', 'out.yaml']; main()")
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(path.startswith(str(target)) for path in done.stdout.split()[:4]), done.stdout
    assert spec_platform(tmp_path / "out.yaml")["exec-features"]["pvcMount"]
    assert {"feature_store.yaml", ".feastignore"} <= {p.name for p in (target / "feature_repo").iterdir()}
    assert (target / "serving" / "bentofile.yaml").is_file()
