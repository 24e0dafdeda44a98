"""What the pipeline shows people: training curves (HTML), the evaluation (Markdown) and the closing summary."""

from __future__ import annotations

import base64
import html
import io


def training_curves_html(history: list[dict], title: str = "Training curves") -> str:
    """A self-contained HTML page: loss and validation NDCG@10 / HR@10 per epoch, as a plot and a table."""
    import matplotlib

    matplotlib.use("Agg")  # no display in a pod or a subprocess
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 3.5))
    loss_axis.plot(epochs, [row["loss"] for row in history], marker="o")
    loss_axis.set(xlabel="epoch", ylabel="training loss")
    for name in ("valid_NDCG@10", "valid_HR@10"):
        metric_axis.plot(epochs, [row.get(name) for row in history], marker="o", label=name)
    metric_axis.set(xlabel="epoch", ylabel="validation")
    metric_axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    image = base64.b64encode(buffer.getvalue()).decode()
    columns = ["epoch", "loss", "valid_NDCG@10", "valid_HR@10", "seconds"]
    rows = "".join("<tr>" + "".join(f"<td>{_number(row.get(c))}</td>" for c in columns) + "</tr>" for row in history)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
            f"<h1>{html.escape(title)}</h1><img alt='training curves' src='data:image/png;base64,{image}'>"
            f"<table border='1' cellpadding='4'><tr>{''.join(f'<th>{c}</th>' for c in columns)}</tr>{rows}</table>"
            "</body></html>")


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))


def evaluation_markdown(metrics: dict, gate: dict) -> str:
    """The evaluation as Markdown: one row per metric, valid and test side by side, then the gate's verdict."""
    lines = [f"# Evaluation of {metrics.get('model_type', 'the model')}", "",
             f"Dataset version `{metrics.get('dataset_version')}`; history items "
             f"{'masked' if metrics.get('mask_history') else 'ranked too'} (full ranking over all items).", "",
             "| metric | valid | test |", "|---|---|---|"]
    for name in metrics["test"]:
        lines.append(f"| {name} | {metrics['valid'].get(name, float('nan')):.4f} | {metrics['test'][name]:.4f} |")
    verdict = "passed: registered as champion" if gate["passed"] else "failed: tracked, not registered"
    lines += ["", f"Gate ({gate['metric']}): {gate['reason']} - {verdict}. The test split is reported, never used to "
              "choose."]
    return "\n".join(lines) + "\n"


def format_summary(summary: dict) -> str:
    """The closing lines of a run for a terminal: metrics, gate, registered version and alias, Bento, next command."""
    evaluation, gate = summary["evaluation"], summary["gate"]
    names = [n for n in ("HR@10", "NDCG@10", "MRR@10") if n in evaluation["test"]]
    lines = ["", "=" * 72, "M2Rec pipeline finished" + (f" in {summary['seconds']:.0f} s" if "seconds" in summary
                                                         else ""),
             f"  dataset   {summary.get('dataset_version')} ({summary.get('source')})"
             + (f", DVC md5 {summary['dvc_md5']}" if summary.get("dvc_md5") else ""),
             f"  model     {evaluation.get('model_type')}",
             "  valid     " + "  ".join(f"{n} {evaluation['valid'][n]:.4f}" for n in names),
             "  test      " + "  ".join(f"{n} {evaluation['test'][n]:.4f}" for n in names),
             "  gate      " + ("passed" if gate["passed"] else "FAILED (tracked, not registered, not packaged)")
             + f": {gate['reason']}"]
    if summary.get("events"):
        lines.append(f"  events    {summary['events'].get('merged', 0)} from the event log (through seq "
                     f"{summary['events'].get('through_seq', 0)})")
    if summary.get("run_id"):
        lines.append(f"  mlflow    run {summary['run_id']}")
    registration, bento = summary.get("registration"), summary.get("package")
    if registration:
        lines.append(f"  registered {registration.get('model_name', 'm2rec')} version {registration['version']} "
                     f"as {registration['alias']} (champion: version {registration.get('champion_version')})")
    if bento:
        lines += [f"  bento     {bento['bento_tag']} (model {bento.get('bentoml_model_tag')})", "",
                  "Serve it with:", f"  {bento['serve_command']}"]
    lines.append("=" * 72)
    return "\n".join(lines)
