"""One small exception hierarchy: each error names the problem, where it is, and how to fix it.

A driver maps the class to its own signal: the CLI exits with `exit_code`, an HTTP service answers with
`http_status`, a Kubeflow component fails its task (the message is in its log).
"""

from __future__ import annotations


class M2RecError(Exception):
    """Base class: the message reads "[path[, line N]: ]problem. Fix: fix"."""

    exit_code = 1
    http_status = 500

    def __init__(self, problem: str, fix: str, *, path: str | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}" + (f", line {line}" if line is not None else "") + ": "
        super().__init__(f"{where}{problem}. Fix: {fix}")
        self.problem, self.fix, self.path, self.line = problem, fix, path, line


class DataError(M2RecError, ValueError):
    """Input data the platform cannot use (a ValueError too, as it was before the hierarchy existed)."""

    exit_code = 2
    http_status = 400


class ConfigError(M2RecError):
    """A params.yaml value or setting that is missing, of the wrong type, unknown or out of range."""

    exit_code = 2
    http_status = 500  # a server's own configuration, not the client's request


class UsageError(M2RecError):
    """A command used the wrong way (options that do not go together, a malformed NAME=VALUE)."""

    exit_code = 2
    http_status = 400


class ExternalServiceError(M2RecError):
    """A tool or service the platform drives failed: feast apply, bentoml build, a Kubeflow host, MLflow."""

    exit_code = 3
    http_status = 503
