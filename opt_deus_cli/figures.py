"""Drawing, for every command that draws (inspect --png, eval --png, compare's report): matplotlib
is the `plot` extra, imported on first use, off-screen; a file is written in the format its
extension names."""

from __future__ import annotations

from pathlib import Path

from .errors import UsageError

PLOT_EXTRA = "pip install 'opt-deus-cli[plot]'"  # matplotlib: only drawing needs it


def require_matplotlib(what: str):
    """matplotlib, or one clear error naming the extra that installs it."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError(f"{what} needs matplotlib, which is not installed: {PLOT_EXTRA}") from None
    return matplotlib


def can_draw() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def pyplot(what: str = "--png"):
    """matplotlib.pyplot on the off-screen Agg backend."""
    matplotlib = require_matplotlib(what)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_format(path: Path, option: str = "--png") -> str:
    """The format the file's extension names (x.svg -> svg; no extension: png), when matplotlib
    writes it; else UsageError."""
    require_matplotlib(option)
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()  # png, jpg, svg, pdf, ... (raw/rgba: no header)
    written = sorted(f for f in formats if f not in ("raw", "rgba"))
    suffix = Path(path).suffix.lower().lstrip(".") or "png"
    if suffix not in written:
        raise UsageError(
            f"{option} {path}: .{suffix} is not an image format matplotlib writes; "
            f"end the name with one of .{', .'.join(written)}"
        )
    return suffix
