"""Stage: validate the canonical tables with Great Expectations; a failing batch stops the pipeline."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from m2rec.data.errors import DataError
from m2rec.data.prepared import PreparedDataset
from m2rec.validation.report import REPORT_NAME, write_report
from m2rec.validation.suites import ValidationParams, run_suites

log = logging.getLogger(__name__)

REPORT_FOLDER = "validation"  # default report location: <data_dir>/validation/


class ValidationFailed(DataError):
    """The data broke at least one expectation; the report (already written) shows counts and example rows."""

    def __init__(self, summary: dict):
        failed = [r for r in summary["results"] if not r["success"]]
        names = "; ".join(f"{r['suite']}: {r['description']}"
                          + (f" ({r['unexpected_count']} failing rows)" if r["unexpected_count"] else "")
                          for r in failed)
        super().__init__(
            f"{len(failed)} data expectation(s) failed: {names}. Report: {summary['report']}",
            "correct the input data and run `m2rec data prepare` again, or change the thresholds in the "
            "`validation:` section of params.yaml if they are wrong",
            path=summary["data_dir"],
        )
        self.summary = summary


def validate(data_dir: str | Path, params: ValidationParams | None = None, report_dir: Path | None = None) -> dict:
    """Check the tables in `data_dir`, write the report (default `<data_dir>/validation/`) and return a summary
    with `success`, per-expectation `results` and the `report` path; raise `ValidationFailed` if any failed."""
    import great_expectations as gx

    params = params or ValidationParams()
    data_dir = Path(data_dir)
    report_dir = Path(report_dir) if report_dir is not None else data_dir / REPORT_FOLDER
    dataset = PreparedDataset.load(data_dir)
    checked_at = pd.Timestamp.now(tz="UTC")
    log.info("validating %s (%d interactions, %d items)", data_dir, len(dataset.interactions), len(dataset.items))
    results = run_suites(dataset.interactions, dataset.items, params, now=checked_at)
    summary = {
        "success": all(r["success"] for r in results),
        "data_dir": str(data_dir),
        "checked_at": checked_at.isoformat(),
        "great_expectations": gx.__version__,
        "params": asdict(params),
        "counts": {"interactions": len(dataset.interactions), "items": len(dataset.items)},
        "failed": [f"{r['suite']}: {r['description']}" for r in results if not r["success"]],
        "results": results,
        "report": str(report_dir / REPORT_NAME),
    }
    write_report(report_dir, summary)
    if not summary["success"]:
        log.error("validation FAILED (%d expectations); report: %s", len(summary["failed"]), summary["report"])
        raise ValidationFailed(summary)
    log.info("validation passed (%d expectations); report: %s", len(results), summary["report"])
    return summary
