"""The `opt-deus` command line: one module per command, parsing and printing only; the work
lives in the library modules. Importing a command module registers it on the app."""

from __future__ import annotations

from . import compare, eval, handoff, inspect, recipes, train, upscale, verify  # noqa: F401  (registers the commands, in this order)
from .common import app

__all__ = ["app"]
