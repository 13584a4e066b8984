"""What the study runs: the base models, the arms (recipes), the training settings of a regime,
and the parts (sets of runs sized to fit about two hours of a 2-core machine each).

A run is one deeper model (a variant: an arm at a position, possibly with another fusion weight)
trained with one seed (the data order) for a number of steps in one regime (base model x domain).
Runs are identified by all of that (RunSpec.key); a part only selects runs, so a run shared by two
parts (opt-deus-exact at the top, 600 steps) is trained once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
class RunSpec:
    model: str
    domain: str
    variant: str
    steps: int
    seed: int
    train: str = "new"  # new: only the new layers (the tool's default); all: every parameter
    evaluate: bool = True  # False: step-time runs, no held-out evaluation

    @property
    def regime(self) -> str:
        return f"{self.model}/{self.domain}"

    @property
    def key(self) -> str:
        """The run's result file, relative to the results directory."""
        kind = f"{self.train}-{self.steps}" + ("" if self.evaluate else "-timing")
        return f"runs/{self.model}/{self.domain}/{kind}/{self.variant}/seed{self.seed}.json"


def training_settings(spec: RunSpec) -> dict:
    """Everything a run's training depends on besides the variant and the seed. One setting per
    regime, not tuned per arm: in-domain keeps the previous study's (lr 2e-4, the rate the base's
    pretraining ended at: a larger one first undoes the annealing); the new domain uses the
    setting of issue 14's probe (lr 5e-4)."""
    lr = 2e-4 if spec.domain == "in-domain" else 5e-4
    eval_every = max(1, spec.steps // 12) if spec.steps >= 120 else max(1, spec.steps // 3)
    return {
        "lr": lr,
        "batch_size": 8,
        "seq_len": 128,
        "warmup_steps": max(1, spec.steps // 10),
        "schedule": "cosine to 10% of the peak",
        "weight_decay": 0.1,
        "adam_betas": [0.9, 0.95],
        "max_grad_norm": 1.0,
        "dtype": "float32",
        "device": "cpu",
        "eval_every": eval_every if spec.evaluate else None,
    }


@dataclass(frozen=True)
class Part:
    name: str
    description: str
    runs: tuple[RunSpec, ...]
    workers: int = 2  # runs at once (one torch thread each); 1 where step times are compared


def _runs(model, domain, variants, steps, seeds, **kw) -> tuple[RunSpec, ...]:
    # seed-major: a slowdown of the shared machine spreads over all variants alike
    return tuple(RunSpec(model, domain, v, steps, s, **kw) for s in seeds for v in variants)


SEEDS = (0, 1, 2)
PARTS = {
    p.name: p
    for p in (
        Part(
            "methods-60",
            "every arm, both domains, 60 steps (tiny-llama)",
            _runs("tiny-llama", "in-domain", ALL_ARMS, 60, SEEDS)
            + _runs("tiny-llama", "new-domain", ALL_ARMS, 60, SEEDS),
        ),
        Part(
            "alpha-150",
            "opt-deus exact at fusion alpha 0 ... 1 next to copy and upper-copy, new domain, 150 steps",
            _runs(
                "tiny-llama",
                "new-domain",
                [Variant("opt-deus-exact", alpha=a if a != 0.5 else None).name for a in ALPHAS]
                + ["copy", "upper-copy"],
                150,
                SEEDS,
            ),
        ),
        Part(
            "budget-600",
            "the main five arms, new domain, 600 steps",
            _runs("tiny-llama", "new-domain", MAIN_ARMS, 600, SEEDS),
        ),
        Part(
            "positions-600",
            "opt-deus exact at the four positions, new domain, 600 steps",
            _runs("tiny-llama", "new-domain", [Variant("opt-deus-exact", p).name for p in POSITIONS], 600, SEEDS),
        ),
        Part(
            "timing",
            "step time of opt-deus exact per position, new layers vs all layers (one run at a time)",
            tuple(
                RunSpec("tiny-llama", "new-domain", Variant("opt-deus-exact", p).name, 30, r, train=t, evaluate=False)
                for r in SEEDS
                for p in POSITIONS
                for t in ("new", "all")
            ),
            workers=1,
        ),
        Part(
            "smollm2",
            "SmolLM2-135M-Instruct, 4 new layers at the top, the main arms, new domain, 2 seeds",
            _runs("smollm2-135m", "new-domain", MAIN_ARMS, 90, (0, 1)),
        ),  # evaluated at 0, 30, 60, 90
    )
}
