"""What the study runs: the base models, the arms (recipes), the training options of a budget,
and the parts (sets of runs sized to fit about two hours of a 2-core machine each).

A budget (base model x domain x layers trained x steps) is one `opt-deus compare` comparison,
kept in its own directory (Budget.name); its recipes are variants (an arm at a position, possibly
with another fusion weight) and its runs the variants x seeds (a seed fixes the data order). A
part names variants and seeds of some budgets; two parts adding variants to one budget
(budget-600, positions-600) add recipes to one comparison, and a run both name is trained once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from opt_deus_cli.training.options import TrainOptions

REPO = Path(__file__).resolve().parents[2]
ZERO = ["o_proj", "down_proj"]


@dataclass(frozen=True)
class BaseModel:
    name: str
    dir: Path
    count: int | str  # new layers, as a recipe's count
    eval_tokens: int  # size of the fixed held-out sample


MODELS = {
    "tiny-llama": BaseModel("tiny-llama", REPO / "examples" / "tiny-llama", "50%", 16384),
    # a forward pass of the 135M model costs ~25x the tiny one's: a smaller sample keeps evals affordable
    "smollm2-135m": BaseModel("smollm2-135m", REPO / "bench-out" / "models" / "smollm2-135m-instruct", 4, 4096),
}

# arm -> recipe without placement. Every arm but average, stack and lesa zero-initialises the two
# residual writers, so the deeper model starts as the base (function preserving).
ARMS = {
    "copy": {"method": "copy", "zero_init": ZERO},  # LLaMA-Pro: the lower neighbour k
    "upper-copy": {"method": "copy", "copy": {"neighbour": "upper"}, "zero_init": ZERO},  # the upper neighbour k+1
    # what the published semantics give when their plans underflow: 0.5 W_B in q/k/v/gate/up
    "half-upper": {"method": "copy", "copy": {"neighbour": "upper", "scale": 0.5}, "zero_init": ZERO},
    "opt-deus-exact": {"method": "opt-deus", "alignment": {"mode": "corrected", "solver": "exact"}, "zero_init": ZERO},
    "opt-deus-sinkhorn": {
        "method": "opt-deus",
        "alignment": {"mode": "corrected", "solver": "sinkhorn"},
        "zero_init": ZERO,
    },
    "opt-deus-reference": {"method": "opt-deus", "alignment": {"mode": "reference"}, "zero_init": ZERO},
    "average": {"method": "average", "fusion": {"alpha": 0.5}},  # AVG-DeUS: no zero-init
    "stack": {"method": "stack"},  # SOLAR; overlap chosen so that it adds as many layers as the others
    "lesa": {"method": "lesa"},
}
ALL_ARMS = tuple(ARMS)
MAIN_ARMS = ("copy", "upper-copy", "opt-deus-exact", "opt-deus-reference", "average")
POSITIONS = ("top", "bottom", "middle", "top-bottom")
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Variant:
    """An arm at a position; `alpha` replaces the arm's fusion weight (opt-deus only)."""

    arm: str
    position: str = "top"
    alpha: float | None = None

    @property
    def name(self) -> str:
        name = self.arm + ("" if self.position == "top" else f"@{self.position}")
        return name + ("" if self.alpha is None else f"-alpha{self.alpha:g}")

    @classmethod
    def parse(cls, name: str) -> Variant:
        alpha = None
        if "-alpha" in name:
            name, a = name.rsplit("-alpha", 1)
            alpha = float(a)
        arm, _, position = name.partition("@")
        return cls(arm, position or "top", alpha)

    def recipe(self, model: BaseModel, base_layers: int) -> dict:
        recipe = {**ARMS[self.arm]}
        if self.arm == "stack":
            # SOLAR [0, N-m) + [m, N) has 2(N-m) layers: as many new layers as the other arms when
            # m = (N - count) / 2 (8 -> 12 layers: m = 2)
            from opt_deus_cli.recipe import resolve_amount

            recipe["overlap"] = (base_layers - resolve_amount(model.count, base_layers)) // 2
        else:
            recipe |= {"positions": self.position, "count": model.count}
        if self.alpha is not None:
            recipe["fusion"] = {"alpha": self.alpha}
        return recipe


@dataclass(frozen=True)
class Budget:
    """One comparison: a regime (base model x domain) trained for `steps` steps, only the new
    layers or all of them; `evaluate` False: step-time runs without held-out evaluation."""

    model: str
    domain: str
    steps: int
    train: str = "new"  # new: only the new layers (the tool's default); all: every parameter
    evaluate: bool = True

    @property
    def name(self) -> str:
        """The comparison's directory, relative to the results directory."""
        kind = f"{self.train}-{self.steps}" + ("" if self.evaluate else "-timing")
        return f"{self.model}/{self.domain}/{kind}"


def train_options(budget: Budget, eval_file: Path | None) -> TrainOptions:
    """The training options every run of a budget shares (`opt-deus train`'s, through compare).
    One setting per regime, not tuned per arm: in-domain keeps the previous study's (lr 2e-4, the
    rate the base's pretraining ended at: a larger one first undoes the annealing); the new domain
    uses the setting of issue 14's probe (lr 5e-4). AdamW betas 0.9/0.95, weight decay 0.1, 10%
    warm-up, cosine to 10% of the peak, gradient clip 1.0, float32 on the CPU."""
    steps = budget.steps
    evaluate = budget.evaluate and eval_file is not None
    trainer_args = {
        "lr_scheduler_type": "cosine_with_min_lr",
        "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
        "warmup_steps": max(1, steps // 10),
        "weight_decay": 0.1,
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,
        "max_grad_norm": 1.0,
        "per_device_eval_batch_size": 16,
        "dataloader_num_workers": 0,
    }
    if evaluate:
        trainer_args["eval_on_start"] = True  # step 0: the deeper model as built
    return TrainOptions(
        train=budget.train,
        steps=steps,
        lr=2e-4 if budget.domain == "in-domain" else 5e-4,
        batch_size=8,
        seq_len=128,
        device="cpu",
        dtype="float32",
        eval_data=(eval_file,) if evaluate and eval_file else (),
        eval_every=(max(1, steps // 12) if steps >= 120 else max(1, steps // 3)) if evaluate else None,
        trainer_args=trainer_args,
    )


@dataclass(frozen=True)
class Comparison:
    """Variants x seeds of one budget; differences are taken against `reference`."""

    budget: Budget
    variants: tuple[str, ...]
    seeds: tuple[int, ...]

    @property
    def reference(self) -> str:
        return reference_of(self.variants)


def reference_of(variants) -> str:
    """copy (LLaMA-Pro) where a comparison has it; else its first variant."""
    return "copy" if "copy" in variants else next(iter(variants))


@dataclass(frozen=True)
class Part:
    name: str
    description: str
    comparisons: tuple[Comparison, ...]
    workers: int = 2  # runs at once (one torch thread each); 1 where step times are compared

    @property
    def runs(self) -> list[tuple[str, str, int]]:
        """(budget directory, variant, seed) of every run the part names."""
        return [(c.budget.name, v, s) for c in self.comparisons for s in c.seeds for v in c.variants]


SEEDS = (0, 1, 2)
TINY_NEW = Budget("tiny-llama", "new-domain", 600)
PARTS = {
    p.name: p
    for p in (
        Part(
            "methods-60",
            "every arm, both domains, 60 steps (tiny-llama)",
            tuple(Comparison(Budget("tiny-llama", d, 60), ALL_ARMS, SEEDS) for d in ("in-domain", "new-domain")),
        ),
        Part(
            "alpha-150",
            "opt-deus exact at fusion alpha 0 ... 1 next to copy and upper-copy, new domain, 150 steps",
            (
                Comparison(
                    Budget("tiny-llama", "new-domain", 150),
                    tuple(Variant("opt-deus-exact", alpha=a if a != 0.5 else None).name for a in ALPHAS)
                    + ("copy", "upper-copy"),
                    SEEDS,
                ),
            ),
        ),
        Part("budget-600", "the main five arms, new domain, 600 steps", (Comparison(TINY_NEW, MAIN_ARMS, SEEDS),)),
        Part(
            "positions-600",
            "opt-deus exact at the four positions, new domain, 600 steps",
            (Comparison(TINY_NEW, tuple(Variant("opt-deus-exact", p).name for p in POSITIONS), SEEDS),),
        ),
        Part(
            "timing",
            "step time of opt-deus exact per position, new layers vs all layers (one run at a time)",
            tuple(
                Comparison(
                    Budget("tiny-llama", "new-domain", 30, train=t, evaluate=False),
                    tuple(Variant("opt-deus-exact", p).name for p in POSITIONS),
                    SEEDS,
                )
                for t in ("new", "all")
            ),
            workers=1,
        ),
        Part(
            "smollm2",
            "SmolLM2-135M-Instruct, 4 new layers at the top, the main arms, new domain, 2 seeds",
            (Comparison(Budget("smollm2-135m", "new-domain", 90), MAIN_ARMS, (0, 1)),),  # evaluated at 0, 30, 60, 90
        ),
    )
}
