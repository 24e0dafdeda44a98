"""One error type for bad input data: it names the problem, where it is, and how to fix it."""

from __future__ import annotations


class DataError(ValueError):
    """Raised for input data the platform cannot use; the message says what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str, *, path: str | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}" + (f", line {line}" if line is not None else "") + ": "
        super().__init__(f"{where}{problem}. Fix: {fix}")
        self.problem, self.fix, self.path, self.line = problem, fix, path, line
