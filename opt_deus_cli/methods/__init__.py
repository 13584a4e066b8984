"""One module per method; make_method turns a recipe into the object that builds new layers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .average import AverageMethod
from .base import Method
from .copy import CopyMethod, StackMethod

if TYPE_CHECKING:  # recipe.py imports methods.lesa (LesaSettings): no import cycle at run time
    from ..recipe import Recipe


def make_method(recipe: Recipe) -> Method:
    if recipe.method == "copy":
        return CopyMethod()
    if recipe.method == "stack":
        return StackMethod()
    if recipe.method == "average":
        return AverageMethod(recipe.alpha)
    if recipe.method == "opt-deus":
        from .opt_deus import OptDeusMethod

        return OptDeusMethod(recipe.alignment, recipe.alpha)
    if recipe.method == "lesa":
        from .lesa import LesaMethod

        return LesaMethod(recipe.lesa)
    raise ValueError(f"unknown method {recipe.method}")
