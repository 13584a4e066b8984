"""What a recipe may say about LESA (the `lesa:` block). Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass

from ...settings import check_settings, setting

COPY_FROM = ("first", "lower", "upper")


@dataclass(frozen=True)
class LesaSettings:
    """The recipe's `lesa:` block. Defaults are the authors' (see the module docstring)."""

    hidden: int = setting(256, minimum=1, doc="width of the predictor's hidden layers")
    layers: int = setting(3, minimum=1, doc="Linear layers in the predictor (ReLU between); 1 = a linear predictor")
    epochs: int = setting(10, minimum=1, doc="passes over the r * (L-2) training rows ...")
    steps: int | None = setting(None, minimum=1, doc="... or exactly this many optimiser steps instead")
    batch_size: int = setting(64, minimum=1)
    lr: float = setting(1e-3, above=0.0)
    weight_decay: float = setting(0.01, minimum=0.0, doc="AdamW's default, which the authors' code uses")
    norm_loss: float = setting(5e-4, minimum=0.0, maximum=1.0, doc="weight of the batch-norm matching term in the loss")
    rank: int | None = setting(None, minimum=1, doc="singular components kept; None = all (the authors' choice)")
    copy_from: str = setting(
        "first", choices=COPY_FROM, doc="where norms and biases come from: base layer 0, or neighbour k or k+1"
    )
    seed: int = setting(0, minimum=0)

    def __post_init__(self):
        check_settings(self)
