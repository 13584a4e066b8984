"""The README keeps its promises: the command lines of "The commands" run as written on the demo
(in a directory laid out as the checkout after `make demo`: examples/ and out/demo), every other
`opt-deus` example names a real command with real options, and every document the code or the
README cites is in the repository."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from opt_deus_cli.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DEMO_SECTION = "## The commands"


def readme_commands() -> list[tuple[str, str]]:
    """(section, command) for the `opt-deus` lines of the README's fenced code blocks: comments
    removed, backslash continuations joined."""
    found, fenced, section, pending = [], False, "", ""
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif line.startswith("## ") and not fenced:
            section = line.strip()
        elif fenced and (pending or line.startswith("opt-deus ")):
            text = pending + " " + line.split("  #")[0].strip() if pending else line.split("  #")[0].strip()
            if text.endswith("\\"):
                pending = text[:-1].strip()
            else:
                found.append((section, text))
                pending = ""
    return found


def demo_commands() -> list[str]:
    return [command for section, command in readme_commands() if section == DEMO_SECTION]


def test_readme_has_the_commands():
    names = [command.split()[1] for command in demo_commands()]
    for command in ("upscale", "recipes", "inspect", "verify", "eval"):
        assert command in names, command


@pytest.mark.slow
def test_readme_commands_run_as_written_on_the_demo(tmp_path, monkeypatch):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (tmp_path / "out").mkdir()  # as `make demo` makes it
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for command in demo_commands():
        result = runner.invoke(app, shlex.split(command)[1:])
        assert result.exit_code == 0, f"README: {command}\n{result.output}"
    assert (tmp_path / "out" / "demo" / "opt-deus-manifest.json").is_file()


@pytest.mark.parametrize("command", [c for s, c in readme_commands() if s != DEMO_SECTION] or ["opt-deus --help"])
def test_other_readme_examples_name_real_options(command):
    """Examples elsewhere may name the reader's own files; click still parses every option they use
    (an unknown command or option fails before --help is honoured)."""
    result = CliRunner().invoke(app, [*shlex.split(command)[1:], "--help"])
    assert result.exit_code == 0, f"README: {command}\n{result.output}"


# a document path as messages and docs cite it: docs/method.md, BENCHMARKS.md (section numbers aside)
CITED = re.compile(r"\b((?:docs/)?[A-Za-z_][\w-]*\.md)\b")


def test_every_cited_document_ships():
    """Warnings once cited METHOD.md, which was not in the project."""
    sources = [*sorted((ROOT / "opt_deus_cli").rglob("*.py")), README]
    cited = {(source, name) for source in sources for name in CITED.findall(source.read_text())}
    outside = {"README.md", "report.md"}  # the output's model card; the report `opt-deus compare` writes
    missing = [
        f"{source.relative_to(ROOT)} cites {name}"
        for source, name in sorted(cited)
        if name not in outside and not (ROOT / name).is_file()
    ]
    assert not missing, missing
    assert any(name == "docs/method.md" for _, name in cited)
