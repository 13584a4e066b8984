"""YAML recipe -> validated Recipe. Everything a recipe may say is checked here, before any
weight is read; positions are resolved for a concrete model in plan.py."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import UsageError
from .methods.lesa import LesaSettings
from .ot import AlignmentSettings

METHODS = ("copy", "average", "stack", "opt-deus", "lesa")
NAMED_POSITIONS = ("top", "bottom", "middle", "top-bottom", "uniform")
RECIPE_KEYS = {
    "method", "positions", "count", "zero_init", "overlap", "slices",
    "alignment", "fusion", "lesa", "model", "output", "description",
}
# keys that only make sense for some methods
METHOD_KEYS = {
    "positions": ("copy", "average", "opt-deus", "lesa"),
    "count": ("copy", "average", "opt-deus", "lesa"),
    "overlap": ("stack",),
    "slices": ("stack",),
    "alignment": ("opt-deus",),
    "lesa": ("lesa",),
    "fusion": ("average", "opt-deus"),
}

Amount = int | str  # a layer count, or "NN%" of the base depth


@dataclass(frozen=True)
class Recipe:
    method: str
    positions: str | tuple[int, ...] = "top"
    count: Amount | None = None
    zero_init: tuple[str, ...] | None = None  # None: the method's default
    overlap: Amount | None = None
    slices: tuple[tuple[int, int], ...] | None = None
    alignment: AlignmentSettings = field(default_factory=AlignmentSettings)
    lesa: LesaSettings = field(default_factory=LesaSettings)
    alpha: float = 0.5
    model: str | None = None
    output: str | None = None
    description: str = ""
    source: str = "<inline>"  # where the recipe came from, for messages

    def to_dict(self) -> dict:
        """The recipe as recorded in the manifest (JSON types only)."""
        d: dict[str, Any] = {"method": self.method}
        if self.method == "stack":
            d["overlap"], d["slices"] = self.overlap, [list(s) for s in self.slices] if self.slices else None
        else:
            d["positions"] = list(self.positions) if isinstance(self.positions, tuple) else self.positions
            d["count"] = self.count
        d["zero_init"] = list(self.zero_init) if self.zero_init is not None else None
        if self.method in METHOD_KEYS["fusion"]:
            d["fusion"] = {"alpha": self.alpha}
        if self.method == "opt-deus":
            d["alignment"] = dataclasses.asdict(self.alignment)
        if self.method == "lesa":
            d["lesa"] = dataclasses.asdict(self.lesa)
        return d


def _closest(key: str, allowed) -> str:
    near = difflib.get_close_matches(key, sorted(allowed), n=1)
    return f" (did you mean {near[0]!r}?)" if near else f" (allowed: {', '.join(sorted(allowed))})"


def _check_keys(where: str, given: dict, allowed) -> None:
    for key in given:
        if key not in allowed:
            raise UsageError(f"{where}: unknown key {key!r}{_closest(str(key), allowed)}")


def _amount(where: str, value: Any, allow_zero: bool = False) -> Amount:
    """An int >= 1 (or >= 0), or a percentage string like '50%'."""
    if isinstance(value, bool):
        raise UsageError(f"{where}: expected a whole number or a percentage like '50%', got {value!r}")
    if isinstance(value, int):
        if value < (0 if allow_zero else 1):
            raise UsageError(f"{where}: must be {'>= 0' if allow_zero else '>= 1'}, got {value}")
        return value
    if isinstance(value, str) and value.endswith("%"):
        try:
            pct = float(value[:-1])
        except ValueError:
            pct = -1.0
        if not (0 < pct <= 1000):
            raise UsageError(f"{where}: percentage must be in (0%, 1000%], got {value!r}")
        return value
    raise UsageError(f"{where}: expected a whole number or a percentage like '50%', got {value!r}")


def resolve_amount(amount: Amount, base_layers: int) -> int:
    if isinstance(amount, int):
        return amount
    return round(base_layers * float(amount[:-1]) / 100)


def parse_recipe(data: Any, source: str = "<inline>") -> Recipe:
    where = f"recipe {source}"
    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a YAML mapping of keys (method, positions, count, ...), got {type(data).__name__}")
    _check_keys(where, data, RECIPE_KEYS)
    method = data.get("method")
    if method not in METHODS:
        raise UsageError(f"{where}: 'method' must be one of {', '.join(METHODS)}, got {method!r}")
    for key, methods in METHOD_KEYS.items():
        if key in data and method not in methods:
            raise UsageError(f"{where}: key {key!r} does not apply to method {method!r} (it is for {', '.join(methods)})")

    kw: dict[str, Any] = {"method": method, "source": source}
    for key in ("model", "output", "description"):
        if key in data and data[key] is not None:
            if not isinstance(data[key], str):
                raise UsageError(f"{where}: {key!r} must be a string, got {data[key]!r}")
            kw[key] = data[key]

    if method == "stack":
        if ("overlap" in data) == ("slices" in data):
            raise UsageError(f"{where}: method 'stack' needs exactly one of 'overlap' (layers dropped at the seam) or 'slices'")
        if "overlap" in data:
            kw["overlap"] = _amount(f"{where}: overlap", data["overlap"])
        else:
            kw["slices"] = _parse_slices(where, data["slices"])
    else:
        positions = data.get("positions", "top")
        if isinstance(positions, str):
            if positions not in NAMED_POSITIONS:
                raise UsageError(f"{where}: positions {positions!r} unknown{_closest(positions, NAMED_POSITIONS)}; or give a list of base layer indices")
            if "count" not in data:
                raise UsageError(f"{where}: positions {positions!r} needs 'count' (how many new layers, e.g. 8 or '50%')")
            kw["count"] = _amount(f"{where}: count", data["count"])
        elif isinstance(positions, list) and positions and all(isinstance(k, int) and not isinstance(k, bool) for k in positions):
            if len(set(positions)) != len(positions):
                raise UsageError(f"{where}: positions list has repeated indices: {positions}")
            if min(positions) < 0:
                raise UsageError(f"{where}: positions must be base layer indices >= 0, got {positions}")
            if "count" in data and _amount(f"{where}: count", data["count"]) != len(positions):
                raise UsageError(f"{where}: count {data['count']!r} disagrees with the {len(positions)} listed positions")
            positions = tuple(sorted(positions))
            kw["count"] = len(positions)
        else:
            raise UsageError(f"{where}: positions must be one of {', '.join(NAMED_POSITIONS)} or a non-empty list of integers, got {positions!r}")
        kw["positions"] = positions

    if "zero_init" in data:
        zi = data["zero_init"]
        if zi is None:
            zi = []
        if not isinstance(zi, list) or not all(isinstance(z, str) for z in zi):
            raise UsageError(f"{where}: zero_init must be a list of projection names like [o_proj, down_proj], got {zi!r}")
        kw["zero_init"] = tuple(zi)

    if "fusion" in data:
        fusion = data["fusion"]
        if not isinstance(fusion, dict):
            raise UsageError(f"{where}: fusion must be a mapping like {{alpha: 0.5}}")
        _check_keys(f"{where}: fusion", fusion, {"alpha"})
        alpha = fusion.get("alpha", 0.5)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise UsageError(f"{where}: fusion.alpha must be a number in [0, 1], got {alpha!r}")
        kw["alpha"] = float(alpha)

    if "alignment" in data:
        kw["alignment"] = _parse_alignment(where, data["alignment"])
    if "lesa" in data:
        kw["lesa"] = _parse_lesa(where, data["lesa"])
    return Recipe(**kw)


def _parse_slices(where: str, slices: Any) -> tuple[tuple[int, int], ...]:
    ok = isinstance(slices, list) and slices and all(
        isinstance(s, list) and len(s) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in s) for s in slices
    )
    if not ok:
        raise UsageError(f"{where}: slices must be a list of [start, end) base layer ranges, e.g. [[0, 24], [8, 32]]")
    for start, end in slices:
        if not 0 <= start < end:
            raise UsageError(f"{where}: slice [{start}, {end}) is empty or negative")
    return tuple((s, e) for s, e in slices)


def _parse_alignment(where: str, alignment: Any) -> AlignmentSettings:
    if not isinstance(alignment, dict):
        raise UsageError(f"{where}: alignment must be a mapping (mode, solver, cost, epsilon, max_iter, tol)")
    fields = {f.name: f for f in dataclasses.fields(AlignmentSettings)}
    _check_keys(f"{where}: alignment", alignment, fields)
    defaults = AlignmentSettings()
    values = {}
    for key, value in alignment.items():
        expected = type(getattr(defaults, key))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, expected):
            raise UsageError(f"{where}: alignment.{key} must be a {expected.__name__}, got {value!r}")
        values[key] = value
    settings = AlignmentSettings(**values)
    settings.validate()
    return settings


def _parse_lesa(where: str, lesa: Any) -> LesaSettings:
    if not isinstance(lesa, dict):
        raise UsageError(f"{where}: lesa must be a mapping (hidden, layers, epochs, steps, batch_size, lr, weight_decay, norm_loss, rank, copy_from, seed)")
    _check_keys(f"{where}: lesa", lesa, {f.name for f in dataclasses.fields(LesaSettings)})
    values = dict(lesa)
    for key in ("lr", "weight_decay", "norm_loss"):  # YAML `lr: 1` is an int
        if isinstance(values.get(key), int) and not isinstance(values[key], bool) and abs(values[key]) < 2**53:
            values[key] = float(values[key])
    return LesaSettings(**values).validate(where)


# ---- where recipes come from -------------------------------------------------------------

def shipped_recipes_dir() -> Path:
    """recipes/ of the source tree, or the copy installed inside the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "recipes", here.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    return Path(str(resources.files("opt_deus_cli"))) / "recipes"


def shipped_recipes() -> dict[str, Path]:
    d = shipped_recipes_dir()
    return {p.stem: p for p in sorted(d.glob("*.yaml"))} if d.is_dir() else {}


def load_recipe(name_or_path: str) -> Recipe:
    """A path to a YAML file, or the name of a shipped recipe (`top8`, `solar`, ...)."""
    path = Path(name_or_path)
    if not path.is_file():
        shipped = shipped_recipes()
        if name_or_path in shipped:
            path = shipped[name_or_path]
        elif path.suffix in (".yaml", ".yml") or "/" in name_or_path:
            raise UsageError(f"recipe file {name_or_path} not found")
        else:
            raise UsageError(f"no recipe file or shipped recipe named {name_or_path!r}{_closest(name_or_path, shipped)}; `opt-deus recipes` lists them")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e)  # ReaderError has `reason`
        raise UsageError(f"recipe {path} is not valid YAML{at}: {' '.join(str(problem).split())}")  # one line
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read recipe {path}: {e}")
    return parse_recipe(data, source=str(path))
