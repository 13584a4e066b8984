"""Method name -> class, imported on first use. Adding a method is a module plus one line here."""

from __future__ import annotations

import importlib
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Method

# recipe name -> "module (relative to this package):class"
_METHODS = {
    "copy": "copy:CopyMethod",  # LLaMA-Pro block expansion
    "stack": "copy:StackMethod",  # SOLAR depth up-scaling
    "average": "average:AverageMethod",  # AVG-DeUS
    "lesa": "lesa:LesaMethod",  # LESA
    "opt-deus": "opt_deus:OptDeusMethod",  # OpT-DeUS
}


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


@cache
def method_class(name: str) -> type[Method]:
    """The class of a registered method (KeyError for an unknown name: callers check names first)."""
    module, cls = _METHODS[name].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)
