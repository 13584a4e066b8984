"""The same input gives the same bytes, for every kind of method (upscale.py end to end).

Split from test_reliability.py (issue 19); the command-line helpers are in conftest.py."""

from __future__ import annotations

import pytest

from conftest import result_of, upscale, write_recipe

# ---- determinism ---------------------------------------------------------------------------

OT_SINKHORN = "method: opt-deus\npositions: top\ncount: 2\nalignment: {solver: sinkhorn, epsilon: 0.1}\n"


@pytest.mark.parametrize("recipe", ["llama-pro", "solar", "average", "top-half", OT_SINKHORN])
def test_same_input_same_bytes(model_factory, tmp_path, recipe):
    if "\n" in recipe:
        recipe = write_recipe(tmp_path, recipe)
    base, out = model_factory("qwen3"), tmp_path / "out"
    assert upscale(base, out, recipe=recipe).exit_code == 0
    first = result_of(out)
    assert upscale(base, out, "--overwrite", recipe=recipe).exit_code == 0
    assert result_of(out) == first
