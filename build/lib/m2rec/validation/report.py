"""Write a validation summary as `report.md` (for people) and `results.json` (for machines)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from m2rec.utils.atomic import atomic_write_bytes, atomic_write_json

REPORT_NAME = "report.md"
RESULTS_NAME = "results.json"


def _cell(value: Any, width: int = 60) -> str:
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def markdown_table(rows: list[dict]) -> list[str]:
    """Rows of dicts as the lines of a markdown table (columns of the first row)."""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


def _count(outcome: dict) -> str:
    if outcome["error"]:
        return f"error: {outcome['error']}"
    if outcome["unexpected_count"] is None:
        return f"observed: {_cell(outcome['observed_value'])}"
    percent = outcome["unexpected_percent"] or 0.0
    return f"{outcome['unexpected_count']} of {outcome['element_count']} rows ({percent:.3g}%)"


def render_markdown(summary: dict) -> str:
    """The report: verdict, inputs, one line per expectation, then each failure with example rows."""
    results = summary["results"]
    failed = [r for r in results if not r["success"]]
    lines = [
        f"# Data validation: {'PASSED' if summary['success'] else 'FAILED'}",
        "",
        f"- data: `{summary['data_dir']}` ({summary['counts']['interactions']} interactions, "
        f"{summary['counts']['items']} items)",
        f"- checked at {summary['checked_at']} with Great Expectations {summary['great_expectations']}",
        f"- thresholds: {', '.join(f'{k}={v}' for k, v in summary['params'].items())}",
        f"- {len(results) - len(failed)} of {len(results)} expectations met",
        "",
        *markdown_table([{"suite": r["suite"], "expectation": r["description"], "result": "ok" if r["success"]
                          else "FAILED", "unexpected": "" if r["success"] else _count(r)} for r in results]),
    ]
    for outcome in failed:
        lines += ["", f"## FAILED {outcome['suite']}: {outcome['description']}", "",
                  f"- expectation: `{outcome['expectation']}` on `{outcome['column']}`", f"- {_count(outcome)}"]
        if outcome["examples"]:
            lines += ["- example rows (`row`: position in the table):", ""]
            lines += markdown_table(outcome["examples"])
    return "\n".join(lines) + "\n"


def write_report(report_dir: Path, summary: dict) -> Path:
    """Write `report.md` and `results.json` into `report_dir`; return the markdown's path."""
    report = report_dir / REPORT_NAME
    atomic_write_bytes(report, render_markdown(summary).encode())
    atomic_write_json(report_dir / RESULTS_NAME, summary)
    return report
