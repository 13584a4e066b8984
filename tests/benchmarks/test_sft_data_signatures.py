"""The SFT study's data are byte-identical from one process to the next: a signature whose default
is a sentinel object (configparser's `_UNSET`, logging.shutdown's weakref list) rendered with its
memory address, so every build gave other train/held-out files and `opt-deus compare` (rightly)
refused to add a second seed to the first one's comparison."""

from __future__ import annotations

import configparser
import logging
import subprocess
import sys
from pathlib import Path

from benchmarks.sft.data import _signature

ROOT = Path(__file__).resolve().parents[2]
SENTINEL = object()


def f(x, default=SENTINEL):
    return x


def test_a_signature_carries_no_memory_address():
    assert _signature("f", f) == "`f(x, default=<object object>)`"
    for name, obj in [("get", configparser.RawConfigParser.get), ("shutdown", logging.shutdown)]:
        assert " at 0x" not in _signature(name, obj)


def test_two_processes_build_the_same_signature_text():
    code = (
        "import configparser, logging; from benchmarks.sft.data import _signature; "
        "print(_signature('get', configparser.RawConfigParser.get), _signature('shutdown', logging.shutdown))"
    )
    runs = [
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    ]
    assert runs[0] == runs[1] and "fallback=<object object>" in runs[0]
