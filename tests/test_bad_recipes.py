"""Bad recipes through the real command line (recipe.py, settings.py): one line, exit 2, nothing
written; a recipe never runs code.

Split from test_reliability.py (issue 19); the command-line helpers are in conftest.py."""

from __future__ import annotations

import pytest

from conftest import (
    leftovers,
    refused,
    upscale,
    write_recipe,
)

# ---- bad recipes ---------------------------------------------------------------------------

BAD_RECIPES = [
    ("method: [copy\n", "not valid YAML at line"),
    ("method: copy\x1f\n", "not valid YAML: special characters"),
    ("- method: copy\n", "expected a YAML mapping"),
    ("", "expected a YAML mapping"),
    ("method: copy\npositions: top\ncuont: 2\n", "did you mean 'count'"),
    ("method: average\npositions: top\ncount: 1\nfusion: {alpah: 0.5}\n", "did you mean 'alpha'"),
    ("method: opt-deus\npositions: top\ncount: 1\nalignment: {epsilom: 0.1}\n", "did you mean 'epsilon'"),
    ("method: cpoy\npositions: top\ncount: 1\n", "'method' must be one of"),
    ("positions: top\ncount: 1\n", "'method' must be one of"),
    ("method: copy\npositions: top\ncount: many\n", "whole number or a percentage"),
    ("method: copy\npositions: top\ncount: 1.5\n", "whole number or a percentage"),
    ("method: copy\npositions: top\ncount: true\n", "whole number or a percentage"),
    ("method: copy\npositions: 3\n", "positions must be one of"),
    ("method: copy\npositions: [1, two]\n", "positions must be one of"),
    ("method: copy\npositions: []\n", "positions must be one of"),
    ("method: copy\npositions: [1]\ncount: true\n", "count"),
    ("method: copy\npositions: top\ncount: 1\nzero_init: o_proj\n", "zero_init must be a list"),
    ("method: copy\npositions: top\ncount: 1\nzero_init: [foo_proj]\n", "not a projection"),
    ("method: average\npositions: top\ncount: 1\nfusion: 0.5\n", "fusion must be a mapping"),
    (
        "method: opt-deus\npositions: top\ncount: 1\nalignment: {epsilon: small}\n",
        "alignment.epsilon must be a positive number",
    ),
    ("method: opt-deus\npositions: top\ncount: 1\nalignment: {solver: magic}\n", "solver"),
    ("method: copy\npositions: top\ncount: 1\ndescription: 5\n", "'description' must be a string"),
    ("method: copy\npositions: top\ncount: 1\noverlap: 2\n", "does not apply to method 'copy'"),
    ("method: copy\npositions: top\ncount: 0\n", "must be >= 1"),
    ("method: copy\npositions: top\ncount: -2\n", "must be >= 1"),
    ("method: copy\npositions: top\ncount: '0%'\n", "percentage"),
    ("method: copy\npositions: top\ncount: '1%'\n", "less than one layer"),
    ("method: stack\noverlap: 0\n", "must be >= 1"),
    ("method: stack\noverlap: 6\n", "must be between 1 and 5"),
    ("method: stack\nslices: [[3, 3]]\n", "empty or negative"),
    ("method: stack\nslices: [[0, 9]]\n", "goes past the 6 layers"),
    ("method: copy\npositions: [6]\n", "out of range"),
    ("method: copy\npositions: [-1]\n", ">= 0"),
    ("method: average\npositions: [5]\n", "out of range"),
    ("method: average\npositions: top\ncount: 6\n", "too large"),
    ("method: opt-deus\npositions: top\ncount: 1\nalignment: {epsilon: 0}\n", "epsilon must be a positive number"),
    ("method: opt-deus\npositions: top\ncount: 1\nalignment: {epsilon: -0.1}\n", "epsilon must be a positive number"),
    ("method: opt-deus\npositions: top\ncount: 1\nalignment: {epsilon: .nan}\n", "epsilon must be a positive number"),
    ("method: average\npositions: top\ncount: 1\nfusion: {alpha: -0.1}\n", "alpha must be a number in [0, 1]"),
    ("method: average\npositions: top\ncount: 1\nfusion: {alpha: 1.5}\n", "alpha must be a number in [0, 1]"),
    ("method: opt-deus\npositions: top\ncount: 1\nfusion: {alpha: .nan}\n", "alpha must be a number in [0, 1]"),
    ("method: average\npositions: top\ncount: 1\nfusion: {alpha: half}\n", "alpha must be a number in [0, 1]"),
    # settings the chosen mode or solver would ignore (and the manifest would record as if used)
    *[
        (
            f"method: opt-deus\npositions: top\ncount: 1\nalignment: {{mode: reference, {key}: {value}}}\n",
            f"alignment.{key} is not used: mode reference runs the published solver",
        )
        for key, value in (("solver", "sinkhorn"), ("max_iter", 10), ("tol", 0.1), ("cost", "cosine"), ("epsilon", 0.5))
    ],
    *[
        (
            f"method: opt-deus\npositions: top\ncount: 1\nalignment: {{solver: exact, {key}: {value}}}\n",
            f"alignment.{key} is not used: solver exact",
        )
        for key, value in (("max_iter", 10), ("tol", 0.1), ("epsilon", 0.5))
    ],
    (
        "method: opt-deus\npositions: top\ncount: 1\nalignment: {epsilon: 0.5}\n",
        "alignment.epsilon is not used: solver exact",
    ),
]


@pytest.mark.parametrize("text, message", BAD_RECIPES)
def test_bad_recipe_is_refused(model_factory, tmp_path, text, message):
    out = tmp_path / "out"
    refused(upscale(model_factory("llama"), out, recipe=write_recipe(tmp_path, text)), 2, message)
    assert leftovers(out) == []


def test_recipe_never_runs_code(model_factory, tmp_path):
    sentinel = tmp_path / "code-ran"
    text = f"method: !!python/object/apply:os.system ['touch {sentinel}']\npositions: top\ncount: 1\n"
    out = tmp_path / "out"
    refused(upscale(model_factory("llama"), out, recipe=write_recipe(tmp_path, text)), 2, "not valid YAML")
    assert not sentinel.exists() and leftovers(out) == []


def test_recipe_file_missing(model_factory, tmp_path):
    refused(upscale(model_factory("llama"), tmp_path / "out", recipe=tmp_path / "nope.yaml"), 2, "not found")
    refused(upscale(model_factory("llama"), tmp_path / "out", recipe="llama_pro"), 2, "did you mean 'llama-pro'")
