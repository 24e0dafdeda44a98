"""Contracts of the code itself: layers import only downward, drivers are never imported by the library, only public
APIs of the tools are used, and the Bento installs exactly m2rec's own dependencies."""

from __future__ import annotations

import re
from importlib.metadata import requires
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DRIVERS = ("pipelines", "components", "serving")  # the top-level packages beside the library


def python_files(*folders: str) -> list[Path]:
    return [path for folder in folders for path in (REPO / folder).rglob("*.py")]


def test_the_library_imports_no_stage_and_no_driver_and_never_edits_sys_path():
    for path in python_files("m2rec"):
        layer, text = path.relative_to(REPO / "m2rec").parts[0], path.read_text()
        if layer != "cli":  # the CLI is a driver (the Kubeflow components, outside m2rec/, are the other)
            assert not re.search(r"^\s*(from|import) m2rec\.stages", text, re.M), f"{path} imports a stage"
        if layer != "cli":
            assert not re.search(rf"^\s*(from|import) ({'|'.join(DRIVERS)})\b", text, re.M), f"{path} imports a driver"
        assert "sys.path" not in text, f"{path} edits sys.path"


def test_only_public_apis_of_the_tools():
    for path in python_files("m2rec", *DRIVERS):
        assert "_internal" not in path.read_text(), f"{path} uses a private API"


def test_the_bento_installs_exactly_m2recs_runtime_dependencies(tmp_path):
    from m2rec.serving.bento import build_context

    bentofile = yaml.safe_load(build_context(tmp_path).read_text())
    runtime = [r for r in requires("m2rec") if "extra ==" not in r]
    assert bentofile["python"]["packages"] == runtime and "torch==2.13.0" in runtime
    assert (tmp_path / "m2rec" / "model" / "kernels" / "selective_scan.c").is_file()
    assert (tmp_path / "serving" / "service.py").is_file()
