"""Figures logged with each run: training curves, and the gate weights M2Rec gives its branches."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(columns: int) -> tuple[Figure, Sequence]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in CI
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, columns, figsize=(5 * columns, 3.6), constrained_layout=True)
    return figure, axes


def training_curves(history: list[dict], best_epoch: int | None = None) -> Figure:
    """Training loss and validation HR@10 / NDCG@10 per epoch, with the kept (best) epoch marked."""
    from matplotlib.ticker import MaxNLocator

    epochs = [record["epoch"] for record in history]
    figure, (loss_axis, metric_axis) = _figure(2)
    loss_axis.plot(epochs, [record["loss"] for record in history], marker="o")
    loss_axis.set(title="training loss", xlabel="epoch", ylabel="cross-entropy")
    for name in ("valid_HR@10", "valid_NDCG@10"):
        if all(name in record for record in history):
            metric_axis.plot(epochs, [record[name] for record in history], marker="o", label=name)
    metric_axis.set(title="validation", xlabel="epoch")
    metric_axis.legend()
    for axis in (loss_axis, metric_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if best_epoch:
            axis.axvline(best_epoch, color="grey", linestyle="--", linewidth=1)
    return figure


def gate_weights(gates: np.ndarray, branch_names: list[str], history_lengths: np.ndarray) -> Figure:
    """Gate weights at the last position of each history: their mean per branch, and how they change with the
    history's length. `gates` (U, n_branches), `history_lengths` (U,)."""
    figure, (mean_axis, length_axis) = _figure(2)
    mean_axis.bar(branch_names, gates.mean(0), yerr=gates.std(0), capsize=4)
    mean_axis.set(title=f"mean gate weight ({len(gates)} users)", ylabel="weight", ylim=(0, 1))
    edges = np.unique(np.quantile(history_lengths, np.linspace(0, 1, 6)).round())  # up to 5 bins of equal count
    if len(edges) < 2:  # every history has the same length
        edges = np.array([edges[0], edges[0] + 1])
    bins = np.clip(np.digitize(history_lengths, edges[1:-1]), 0, len(edges) - 2)
    centres = [(edges[b] + edges[b + 1]) / 2 for b in range(len(edges) - 1)]
    for column, name in enumerate(branch_names):
        means = [gates[bins == b, column].mean() if (bins == b).any() else np.nan for b in range(len(centres))]
        length_axis.plot(centres, means, marker="o", label=name)
    length_axis.set(title="gate weight by history length", xlabel="history length (items)", ylim=(0, 1))
    length_axis.legend()
    return figure
