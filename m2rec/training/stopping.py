"""When to stop training: a rule over the validation curve that does not stop on epoch-to-epoch noise.

Validation NDCG@10 over a few hundred users moves by noise from epoch to epoch; "patience epochs without a new
best raw value" then stops runs that are still rising (one lucky epoch sets a best that the next few do not beat).
The rule here watches an exponential moving average of the metric, which damps the noise (an EMA with weight `a`
has a noise variance of a / (2 - a) of the raw metric's), and never stops before `min_epochs`.
"""

from __future__ import annotations

from typing import Sequence


def smoothed(curve: Sequence[float], smoothing: float) -> list[float]:
    """The exponential moving average of `curve`, started at its first value."""
    averages: list[float] = []
    for value in curve:
        averages.append(value if not averages else smoothing * value + (1 - smoothing) * averages[-1])
    return averages


def epochs_since_best(curve: Sequence[float], smoothing: float) -> int:
    """Epochs since the smoothed curve last reached a new maximum (0 when the last epoch did)."""
    averages = smoothed(curve, smoothing)
    best = max(range(len(averages)), key=lambda i: (averages[i], -i)) if averages else -1
    return len(averages) - 1 - best


def should_stop(curve: Sequence[float], patience: int, min_epochs: int = 0, smoothing: float = 1.0) -> bool:
    """Whether a run whose validation metric per epoch so far is `curve` stops now: the metric smoothed with EMA
    weight `smoothing` has not reached a new best for `patience` epochs, and `min_epochs` have run. `smoothing=1`
    with `min_epochs=0` is plain patience on the raw metric."""
    return len(curve) >= min_epochs and epochs_since_best(curve, smoothing) >= patience
