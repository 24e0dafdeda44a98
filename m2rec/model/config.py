"""Model hyperparameters (section `model` of params.yaml). Defaults follow Mamba4Rec's published config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from annotated_types import Ge, Gt, Interval, Len

from m2rec.errors import ConfigError

MODEL_TYPES = ("m2rec", "sasrec", "sasrec_text", "mamba4rec")
# M2Rec as the paper designs it: two temporal scales (long and short memory), the frequency and semantic branches and
# the learned gate, the sequence branches reading item IDs. The default differs in two places, where the quality
# study (benchmarks/quality.py) measured it: a second temporal scale doubles the Mamba work and changed HR@10 and
# NDCG@10 by less than the noise on both ml-100k and amazon-games, so the default has one scale; and the sequence
# branches read each history item's text too (text_in_sequence), which lifted validation NDCG@10 on both Amazon
# sets and tied on ml-100k (README: Quality).
PAPER_DESIGN = {"scales": [[0.001, 0.1], [0.1, 1.0]], "use_frequency": True, "use_text": True, "gate": "learned",
                "text_in_sequence": False}


@dataclass
class ModelParams:
    """Width, depth and regularisation shared by every model, plus M2Rec's branch switches."""

    # Annotated ranges are checked when the section is read from params (m2rec.params.section).
    hidden_size: Annotated[int, Ge(1)] = 64
    num_layers: Annotated[int, Ge(1)] = 1  # Mamba layers per scale (M2Rec, Mamba4Rec); SASRec uses sasrec_layers
    d_state: Annotated[int, Ge(1)] = 32
    d_conv: Annotated[int, Ge(1)] = 4
    expand: Annotated[int, Ge(1)] = 2
    dropout: Annotated[float, Interval(ge=0.0, lt=1.0)] = 0.2
    max_length: Annotated[int, Ge(1)] = 200
    # SASRec
    sasrec_layers: Annotated[int, Ge(1)] = 2
    num_heads: Annotated[int, Ge(1)] = 2
    # M2Rec: each temporal scale is a Mamba stack initialised to a different time-step range (dt_min, dt_max):
    # small steps keep a long memory, large steps react to the last few items. One scale by default (see
    # PAPER_DESIGN); [[0.001, 0.1], [0.1, 1.0]] gives the paper's two.
    scales: list[Annotated[list[Annotated[float, Gt(0.0)]], Len(2, 2)]] = field(
        default_factory=lambda: [[0.001, 0.1]])
    scale_d_state: Annotated[int, Ge(1)] | None = None  # state size of each temporal scale (None: d_state)
    scale_expand: Annotated[int, Ge(1)] | None = None  # channel expansion of each temporal scale (None: expand)
    use_frequency: bool = True
    use_text: bool = True
    gate: Literal["learned", "mean"] = "learned"  # learned: per-position softmax gate; mean: fixed equal weights
    # Share of items whose ID embedding is dropped from their output representation in each training step, so
    # that the text projection alone learns to place an item: what a catalog item without interactions has.
    item_id_dropout: Annotated[float, Interval(ge=0.0, lt=1.0)] = 0.0
    # M2Rec: the temporal and frequency branches read each history item as it is scored (ID embedding plus
    # projected text), not by its ID embedding alone, so the sequence model sees the text of the whole history.
    text_in_sequence: bool = True

    def __post_init__(self) -> None:
        if self.gate not in ("learned", "mean"):
            raise ConfigError(f"model.gate must be 'learned' or 'mean', got {self.gate!r}", "set model.gate: learned "
                              "(per-position softmax gate) or mean (equal weights)")
        if not 0.0 <= self.item_id_dropout < 1.0:
            raise ConfigError(f"model.item_id_dropout must be in [0, 1), got {self.item_id_dropout}",
                              "set model.item_id_dropout to a share such as 0.1 (0: off)")
        if not self.scales:
            raise ConfigError("model.scales needs at least one [dt_min, dt_max] pair",
                              "set model.scales: [[0.001, 0.1]] (one scale) or the paper's [[0.001, 0.1], [0.1, 1.0]]")


def uses_text(model_type: str, params: ModelParams) -> bool:
    """Whether a `model_type` model with `params` reads item text: sasrec_text always, M2Rec with use_text."""
    return model_type == "sasrec_text" or (model_type == "m2rec" and params.use_text)
