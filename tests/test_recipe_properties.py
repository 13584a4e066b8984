"""Property-based tests of the recipe parser and of position resolution: whatever a recipe says,
the result is a valid plan or a UsageError (a clean one-line message), never another exception."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from opt_deus_cli.errors import UsageError
from opt_deus_cli.layers import output_layers, resolve_positions
from opt_deus_cli.methods.opt_deus.settings import AlignmentSettings
from opt_deus_cli.methods.registry import method_names
from opt_deus_cli.recipe import NAMED_POSITIONS, Recipe, Slices, all_keys, load_recipe, parse_recipe, resolve_amount

METHODS = method_names()

# PROPERTY_EXAMPLES=5000 for a longer search than the suite's
PROPERTY = settings(
    max_examples=int(os.environ.get("PROPERTY_EXAMPLES", 300)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# anything YAML can hold
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
yaml_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

# values near the valid ones, so that many recipes parse and reach the planner
counts = (
    st.integers(-3, 50)
    | st.integers(0, 1200).map(lambda p: f"{p}%")
    | st.sampled_from(["50%", "0.5%", "%", "x%", "nan%", "1e2%", "10"])
)
position_values = st.sampled_from(NAMED_POSITIONS + ("topp", "")) | st.lists(st.integers(-2, 50), max_size=6)
slices = st.lists(st.lists(st.integers(-2, 50), min_size=1, max_size=3), max_size=4)
alignments = st.fixed_dictionaries(
    {},
    optional={
        "mode": st.sampled_from(["corrected", "reference", "other"]),
        "solver": st.sampled_from(["exact", "sinkhorn", "magic"]),
        "cost": st.sampled_from(["euclidean", "sqeuclidean", "cosine", "manhattan"]),
        "epsilon": st.floats() | st.integers(-2, 2),
        "max_iter": st.integers(-2, 5000) | st.booleans(),
        "tol": st.floats(),
        "epsilom": st.floats(0.01, 1),
    },
)
fusions = st.fixed_dictionaries(
    {}, optional={"alpha": st.floats() | st.integers(-1, 2) | st.text(max_size=3), "alpah": st.just(0.5)}
)
zero_inits = (
    st.lists(st.sampled_from(["o_proj", "down_proj", "q_proj", "gate_proj", "foo"]), max_size=3)
    | st.none()
    | st.just("o_proj")
)

recipe_dicts = st.fixed_dictionaries(
    {},
    optional={
        "method": st.sampled_from(METHODS + ("cpoy",)) | scalars,
        "positions": position_values | yaml_values,
        "count": counts | scalars,
        "zero_init": zero_inits,
        "overlap": counts,
        "slices": slices | yaml_values,
        "alignment": alignments | yaml_values,
        "fusion": fusions | yaml_values,
        "description": st.text(max_size=10) | scalars,
        "cuont": st.integers(),
    },
)


def parsed_or_usage_error(data) -> Recipe | None:
    try:
        recipe = parse_recipe(data, source="r.yaml")
    except UsageError as e:
        assert "\n" not in str(e) and str(e).startswith("recipe r.yaml")
        return None
    assert isinstance(recipe, Recipe)
    json.dumps(recipe.to_dict(), allow_nan=False)  # it goes to the manifest: strict JSON
    return recipe


@PROPERTY
@given(recipe_dicts)
def test_parse_is_a_recipe_or_a_usage_error(data):
    recipe = parsed_or_usage_error(data)
    if recipe is not None:
        assert recipe.method in METHODS
        assert set(data) <= all_keys()
        if "fusion" in recipe.settings:
            assert 0.0 <= recipe.settings["fusion"].alpha <= 1.0
        if "alignment" in recipe.settings:
            alignment = recipe.settings["alignment"]
            assert isinstance(alignment, AlignmentSettings) and alignment.epsilon > 0
            # nothing the mode or solver ignores was given, and the manifest records only what is used
            used = set(recipe.to_dict()["alignment"])
            assert set(data.get("alignment") or {}) <= used
            if alignment.mode == "reference":
                assert used == {"mode"}
            elif alignment.solver == "exact":
                assert not used & {"epsilon", "max_iter", "tol"}


@PROPERTY
@given(alignments)
def test_alignment_records_only_what_it_uses(alignment):
    """A setting the mode or solver ignores is refused, never recorded as if it had been used."""
    recipe = parsed_or_usage_error({"method": "opt-deus", "positions": "top", "count": 1, "alignment": alignment})
    if recipe is None:
        return
    settings, recorded = recipe.settings["alignment"], recipe.to_dict()["alignment"]
    assert set(alignment) <= set(recorded)
    if settings.mode == "reference":
        assert recorded == {"mode": "reference"}
    elif settings.solver == "exact":
        assert {"mode", "solver", "cost"} <= set(recorded) and not {"epsilon", "max_iter", "tol"} & set(recorded)
    else:
        assert {"mode", "solver", "cost", "epsilon", "max_iter", "tol"} <= set(recorded)


@PROPERTY
@given(yaml_values)
def test_parse_of_anything(data):
    parsed_or_usage_error(data)


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("recipes") / "r.yaml"  # module scope: one file, rewritten per example


@PROPERTY
@given(
    content=st.text(max_size=200)
    | recipe_dicts.map(lambda d: yaml.safe_dump(d, allow_unicode=True))
    | st.binary(max_size=50)
)
def test_load_of_any_file(recipe_path, content):
    path = recipe_path
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    try:
        recipe = load_recipe(str(path))
    except UsageError as e:
        assert "\n" not in str(e)  # the CLI prints it as one line
        return
    assert isinstance(recipe, Recipe)


def check_plan(recipe: Recipe, n: int, needs_upper: bool, layers) -> None:
    """What every plan promises: consecutive output indices, sources inside the model, and for
    the inserting methods every base layer once, in order, with new layers where asked."""
    assert [layer.index for layer in layers] == list(range(len(layers)))
    assert all(0 <= s < n for layer in layers for s in layer.sources)
    if isinstance(recipe.placement, Slices):
        return
    assert [layer.sources[0] for layer in layers if not layer.is_new] == list(range(n))
    placement = recipe.placement
    positions = resolve_positions(placement, n, needs_upper, "r.yaml")
    assert positions == sorted(set(positions))
    assert len(positions) == (
        len(placement.where) if isinstance(placement.where, tuple) else resolve_amount(placement.count, n)
    )
    new = [layer for layer in layers if layer.is_new]
    assert [layer.sources[0] for layer in new] == positions
    for layer in new:
        k = layer.sources[0]
        assert layer.sources == ((k, k + 1) if needs_upper else (k,))
        assert layers[layer.index - 1].sources == (k,) and not layers[layer.index - 1].is_new


# recipes of the right shape (mostly parsing) with any amounts and positions, for the planner
inserting = st.sampled_from(["copy", "average", "opt-deus"])
amounts = st.integers(-1, 24) | st.integers(0, 150).map(lambda p: f"{p}%")
layer_lists = st.lists(st.integers(-1, 30), min_size=1, max_size=8, unique=True)
plannable = (
    st.fixed_dictionaries({"method": inserting, "positions": st.sampled_from(NAMED_POSITIONS), "count": amounts})
    | st.fixed_dictionaries({"method": inserting, "positions": layer_lists})
    | st.fixed_dictionaries({"method": st.just("stack"), "overlap": amounts})
    | st.fixed_dictionaries(
        {
            "method": st.just("stack"),
            "slices": st.lists(st.lists(st.integers(-1, 30), min_size=2, max_size=2), min_size=1, max_size=4),
        }
    )
)


@PROPERTY
@given(plannable, st.integers(-1, 32), st.booleans())
def test_plan_is_valid_or_a_usage_error(data, n, needs_upper):
    recipe = parsed_or_usage_error(data)
    assume(recipe is not None)
    try:
        layers = output_layers(recipe.placement, n, recipe.method, needs_upper)
    except UsageError as e:
        assert "\n" not in str(e)
        return
    check_plan(recipe, n, needs_upper, layers)


@PROPERTY
@given(st.sampled_from(NAMED_POSITIONS), st.integers(1, 64), st.integers(1, 64), st.booleans())
def test_named_positions_fit_whenever_count_does(kind, n, count, needs_upper):
    """Any count up to the number of slots gives exactly `count` distinct positions in range."""
    recipe = parse_recipe({"method": "average" if needs_upper else "copy", "positions": kind, "count": count})
    slots = n - 1 if (needs_upper or kind != "uniform") else n
    if count > slots:
        with pytest.raises(UsageError):
            resolve_positions(recipe.placement, n, needs_upper, "r.yaml")
        return
    positions = resolve_positions(recipe.placement, n, needs_upper, "r.yaml")
    assert len(positions) == count and positions == sorted(set(positions))
    assert 0 <= positions[0] and positions[-1] < slots
    if kind == "uniform":  # spread out: no gap more than one group wider than another
        gaps = [b - a for a, b in zip([-1] + positions, positions)]
        assert max(gaps) - min(gaps) <= math.ceil(slots / count)
