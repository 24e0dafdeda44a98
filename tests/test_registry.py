"""MLflow registry: every run holds params, per-epoch metrics, plots, the dataset and the gate's verdict; a safe
pyfunc model is registered from it; `champion` moves only to a version that beats the champion on the same
validation data; failures leave aliases alone; it works on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from m2rec.cli import cli
from m2rec.data.errors import DataError
from m2rec.inference import Recommender
from m2rec.data.prepared import PreparedDataset
from m2rec.registry.gate import decide, score_on
from m2rec.stages.register import register



def train_tiny_model(data_dir: Path, output: Path, epochs: int = 2) -> Path:
    """A small M2Rec on the tiny dataset (item texts through the cached text encoder)."""
    from m2rec.model.config import ModelParams
    from m2rec.stages.train import train
    from m2rec.training.trainer import TrainParams

    train(data_dir, output, "m2rec", ModelParams(hidden_size=16, d_state=8, max_length=20),
          TrainParams(epochs=epochs, batch_size=32, progress=False))
    return output


def variant(model_dir: Path, target: Path) -> Path:
    """A copy of a model folder."""
    shutil.copytree(model_dir, target)
    return target


def sqlite_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def aliases(tracking_uri: str, name: str = "m2rec") -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    model = MlflowClient(tracking_uri).get_registered_model(name)
    return {alias: str(version) for alias, version in model.aliases.items()}


@pytest.fixture(scope="module")
def model_dir(tiny_synthetic, tmp_path_factory) -> Path:
    return train_tiny_model(tiny_synthetic, tmp_path_factory.mktemp("registry") / "model")


@pytest.fixture(scope="module")
def sequence(model_dir, tiny_synthetic, tmp_path_factory) -> dict:
    """First the trained model, then one no better (the same model again) and then a better one (trained longer),
    registered in one store; the gate scores each against the champion on the same validation data."""
    root = tmp_path_factory.mktemp("sequence")
    uri = sqlite_uri(root)
    steps = {"first": register(model_dir, tiny_synthetic, uri, feature_build="build-1")}
    steps["after_first"] = aliases(uri)
    steps["worse"] = register(variant(model_dir, root / "worse"), tiny_synthetic, uri)
    steps["after_worse"] = aliases(uri)
    steps["better"] = register(train_tiny_model(tiny_synthetic, root / "better", epochs=8), tiny_synthetic, uri)
    steps["after_better"] = aliases(uri)
    return {"uri": uri, **steps}


def test_first_registration_becomes_champion(sequence):
    first = sequence["first"]
    assert first["alias"] == "champion" and first["version"] == "1" and first["champion_version"] == "1"
    assert first["model_uri"] == "models:/m2rec/1"
    assert sequence["after_first"] == {"champion": "1"}


def test_worse_model_does_not_replace_champion(sequence):
    worse = sequence["worse"]
    assert worse["alias"] == "challenger" and worse["version"] == "2" and worse["champion_version"] == "1"
    assert "does not beat" in worse["gate"]["reason"] and worse["gate"]["champion_version"] == "1"
    assert sequence["after_worse"] == {"champion": "1", "challenger": "2"}


def test_better_model_replaces_champion(sequence):
    better = sequence["better"]
    assert better["alias"] == "champion" and better["version"] == "3" and better["champion_version"] == "3"
    assert "beats champion v1" in better["gate"]["reason"]
    assert better["gate"]["value"] > better["gate"]["champion_value"]
    assert sequence["after_better"] == {"champion": "3", "challenger": "2"}


def test_a_registered_version_gives_the_trained_models_recommendations(sequence, model_dir):
    import mlflow

    mlflow.set_tracking_uri(sequence["uri"])
    loaded = mlflow.pyfunc.load_model("models:/m2rec/1")  # the model trained in model_dir
    recommender = Recommender(model_dir)
    histories = [recommender.item_ids[[3, 5, 8]].tolist(), recommender.item_ids[[10]].tolist(), []]
    out = loaded.predict(pd.DataFrame({"item_ids": histories}), params={"k": 7, "exclude_seen": True})
    expected = recommender.recommend([recommender.to_indices(h) for h in histories], k=7, exclude_seen=True)
    for row, rec in zip(out.itertuples(), expected):
        assert list(row.item_ids) == rec.item_ids and list(row.titles) == rec.titles
        assert np.allclose(row.scores, rec.scores) and row.strategy == rec.strategy
    assert out["strategy"].tolist() == ["model", "model", "popularity"]
    assert set(out["gates"][0]) == set(recommender.model.branch_names)
    default_k = loaded.predict(pd.DataFrame({"item_ids": histories[:1]}))  # k and exclude_seen from the signature
    assert len(default_k["item_ids"][0]) == 10
    with pytest.raises(DataError, match="unknown item id"):
        loaded.predict(pd.DataFrame({"item_ids": [["no-such-item"]]}))


def test_registered_version_has_signature_and_safe_files(sequence):
    import mlflow
    from mlflow.models import get_model_info

    mlflow.set_tracking_uri(sequence["uri"])
    info = get_model_info("models:/m2rec@champion")
    assert info.signature.inputs.input_names() == ["item_ids"]
    assert {p.name: p.default for p in info.signature.params.params} == {"k": 10, "exclude_seen": True}
    assert "gates" in info.signature.outputs.input_names()
    files = {p.name for p in Path(mlflow.artifacts.download_artifacts("models:/m2rec/1")).rglob("*") if p.is_file()}
    assert {"model.safetensors", "config.json", "items.parquet", "pyfunc_model.py"} <= files
    assert not {"python_model.pkl", "checkpoint.pt"} & files  # logged from code, weights as safetensors


def test_run_records_params_epochs_metrics_and_plots(sequence, model_dir):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sequence["uri"])
    run = client.get_run(sequence["first"]["run_id"])
    history = json.loads((model_dir / "history.json").read_text())
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert run.info.status == "FINISHED"
    assert run.data.params["model_type"] == "m2rec" and run.data.params["model.hidden_size"] == "16"
    assert run.data.params["train.epochs"] == "2" and run.data.tags["dataset_version"] == metrics["dataset_version"]
    assert run.data.metrics["valid_NDCG_at_10"] == pytest.approx(metrics["valid"]["NDCG@10"])
    assert run.data.metrics["test_HR_at_10"] == pytest.approx(metrics["test"]["HR@10"])
    per_epoch = client.get_metric_history(run.info.run_id, "epoch/loss")
    assert [(m.step, m.value) for m in per_epoch] == [(r["epoch"], pytest.approx(r["loss"])) for r in history]
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/training_curves.png", "plots/gate_weights.png"}
    assert run.inputs.dataset_inputs[0].dataset.digest == metrics["dataset_version"]  # the dataset, as an input
    assert run.data.tags["gate.passed"] == "true" and run.data.metrics["gate_value"] > 0
    worse = client.get_run(sequence["worse"]["run_id"])
    assert worse.data.tags["gate.passed"] == "false" and worse.data.tags["gate.champion_version"] == "1"
    version = client.get_model_version("m2rec", "1")
    assert version.tags["feature_build"] == "build-1" and version.run_id == run.info.run_id


def test_failed_run_changes_no_alias(model_dir, tiny_synthetic, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = sqlite_uri(tmp_path)
    register(model_dir, tiny_synthetic, uri)
    better = train_tiny_model(tiny_synthetic, tmp_path / "better", epochs=6)

    def broken_log_model(*args, **kwargs):
        raise RuntimeError("artifact store went away")

    monkeypatch.setattr(mlflow.pyfunc, "log_model", broken_log_model)
    with pytest.raises(RuntimeError, match="went away"):
        register(better, tiny_synthetic, uri)
    client = MlflowClient(uri)
    assert aliases(uri) == {"champion": "1"}
    assert len(client.search_model_versions("name='m2rec'")) == 1


def test_the_champion_is_scored_on_the_new_data_through_item_ids(model_dir, tiny_synthetic, tmp_path):
    """A champion trained on another catalog (here: item indices shuffled) is compared on the same targets."""
    data = PreparedDataset.load(tiny_synthetic)
    own = score_on(model_dir, data, "valid")
    permutation = np.random.default_rng(0).permutation(data.num_items) + 1  # new index of each old one
    remap = np.concatenate([[0], permutation])
    reindexed = PreparedDataset(data.interactions.assign(item_idx=remap[data.interactions["item_idx"]]),
                                data.items.assign(item_idx=remap[data.items["item_idx"]]), data.stats)
    assert score_on(model_dir, reindexed, "valid") == pytest.approx(own)
    fewer = PreparedDataset(data.interactions, data.items.assign(item_id=data.items["item_id"] + "-renamed"),
                            data.stats)
    assert score_on(model_dir, fewer, "valid")["HR@20"] == 0  # no target it knows: every one a miss


@pytest.mark.parametrize("value, champion, passed, reason", [
    (0.30, (None, None), True, "there is no champion yet"),
    (0.30, ("1", 0.30), False, "does not beat champion v1"),  # a tie keeps the champion
    (0.31, ("1", 0.30), True, "beats champion v1"),
    (0.01, (None, None), False, "below the threshold"),
])
def test_gate_rule(value, champion, passed, reason):
    verdict = decide("valid/NDCG@10", value, 0.02, *champion)
    assert verdict.passed is passed and reason in verdict.reason


def test_incomplete_model_folder_is_refused(model_dir, tiny_synthetic, tmp_path):
    broken = variant(model_dir, tmp_path / "broken")
    (broken / "metrics.json").unlink()
    with pytest.raises(DataError, match="lacks metrics.json"):
        register(broken, tiny_synthetic, sqlite_uri(tmp_path))


def test_register_and_package_commands(model_dir, tiny_synthetic, tmp_path):
    uri = sqlite_uri(tmp_path)
    runner = CliRunner()
    done = runner.invoke(cli, ["register", "--model-dir", str(model_dir), "--data", str(tiny_synthetic),
                               "--tracking-uri", uri])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["alias"] == "champion"
    home = tmp_path / "bentoml"
    done = runner.invoke(cli, ["package", "--tracking-uri", uri, "--bentoml-home", str(home), "--no-build"])
    assert done.exit_code == 0, done.output
    packaged = json.loads(done.stdout)
    name, version = packaged["bentoml_model_tag"].split(":")
    stored = home / "models" / name / version
    assert {"model.safetensors", "config.json", "items.parquet"} <= {p.name for p in stored.iterdir()}
    assert packaged["bento_tag"] is None and "serving.service:M2RecService" in packaged["serve_command"]
    import yaml

    recorded = yaml.safe_load((stored / "model.yaml").read_text())["metadata"]
    assert recorded["tracking_uri"] == uri and recorded["serving"]["follow_alias"] == "champion"
    done = runner.invoke(cli, ["package", "--tracking-uri", uri, "--model-uri", "models:/m2rec@nobody"])
    assert done.exit_code != 0 and "not in the registry" in str(done.exception)


@pytest.fixture
def postgres_uri(postgres_url):
    """The fresh PostgreSQL database as an MLflow tracking URI."""
    yield postgres_url.replace("postgresql://", "postgresql+psycopg2://", 1)
    import mlflow

    mlflow.set_tracking_uri(None)  # let MLflow's connections to the database go before it is dropped


def test_registry_on_postgresql(postgres_uri, model_dir, tiny_synthetic, tmp_path):
    from mlflow.tracking import MlflowClient

    artifacts = (tmp_path / "artifacts").as_uri()
    first = register(model_dir, tiny_synthetic, postgres_uri, artifact_location=artifacts)
    worse = register(variant(model_dir, tmp_path / "worse"), tiny_synthetic, postgres_uri)
    assert [first["alias"], worse["alias"]] == ["champion", "challenger"]
    assert aliases(postgres_uri) == {"champion": "1", "challenger": "2"}
    run = MlflowClient(postgres_uri).get_run(worse["run_id"])
    assert run.data.tags["gate.passed"] == "false"
