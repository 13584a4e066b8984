"""matplotlib is the `plot` extra (issue 19): without it, `inspect --png` and the heatmaps of
`inspect --layer` are one line naming the extra, before any work, and nothing is written; the
rest of the CLI does not need it."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

WITHOUT_MATPLOTLIB = (
    "import sys; sys.modules['matplotlib'] = None; from opt_deus_cli.cli import app; sys.argv[0] = 'opt-deus'; app()"
)


def opt_deus_without_matplotlib(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_MATPLOTLIB, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )


def test_png_without_matplotlib_names_the_extra(tmp_path):
    png = tmp_path / "survey.png"
    result = opt_deus_without_matplotlib("inspect", "examples/tiny-llama", "--png", str(png))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: --png needs matplotlib, which is not installed: pip install 'opt-deus-cli[plot]'"]
    assert not png.exists() and list(tmp_path.iterdir()) == []


def test_the_rest_needs_no_matplotlib():
    result = opt_deus_without_matplotlib("recipes", "examples/tiny-llama", "--json")
    assert result.returncode == 0, result.stderr
    assert '"top-half"' in result.stdout
