"""Params contracts: every way a value reaches a section (CLI file or -S, DVC's params.yaml, a Kubeflow
component's params_json) coerces safe values and refuses wrong types, unknown sections and keys and out-of-range
values with exit status 2 and a message naming the key; `m2rec params show/schema`; the error hierarchy."""

from __future__ import annotations

import dataclasses
import json

import jsonschema
import pytest
import yaml

from m2rec.cli import main
from m2rec.errors import ConfigError, DataError, ExternalServiceError, M2RecError, UsageError
from m2rec.model.config import ModelParams
from m2rec.params import SECTIONS, params_schema, read_params, section, section_class
from m2rec.training.trainer import TrainParams
from m2rec.validation.suites import ValidationParams

REPO_PARAMS = "params.yaml"

# (section, key, bad value, what the message must contain): wrong types, unknown keys, out-of-range values
BAD_VALUES = [
    ("train", "epochs", "ten", "train.epochs='ten'"),
    ("train", "learning_rate", "fast", "train.learning_rate='fast'"),
    ("train", "epoch", 3, "train.epoch is not a key of params section 'train'"),
    ("train", "batch_size", 0, "train.batch_size=0"),
    ("train", "learning_rate", -0.1, "train.learning_rate=-0.1"),
    ("model", "dropout", 1.5, "model.dropout=1.5"),
    ("model", "gate", "attention", "model.gate='attention'"),
    ("model", "scales", [[0.001]], "model.scales[0]"),
    ("model", "use_text", [1, 2], "model.use_text"),
    ("synthetic", "routine_probability", 2, "synthetic.routine_probability=2"),
    ("prepare", "k_core_users", 1, "prepare.k_core_users=1"),
    ("validation", "min_text_fraction", 1.5, "validation.min_text_fraction=1.5"),
    ("features", "max_sequence_length", "long", "features.max_sequence_length='long'"),
    ("text", "batch_size", "big", "text.batch_size='big'"),
    ("registry", "experiment", ["a"], "registry.experiment"),
    ("package", "build", "maybe", "package.build='maybe'"),
    ("pipeline", "accelerator_limit", "one", "pipeline.accelerator_limit='one'"),
]
IDS = [f"{s}.{k}={v}" for s, k, v, _ in BAD_VALUES]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run `m2rec ARGS` through the console-script entry point: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as done:
        main(args)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


@pytest.mark.parametrize("name, key, value, message", BAD_VALUES, ids=IDS)
def test_cli_set_refuses_bad_values_with_exit_2(name, key, value, message, capsys):
    code, _, err = run_cli(["params", "show", "-S", f"{name}.{key}={json.dumps(value)}"], capsys)
    assert code == 2 and message in err and "Fix:" in err, err


@pytest.mark.parametrize("name, key, value, message", BAD_VALUES[:6], ids=IDS[:6])
def test_cli_params_file_refuses_bad_values_before_training(name, key, value, message, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({name: {key: value}}))
    code, _, err = run_cli(["train", "--data", str(tmp_path), "--output", str(tmp_path / "m"), "--params",
                            str(bad)], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "m").exists()


def test_unknown_sections_are_refused_everywhere(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian:\n  epochs: 3\n")
    code, _, err = run_cli(["params", "show", "--params", str(bad)], capsys)
    assert code == 2 and "unknown params section(s) 'trian'" in err
    code, _, err = run_cli(["params", "show", "-S", "trian.epochs=3"], capsys)
    assert code == 2 and "'trian'" in err
    with pytest.raises(ConfigError, match="'trian'"):
        section({"trian": {}}, "train", TrainParams)


def test_cli_misuse_is_a_usage_error(capsys):
    code, _, err = run_cli(["params", "show", "-S", "train.epochs"], capsys)
    assert code == 2 and "is not NAME=VALUE" in err
    code, _, err = run_cli(["params", "show", "-S", "train=3"], capsys)
    assert code == 2 and "names no key" in err


def test_dvc_exp_run_set_values_are_coerced_or_refused_by_the_stage(tmp_path, capsys):
    """`dvc exp run -S train.learning_rate=1e-3` leaves `learning_rate: 1e-3` in params.yaml, which YAML 1.1
    (PyYAML) reads as the string '1e-3'; the stage commands read that file with --params."""
    params = yaml.safe_load(open(REPO_PARAMS).read())
    text = yaml.safe_dump(params, sort_keys=False).replace("learning_rate: 0.001", "learning_rate: 1e-3")
    assert "learning_rate: 1e-3" in text
    written = tmp_path / "params.yaml"
    written.write_text(text)
    assert read_params(written)["train"]["learning_rate"] == "1e-3"  # what the stage sees before validation
    assert section(read_params(written), "train", TrainParams).learning_rate == 0.001
    code, out, _ = run_cli(["params", "show", "--params", str(written)], capsys)
    assert code == 0 and yaml.safe_load(out)["train"]["learning_rate"] == 0.001

    written.write_text(text.replace("epochs: 30", "epochs: ten"))  # dvc exp run -S train.epochs=ten
    code, _, err = run_cli(["train", "--data", str(tmp_path), "--output", str(tmp_path / "m"), "--params",
                            str(written)], capsys)
    assert code == 2 and "train.epochs='ten'" in err


@pytest.mark.parametrize("name, key, value, message", BAD_VALUES, ids=IDS)
def test_kubeflow_params_json_is_validated(name, key, value, message):
    params_json = json.dumps({name: {key: value}})  # what a component receives
    with pytest.raises(ConfigError) as error:
        section(json.loads(params_json), name, section_class(name))  # as components/stages.py calls it
    assert message in str(error.value)


def test_safe_coercions():
    params = {"train": {"learning_rate": "1e-3", "epochs": "3", "mask_history": "true"},
              "model": {"scales": [["1e-3", "0.1"]]}, "validation": {"max_timestamp": yaml.safe_load("2030-01-01")}}
    train = section(params, "train", TrainParams)
    assert (train.learning_rate, train.epochs, train.mask_history) == (0.001, 3, True)
    assert section(params, "model", ModelParams).scales == [[0.001, 0.1]]
    assert section(params, "validation", ValidationParams).max_timestamp == "2030-01-01"
    assert section({}, "train", TrainParams, epochs=7, seed=None) == TrainParams(epochs=7)


def test_sections_stay_plain_dataclasses():
    train = section({"train": {"epochs": 3}}, "train", TrainParams)
    assert type(train) is TrainParams and dataclasses.asdict(train)["epochs"] == 3
    assert dataclasses.replace(train, epochs=5).epochs == 5
    with pytest.raises(ConfigError, match="model.gate"):
        ModelParams(gate="attention")  # the dataclass's own checks raise the same error class


def test_params_show_resolves_every_section(capsys):
    code, out, _ = run_cli(["params", "show", "--params", REPO_PARAMS, "-S", "train.epochs=3",
                            "-S", "model.scales=[[0.001, 0.1], [0.1, 1.0]]"], capsys)
    shown = yaml.safe_load(out)
    assert code == 0 and list(shown) == list(SECTIONS)
    assert shown["train"]["epochs"] == 3 and shown["train"]["eval_batch_size"] == 512  # default filled in
    assert shown["model"]["scales"] == [[0.001, 0.1], [0.1, 1.0]]
    for name, values in shown.items():
        assert values == dataclasses.asdict(section(shown, name, section_class(name)))


def test_params_schema_describes_the_file(capsys):
    code, out, _ = run_cli(["params", "schema"], capsys)
    schema = json.loads(out)
    assert code == 0 and schema == params_schema()
    assert list(schema["properties"]) == list(SECTIONS) and schema["additionalProperties"] is False
    epochs = schema["properties"]["train"]["properties"]["epochs"]
    assert epochs["type"] == "integer" and epochs["minimum"] == 1
    jsonschema.validate(yaml.safe_load(open(REPO_PARAMS).read()), schema)  # the repository's file conforms
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"train": {"epochs": "ten"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"trian": {}}, schema)


def test_adding_a_section_is_one_registry_entry(monkeypatch, capsys):
    monkeypatch.setitem(SECTIONS, "extra", "m2rec.training.trainer:TrainParams")
    code, out, _ = run_cli(["params", "show", "-S", "extra.epochs=2"], capsys)
    assert code == 0 and yaml.safe_load(out)["extra"]["epochs"] == 2
    assert "extra" in params_schema()["properties"]


def test_error_hierarchy():
    for cls, exit_code, http_status in ((DataError, 2, 400), (ConfigError, 2, 500), (UsageError, 2, 400),
                                        (ExternalServiceError, 3, 503)):
        error = cls("it broke", "mend it", path="a.csv", line=3)
        assert isinstance(error, M2RecError) and (error.exit_code, error.http_status) == (exit_code, http_status)
        assert str(error) == "a.csv, line 3: it broke. Fix: mend it"
    assert issubclass(DataError, ValueError)
    from m2rec.data.errors import DataError as reexported

    assert reexported is DataError
