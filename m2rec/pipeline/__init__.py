"""Wiring for the Kubeflow pipeline in `pipelines/` (components in `components/`): its settings, the local run with
`kfp.local`, submission to a Kubeflow Pipelines endpoint, and the small helpers the components call.

`components/` and `pipelines/` sit next to `m2rec/` in the repository; `load_pipeline_module` imports them from
there, so nothing else has to be installed. Importing this package does not import kfp.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

from m2rec.data.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[2]  # holds components/, pipelines/, params.yaml


def load_pipeline_module() -> ModuleType:
    """Import `pipelines.training` from the repository (adding the repository root to `sys.path` if needed)."""
    if not (REPO_ROOT / "pipelines" / "training.py").is_file():
        raise DataError(f"the pipeline definition is not at {REPO_ROOT / 'pipelines'}",
                        "run from a checkout of the repository (pipelines/ and components/ sit next to m2rec/)")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module("pipelines.training")
