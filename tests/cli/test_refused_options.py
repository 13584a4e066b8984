"""Options that would do nothing are refused before any work (issue 23, item 8), and --png writes
the format its extension names."""

from __future__ import annotations

from typer.testing import CliRunner

from conftest import SHIPPED_MODEL as SHIPPED
from conftest import messages
from opt_deus_cli.cli import app

runner = CliRunner()


def refused(args: list, message: str) -> None:
    result = runner.invoke(app, [*map(str, args)])
    lines = messages(result.output)  # the error line, besides any progress lines
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (
        result.output
    )


def test_memory_budget_is_refused_where_no_method_uses_it(model_factory, tmp_path):
    base = model_factory("llama", layers=4)
    for recipe in ("llama-pro", "solar"):  # copy, and a slice recipe: no working memory to budget
        refused(
            ["upscale", base, "--recipe", recipe, "--out", tmp_path / "o", "--memory-budget", "4GB", "--device", "cpu"],
            "--memory-budget applies to method opt-deus",
        )
    assert not (tmp_path / "o").exists()
    # where it applies, it is used: too small a budget refuses the job, a large one runs it
    refused(
        [
            "upscale",
            base,
            "--recipe",
            "top-half",
            "--out",
            tmp_path / "o",
            "--memory-budget",
            "1KB",
            "--dry-run",
            "--device",
            "cpu",
        ],
        "more than the budget of 0 MB",
    )
    result = runner.invoke(
        app, ["upscale", str(base), "--recipe", "top-half", "--memory-budget", "16GB", "--dry-run", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output


def test_text_field_is_refused_with_plain_text_data(tmp_path):
    data = tmp_path / "a.txt"
    data.write_text("one document\n")
    refused(
        ["train", SHIPPED, "--data", data, "--out", tmp_path / "o", "--text-field", "body", "--train", "all"],
        "--text-field body names a column of .json/.jsonl/.parquet/.csv",
    )
    assert not (tmp_path / "o").exists()


def test_png_writes_the_format_its_extension_names(model_factory, tmp_path):
    base = model_factory("llama", layers=3)
    magic = {
        "a": b"\x89PNG",
        "a.png": b"\x89PNG",
        "a.jpg": b"\xff\xd8\xff",
        "a.JPEG": b"\xff\xd8\xff",
        "a.svg": b"<?xml",
        "a.pdf": b"%PDF",
    }
    for name, head in magic.items():
        result = runner.invoke(app, ["inspect", str(base), "--png", str(tmp_path / name), "--device", "cpu"])
        assert result.exit_code == 0, result.output
        assert (tmp_path / name).read_bytes().startswith(head), name
    for name in ("b.bmp", "b.raw", "b.html"):
        refused(
            ["inspect", base, "--png", tmp_path / name, "--device", "cpu"], "is not an image format matplotlib writes"
        )
        assert not (tmp_path / name).exists()
