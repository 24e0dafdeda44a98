"""Hyperparameters live in `params.yaml`; each section maps onto a dataclass owned by the module that uses it.

Every section is validated with pydantic when it is built (`section`), whoever reads it: the CLI (`--params`,
`-S SECTION.KEY=VALUE`), a DVC stage (which runs the CLI on params.yaml, as `dvc exp run -S` wrote it) or a
Kubeflow component (`params_json`). Safe coercions are made (YAML 1.1 reads `1e-3` as a string: it becomes the
float 0.001; `'3'` becomes 3); wrong types, unknown sections and keys, and out-of-range values raise a ConfigError
naming the section, the key, the value and the expected type.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import importlib
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from m2rec.errors import ConfigError, UsageError

T = TypeVar("T")

# Section name -> "module:dataclass". The one registry of params.yaml's sections: `section` refuses names not
# in it, and `m2rec params show/schema` list it. Adding a section is adding a line here. Classes are imported
# only when their section is built, so reading params stays light.
SECTIONS: dict[str, str] = {
    "prepare": "m2rec.data.prepare:PrepareParams",
    "synthetic": "m2rec.data.synthetic:SyntheticParams",
    "validation": "m2rec.validation.suites:ValidationParams",
    "features": "m2rec.features.repo:FeatureParams",
    "text": "m2rec.text.embeddings:TextEncoderParams",
    "model": "m2rec.model.config:ModelParams",
    "train": "m2rec.training.trainer:TrainParams",
    "registry": "m2rec.registry.config:RegistryParams",
    "package": "m2rec.serving.bento:PackageParams",
    "pipeline": "m2rec.pipeline.settings:PipelineParams",
    "events": "m2rec.events.log:EventParams",
    "serving": "m2rec.serving.follower:ServingParams",
    "spark": "m2rec.spark.session:SparkParams",
}

LOOK_UP = "`m2rec params schema` lists every key with its type and range, `m2rec params show` the values in use"


def section_class(name: str) -> type:
    """The dataclass of section `name`."""
    if name not in SECTIONS:
        raise ConfigError(f"params.yaml has no section {name!r}", f"use one of {', '.join(SECTIONS)}")
    module, attribute = SECTIONS[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def read_params(path: str | Path | None) -> dict[str, Any]:
    """Load a params.yaml into a dict (empty when `path` is None); its section names are checked."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} not found", "pass --params pointing at a params.yaml")
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"params file is not valid YAML ({err})".replace("\n", " "), "repair the YAML syntax",
                          path=str(path)) from None
    if not isinstance(content, dict):
        raise ConfigError("params file must hold a mapping of sections", "see params.yaml in the repository",
                          path=str(path))
    check_section_names(content)
    return content


def check_section_names(params: dict[str, Any]) -> None:
    """Refuse sections that no part of the platform reads (usually a typo, which would otherwise be ignored)."""
    unknown = [name for name in params if name not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown params section(s) {', '.join(map(repr, unknown))}",
                          f"use only the sections {', '.join(SECTIONS)}")


def section(params: dict[str, Any], name: str, cls: type[T], **overrides: Any) -> T:
    """Build dataclass `cls` from `params[name]`, then apply non-None `overrides` (e.g. CLI options); the
    result is validated (types coerced where safe) and any problem raises a ConfigError naming the key."""
    check_section_names(params)
    values = params.get(name) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"params section {name!r} is {values!r}, not a mapping of keys to values",
                          f"write it as `{name}:` followed by indented `key: value` lines")
    values = {key: _plain(value) for key, value in values.items()}
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        validated = _validator(cls).model_validate(values)
    except _pydantic_error() as err:
        raise _config_error(name, cls, err) from None
    return cls(**dict(validated))  # the dataclass's own checks (__post_init__) run here


def resolve_params(params: dict[str, Any]) -> dict[str, Any]:
    """Every registered section as its dataclass, defaults filled in (what the pipeline would use)."""
    return {name: section(params, name, section_class(name)) for name in SECTIONS}


def apply_overrides(params: dict[str, Any], assignments: dict[str, Any], option: str = "--set") -> dict[str, Any]:
    """A copy of `params` with {"section.key": value} assignments applied (checked when sections are built)."""
    params = copy.deepcopy(params)
    for dotted, value in assignments.items():
        name, _, key = dotted.partition(".")
        if not key or not name:
            raise UsageError(f"{option} {dotted}=... names no key", f"write {option} SECTION.KEY=VALUE, "
                             "e.g. train.epochs=3")
        if name not in SECTIONS:
            raise ConfigError(f"{option} {dotted}: unknown params section {name!r}",
                              f"use one of {', '.join(SECTIONS)}")
        target = params.setdefault(name, {})
        if not isinstance(target, dict):
            raise ConfigError(f"params section {name!r} is {target!r}, not a mapping", f"fix {name} in params.yaml")
        target[key] = value
    return params


def params_schema() -> dict[str, Any]:
    """The JSON schema of a whole params.yaml: one object property per section (for editors and UIs)."""
    properties = {}
    for name in SECTIONS:
        schema = _validator(section_class(name)).model_json_schema()
        schema["title"] = name
        properties[name] = schema
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "M2Rec params.yaml",
            "type": "object", "additionalProperties": False, "properties": properties}


def _plain(value: Any) -> Any:
    """YAML reads an unquoted 1995-01-01 as a date; no parameter is a date object, so keep its ISO text."""
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    return value


def _pydantic_error() -> type[Exception]:
    import pydantic

    return pydantic.ValidationError


@functools.cache
def _validator(cls: type) -> Any:
    """A pydantic model mirroring dataclass `cls` (types, defaults and `Annotated` ranges) that refuses unknown
    keys. The dataclass stays a plain stdlib dataclass (asdict, replace, attribute access)."""
    import pydantic

    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {}
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()  # pydantic copies mutable defaults per instance
        else:
            default = ...
        fields[field.name] = (hints[field.name], pydantic.Field(default=default))
    config = pydantic.ConfigDict(extra="forbid", coerce_numbers_to_str=True)
    return pydantic.create_model(cls.__name__, __config__=config, __doc__=cls.__doc__, **fields)


def _expected(cls: type, key: str) -> str:
    """What field `key` of `cls` takes, e.g. `int >= 1` or `float >= 0.0, < 1.0` (ranges from Annotated)."""
    plain = typing.get_type_hints(cls).get(key)
    if plain is None:
        return "?"
    name = plain.__name__ if isinstance(plain, type) and not typing.get_args(plain) else str(plain)
    limits = []
    annotated = typing.get_type_hints(cls, include_extras=True)[key]
    for item in getattr(annotated, "__metadata__", ()):
        limits += [f"{symbol} {getattr(item, attribute)}" for attribute, symbol in
                   (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
                   if getattr(item, attribute, None) is not None]
    return " ".join([name.replace("typing.", ""), ", ".join(limits)]).strip()


def _config_error(name: str, cls: type, err: Exception) -> ConfigError:
    """One ConfigError for all of a section's problems, each naming the key, its value and the expected type."""
    problems, fixes = [], []
    for error in err.errors():  # type: ignore[attr-defined]
        top, *inner = error["loc"]
        key = f"{name}.{top}" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in inner)
        if error["type"] == "extra_forbidden":
            problems.append(f"{key} is not a key of params section {name!r}")
            fixes.append(f"remove {key} or use one of {', '.join(f.name for f in dataclasses.fields(cls))}")
            continue
        expected = _expected(cls, top)
        problems.append(f"{key}={error['input']!r} is invalid in params section {name!r}: {error['msg']} "
                        f"({name}.{top} is {expected})")
        fixes.append(f"give {name}.{top} a valid {expected} value")
    return ConfigError("; ".join(problems), "; ".join(fixes) + f" ({LOOK_UP})")
