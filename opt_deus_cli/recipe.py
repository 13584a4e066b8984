"""YAML recipe -> validated Recipe. Everything a recipe may say is checked here, before any
weight is read; positions are resolved for a concrete model in layers.py.

The parser is generic: a recipe names a method, where its layers go (the method's placement:
positions or slices), zero_init, model/output, and the settings blocks the method declares
(methods.base.Method.settings). It never names a method itself, and imports no torch."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import UsageError
from .hub import REPO_ID
from .methods.registry import method_class, method_names
from .settings import check_keys, closest, parse_settings, settings_dict

NAMED_POSITIONS = ("top", "bottom", "middle", "top-bottom", "uniform")
PLACEMENT_KEYS = {"positions": ("positions", "count"), "slices": ("overlap", "slices")}
COMMON_KEYS = ("method", "zero_init", "model", "output", "description")

Amount = int | str  # a layer count, or "NN%" of the base depth


@dataclass(frozen=True)
class Positions:
    """A new layer after each chosen base layer k (between k and k+1)."""

    where: str | tuple[int, ...] = "top"  # a named rule, or base layer indices (sorted)
    count: Amount | None = None

    def to_dict(self) -> dict:
        return {"positions": list(self.where) if isinstance(self.where, tuple) else self.where, "count": self.count}


@dataclass(frozen=True)
class Slices:
    """The output is ranges [start, end) of base layers one after another (SOLAR)."""

    overlap: Amount | None = None  # two copies, drop the top m of the first and the bottom m of the second
    ranges: tuple[tuple[int, int], ...] | None = None

    def to_dict(self) -> dict:
        return {"overlap": self.overlap, "slices": [list(s) for s in self.ranges] if self.ranges else None}


@dataclass(frozen=True)
class Recipe:
    method: str
    placement: Positions | Slices = field(default_factory=Positions)
    zero_init: tuple[str, ...] | None = None  # None: the method's default
    settings: dict[str, Any] = field(default_factory=dict)  # recipe key -> the method's settings dataclass
    model: str | None = None
    output: str | None = None
    description: str = ""
    source: str = "<inline>"  # where the recipe came from, for messages

    def to_dict(self) -> dict:
        """The recipe as recorded in the manifest (JSON types only)."""
        d: dict[str, Any] = {"method": self.method, **self.placement.to_dict()}
        d["zero_init"] = list(self.zero_init) if self.zero_init is not None else None
        d.update({key: settings_dict(value) for key, value in self.settings.items()})
        return d


def all_keys() -> set[str]:
    keys = set(COMMON_KEYS)
    for names in PLACEMENT_KEYS.values():
        keys |= set(names)
    for name in method_names():
        keys |= set(method_class(name).settings)
    return keys


def _amount(where: str, value: Any) -> Amount:
    """An int >= 1, or a percentage string like '50%'."""
    if isinstance(value, bool):
        raise UsageError(f"{where}: expected a whole number or a percentage like '50%', got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise UsageError(f"{where}: must be >= 1, got {value}")
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
        raise UsageError(
            f"{where}: expected a YAML mapping of keys (method, positions, count, ...), got {type(data).__name__}"
        )
    check_keys(where, data, all_keys())
    name = data.get("method")
    if name not in method_names():
        raise UsageError(f"{where}: 'method' must be one of {', '.join(method_names())}, got {name!r}")
    method = method_class(name)
    allowed = {*COMMON_KEYS, *PLACEMENT_KEYS[method.placement], *method.settings}
    for key in data:
        if key not in allowed:
            users = [
                m
                for m in method_names()
                if key in method_class(m).settings or key in PLACEMENT_KEYS[method_class(m).placement]
            ]
            raise UsageError(f"{where}: key {key!r} does not apply to method {name!r} (it is for {', '.join(users)})")

    kw: dict[str, Any] = {"method": name, "source": source}
    for key in ("model", "output", "description"):
        if key in data and data[key] is not None:
            if not isinstance(data[key], str):
                raise UsageError(f"{where}: {key!r} must be a string, got {data[key]!r}")
            kw[key] = data[key]
    kw["placement"] = _parse_slices(where, data) if method.placement == "slices" else _parse_positions(where, data)
    if "zero_init" in data:
        zi = data["zero_init"]
        if zi is None:
            zi = []
        if not isinstance(zi, list) or not all(isinstance(z, str) for z in zi):
            raise UsageError(
                f"{where}: zero_init must be a list of projection names like [o_proj, down_proj], got {zi!r}"
            )
        kw["zero_init"] = tuple(zi)
    kw["settings"] = {key: parse_settings(cls, data.get(key), where, key) for key, cls in method.settings.items()}
    return Recipe(**kw)


def _parse_positions(where: str, data: dict) -> Positions:
    positions = data.get("positions", "top")
    if isinstance(positions, str):
        if positions not in NAMED_POSITIONS:
            raise UsageError(
                f"{where}: positions {positions!r} unknown{closest(positions, NAMED_POSITIONS)}; or give a list of base layer indices"
            )
        if "count" not in data:
            raise UsageError(f"{where}: positions {positions!r} needs 'count' (how many new layers, e.g. 8 or '50%')")
        return Positions(positions, _amount(f"{where}: count", data["count"]))
    if (
        isinstance(positions, list)
        and positions
        and all(isinstance(k, int) and not isinstance(k, bool) for k in positions)
    ):
        if len(set(positions)) != len(positions):
            raise UsageError(f"{where}: positions list has repeated indices: {positions}")
        if min(positions) < 0:
            raise UsageError(f"{where}: positions must be base layer indices >= 0, got {positions}")
        if "count" in data and _amount(f"{where}: count", data["count"]) != len(positions):
            raise UsageError(f"{where}: count {data['count']!r} disagrees with the {len(positions)} listed positions")
        return Positions(tuple(sorted(positions)), len(positions))
    raise UsageError(
        f"{where}: positions must be one of {', '.join(NAMED_POSITIONS)} or a non-empty list of integers, got {positions!r}"
    )


def _parse_slices(where: str, data: dict) -> Slices:
    if ("overlap" in data) == ("slices" in data):
        raise UsageError(
            f"{where}: method {data['method']!r} needs exactly one of 'overlap' (layers dropped at the seam) or 'slices'"
        )
    if "overlap" in data:
        return Slices(overlap=_amount(f"{where}: overlap", data["overlap"]))
    slices = data["slices"]
    ok = (
        isinstance(slices, list)
        and slices
        and all(
            isinstance(s, list) and len(s) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in s)
            for s in slices
        )
    )
    if not ok:
        raise UsageError(f"{where}: slices must be a list of [start, end) base layer ranges, e.g. [[0, 24], [8, 32]]")
    for start, end in slices:
        if not 0 <= start < end:
            raise UsageError(f"{where}: slice [{start}, {end}) is empty or negative")
    return Slices(ranges=tuple((s, e) for s, e in slices))


# ---- where recipes come from -------------------------------------------------------------


def shipped_recipes_dir() -> Path:
    """The recipes shipped as package data (the checkout's top-level recipes/ links here)."""
    return Path(str(resources.files("opt_deus_cli"))) / "recipes"


def shipped_recipes() -> dict[str, Path]:
    d = shipped_recipes_dir()
    return {p.stem: p for p in sorted(d.glob("*.yaml"))} if d.is_dir() else {}


def load_recipe(name_or_path: str) -> Recipe:
    """A path to a YAML file, or the name of a shipped recipe (`top8`, `solar`, ...). Its relative
    `model:` and `output:` are resolved against the file's directory."""
    path = Path(name_or_path)
    if not path.is_file():
        shipped = shipped_recipes()
        if name_or_path in shipped:
            path = shipped[name_or_path]
        elif path.suffix in (".yaml", ".yml") or "/" in name_or_path:
            raise UsageError(f"recipe file {name_or_path} not found")
        else:
            raise UsageError(
                f"no recipe file or shipped recipe named {name_or_path!r}{closest(name_or_path, shipped)}; `opt-deus recipes` lists them"
            )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e)  # ReaderError has `reason`
        raise UsageError(f"recipe {path} is not valid YAML{at}: {' '.join(str(problem).split())}") from e  # one line
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read recipe {path}: {e}") from e
    recipe = parse_recipe(data, source=str(path))
    return replace(recipe, model=_beside(path, recipe.model, may_be_repo_id=True), output=_beside(path, recipe.output))


def _beside(recipe_path: Path, value: str | None, may_be_repo_id: bool = False) -> str | None:
    """A relative `model:` or `output:` is relative to the recipe file's directory (as paths in a
    config file usually are), not to wherever the command runs. A relative `model:` that names
    nothing there but reads as a Hub repo id (org/name) stays a repo id."""
    if value is None or Path(value).expanduser().is_absolute():
        return str(Path(value).expanduser()) if value is not None else None
    beside = recipe_path.absolute().parent / value
    if may_be_repo_id and not beside.exists() and REPO_ID.fullmatch(value):
        return value
    return str(beside)
