"""The `opt-deus` command line: one module per command, parsing and printing only; the work
lives in the library modules. Importing a command module registers it on the app."""

from __future__ import annotations

# isort: off
# importing a command registers it: the order of these names is the order of the help
from . import upscale, inspect, verify, recipes, train, eval, compare, handoff  # noqa: F401

# isort: on
from .common import app

__all__ = ["app"]
