"""Recipe placement + base depth -> the output layers: for every output layer, where it comes from.

A new layer at position k sits between base layers k and k+1 (methods that build from the lower
neighbour alone may also use k = N-1: after the top layer, as LLaMA-Pro does)."""

from __future__ import annotations

import math

from .block import OutputLayer
from .errors import UsageError
from .recipe import Positions, Recipe, Slices, resolve_amount


def resolve_positions(placement: Positions, base_layers: int, needs_upper: bool, where: str) -> list[int]:
    """Base indices k after which a new layer goes, sorted; errors for impossible requests."""
    n = base_layers
    # Between-pair positions are k = 0..N-2. A method that builds from layer k alone may also
    # put a layer after the top one (k = N-1), as LLaMA-Pro's uniform expansion does.
    slots = n - 1 if needs_upper else n
    if isinstance(placement.where, tuple):
        bad = [k for k in placement.where if k >= slots]
        if bad:
            raise UsageError(
                f"{where}: position(s) {bad} out of range for a model of {n} layers (allowed 0..{slots - 1}"
                + ("; the method needs layers k and k+1)" if needs_upper else ")")
            )
        return list(placement.where)
    kind = placement.where
    if kind != "uniform":
        slots = n - 1  # top, bottom, middle, top-bottom name adjacent pairs
    count = resolve_amount(placement.count, n)
    if count < 1:
        raise UsageError(f"{where}: count {placement.count!r} is less than one layer for a model of {n} layers")
    if count > slots:
        raise UsageError(
            f"{where}: count {count} is too large for a model of {n} layers: at most {slots} new layers "
            f"with positions {kind!r}; lower count or list positions"
        )
    if kind == "top":  # pairs (N-1-c, N-c) ... (N-2, N-1)
        return list(range(slots - count, slots))
    if kind == "bottom":
        return list(range(count))
    if kind == "middle":
        start = (slots - count) // 2
        return list(range(start, start + count))
    if kind == "top-bottom":
        low = count // 2
        return list(range(low)) + list(range(slots - (count - low), slots))
    if kind == "uniform":  # LLaMA-Pro: after every group of slots/count layers
        return [math.ceil((g + 1) * slots / count) - 1 for g in range(count)]
    raise UsageError(f"{where}: unknown positions {kind!r}")


def resolve_slices(placement: Slices, base_layers: int, where: str) -> list[tuple[int, int]]:
    n = base_layers
    if placement.ranges is not None:
        for start, end in placement.ranges:
            if end > n:
                raise UsageError(f"{where}: slice [{start}, {end}) goes past the {n} layers of this model")
        return list(placement.ranges)
    m = resolve_amount(placement.overlap, n)
    if not 1 <= m < n:
        raise UsageError(
            f"{where}: overlap {placement.overlap!r} = {m} layers must be between 1 and {n - 1} for a model of {n} layers"
        )
    return [(0, n - m), (m, n)]  # SOLAR: drop the top m of copy 1 and the bottom m of copy 2


def output_layers(
    placement: Positions | Slices,
    base_layers: int,
    method: str,
    needs_upper: bool,
    where: str = "recipe",
    composition=None,
) -> list[OutputLayer]:
    """Every output layer in order. Slices: the first use of a base layer is that layer, a repeat
    is a new layer (a copy) of `method`. Positions: each base layer, and after the chosen ones a
    new layer of `method` built from (k, k+1), or from k alone when not needs_upper.
    `composition(sources)` gives a new layer's (base layer, weight) parts (Method.composition)."""
    layers: list[OutputLayer] = []
    if isinstance(placement, Slices):
        seen: set[int] = set()
        for start, end in resolve_slices(placement, base_layers, where):
            for j in range(start, end):
                origin = "new" if j in seen else "base"
                seen.add(j)
                layers.append(OutputLayer(len(layers), origin, (j,), "base" if origin == "base" else method))
        return layers
    positions = set(resolve_positions(placement, base_layers, needs_upper, where))
    for k in range(base_layers):
        layers.append(OutputLayer(len(layers), "base", (k,), "base"))
        if k in positions:
            sources = (k, k + 1) if needs_upper else (k,)
            parts = tuple(composition(sources)) if composition else ()
            layers.append(OutputLayer(len(layers), "new", sources, method, parts))
    return layers


def recipe_layers(recipe: Recipe, base_layers: int) -> list[OutputLayer]:
    """The output layers a recipe asks for in a model of this depth."""
    from .methods.registry import method_class

    # an instance: whether a method needs the upper neighbour may follow its settings (copy's
    # `neighbour`); constructing a method from settings imports no torch
    method = method_class(recipe.method).from_settings(recipe.settings)
    return output_layers(
        recipe.placement, base_layers, recipe.method, method.needs_upper, f"recipe {recipe.source}", method.composition
    )
