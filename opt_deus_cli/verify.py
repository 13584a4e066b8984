"""`opt-deus verify`: does the deeper checkpoint do what its manifest promises?

Checks, in order: the output files are the ones the manifest recorded (sizes and sha256), and so
are the base's (the up-scaling read them; a changed base is a failed check), the config's depth
and per-layer lists match the manifest, both models load with transformers and run on a fixed
batch of token ids, and, for a function-preserving recipe, their logits agree within float
tolerance (for any other recipe the difference is reported as a measurement, not checked).
Optionally the perplexity of both on a text. Models are loaded one at a time, so memory holds one
model.

Exit codes (cli.verify): 0 the result is what the manifest promises, 1 checked and failed,
2 could not check (the arguments do not name a base, an output with its manifest, or a text)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import read_config, sha256_file
from .configs import load_hf_config
from .errors import OptDeusError, UsageError
from .manifest import Manifest, read_manifest
from .perplexity import TextTokens, context_window, text_perplexity, tokenize_text, window_starts

if TYPE_CHECKING:  # torch is imported by the checks that run models: argument errors come without it
    import torch

# logits are compared in float32; zeroed residual writers add exact zeros, so a function-
# preserving result agrees to rounding (relative to the logits' size)
RELATIVE_TOLERANCE = 1e-5


LOGIT_LENGTH = 48  # tokens per row of the logit check, unless the family has a sliding window
PAST_WINDOW = 64  # with a sliding window: this many tokens past it, so a wrong sliding/full type shows


def fixed_token_batch(vocab_size: int, batch: int = 2, length: int = LOGIT_LENGTH, seed: int = 0) -> torch.Tensor:
    import torch

    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def sliding_window(hf_config) -> int | None:
    """The attention window of the base's sliding layers; None when no layer slides (no window,
    or every layer_types entry is full attention, as in a Qwen2 with use_sliding_window false)."""
    window = getattr(hf_config, "sliding_window", None)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        return None
    types = getattr(hf_config, "layer_types", None)
    if isinstance(types, (list, tuple)) and "sliding_attention" not in types:
        return None
    if getattr(hf_config, "use_sliding_window", True) is False:
        return None
    return window


def logit_length(hf_config) -> tuple[int, int | None]:
    """(tokens per row of the logit check, the sliding window it covers or None): past the window
    where the family has one, within max_position_embeddings."""
    max_positions = getattr(hf_config, "max_position_embeddings", None) or 1 << 30
    window = sliding_window(hf_config)
    if window is None or window >= max_positions:  # nothing slides within the positions the model takes
        return min(LOGIT_LENGTH, max_positions), None
    return min(max(LOGIT_LENGTH, window + PAST_WINDOW), max_positions), window


def post_norm_warning(manifest: Manifest) -> str | None:
    """An output of an older opt-deus whose new layers zero o_proj/down_proj in front of a
    post-norm (Gemma 2/3): function-preserving, but the first training step wrecks it."""
    from .architectures import SUPPORTED

    arch = SUPPORTED.get(manifest.base.model_type)
    if arch is None or not arch.post_norms or manifest.training is not None:
        return None
    writers = tuple(arch.weight(role) for role in arch.post_norms if role in arch.projections)
    layers = [
        entry.index
        for entry in manifest.layers
        if entry.is_new and any(name.endswith(writers) for name in entry.zeroed)
    ]
    if not layers:
        return None
    norms = ", ".join(name.removesuffix(".weight") for name in arch.post_norms.values())
    return (
        f"new layers {', '.join(map(str, layers))} start with o_proj/down_proj at zero in front of {norms} "
        "(an output of an older opt-deus): the first training step will be unstable (a norm of a zero branch "
        "amplifies its gradient about 1/sqrt(eps) times; measured on Gemma-3-270M: loss 4.4 -> 27.7). "
        "Run `opt-deus upscale` again: it starts these branches at zero by the post-norm's scale instead"
    )


def load_model(model_dir: Path, device: torch.device, dtype: torch.dtype | str = "float32"):
    """The model in `model_dir` (safetensors, local files, no remote code) on `device`, in eval
    mode; dtype "auto" keeps the stored one."""
    import torch

    if dtype == "float32":
        dtype = torch.float32
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our output is one report, not transformers' bars
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, trust_remote_code=False, use_safetensors=True, local_files_only=True
        )
    except Exception as e:  # transformers raises many kinds; name the directory and the reason
        raise OptDeusError(
            f"transformers cannot load {model_dir}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
    return model.to(device).eval()


def _changed_files(directory: Path, entries, step=lambda: None) -> tuple[list[str], list[str]]:
    """The recorded files (name, bytes, sha256) missing from directory, and those changed."""
    missing, differing = [], []
    for entry in entries:
        step()
        path = directory / entry.name
        if not path.is_file():
            missing.append(entry.name)
        elif path.stat().st_size != entry.bytes or sha256_file(path) != entry.sha256:
            differing.append(entry.name)
    return missing, differing


def _names(names: list[str], limit: int = 3) -> str:
    """`a, b, c and 4 more`: a problem line stays short however many files it concerns."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_files(out_dir: Path, manifest: Manifest, step=lambda: None) -> list[str]:
    missing, differing = _changed_files(out_dir, manifest.output.files, step)
    return [f"{name} is missing" for name in missing] + [
        f"{name} differs from the file the manifest recorded" for name in differing
    ]


def check_base_files(base_dir: Path, manifest: Manifest, step=lambda: None) -> list[str]:
    """The base as the up-scaling read it: every file the manifest recorded, same size and sha256
    (a Hub cache's snapshot links are followed to their blobs). One line for all missing files and
    one for all changed ones: the reason is said once."""
    missing, differing = _changed_files(base_dir, manifest.base.files, step)
    problems = []
    if missing:
        plural = len(missing) > 1
        problems.append(
            f"base file{'s' if plural else ''} {_names(missing)} {'are' if plural else 'is'} missing from {base_dir}"
        )
    if differing:
        plural = len(differing) > 1
        problems.append(
            f"base file{'s' if plural else ''} {_names(differing)} {'differ' if plural else 'differs'} "
            "from what the up-scaling read: another model, or a changed base"
        )
    return problems


def check_arguments(base_dir: Path, out_dir: Path, text: Path | None) -> Manifest:
    """What verify needs before it can check anything; missing pieces are usage errors (exit 2)."""
    for role, directory in (("base model", base_dir), ("output", out_dir)):
        if not directory.is_dir():
            raise UsageError(
                f"{role} directory {directory} does not exist"
                if not directory.exists()
                else f"{role} {directory} is not a directory"
            )
    if not (base_dir / "config.json").is_file():
        raise UsageError(f"{base_dir} has no config.json; give the base model directory first, then the output")
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise UsageError(
            f"{out_dir} has no opt-deus manifest; give the up-scaled output second (`opt-deus verify BASE_DIR OUT_DIR`)"
        )
    if text is not None and not Path(text).is_file():
        raise UsageError(f"--text {text} is not a file")
    return manifest


def check_config(out_dir: Path, manifest: Manifest) -> list[str]:
    config = read_config(out_dir)
    n = manifest.output.num_layers
    problems = []
    if config.get("num_hidden_layers") != n:
        problems.append(f"config.json num_hidden_layers is {config.get('num_hidden_layers')}, manifest says {n}")
    for key in ("layer_types",):
        if isinstance(config.get(key), list) and len(config[key]) != n:
            problems.append(f"config.json {key} has {len(config[key])} entries for {n} layers")
    return problems


def verify(
    base_dir: Path | str, out_dir: Path | str, device: torch.device, text: Path | None = None, progress=None
) -> dict:
    """progress(description, done, total), if given, is called before each step: a file hashed,
    a model loaded or run, a perplexity window."""
    import torch

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    manifest = check_arguments(base_dir, out_dir, text)
    preserving = manifest.function_preserving
    base_config = read_config(base_dir)
    hf_config = load_hf_config(base_dir)
    text_tokens: TextTokens | None = tokenize_text(base_dir, text) if text else None
    windows = len(window_starts(text_tokens, context_window(hf_config))) if text_tokens is not None else 0
    total, done = len(manifest.output.files) + len(manifest.base.files) + 2 * (2 + windows), 0

    def step(description: str):
        def advance():
            nonlocal done
            if progress:
                progress(description, done, total)
            done += 1

        return advance

    problems = (
        check_files(out_dir, manifest, step("output: checking files (sha256)"))
        + check_base_files(base_dir, manifest, step("base: checking files (sha256)"))
        + check_config(out_dir, manifest)
    )
    report: dict = {
        "base": str(base_dir),
        "output": str(out_dir),
        "method": manifest.method,
        "function_preserving": preserving,
        "files_checked": {"output": len(manifest.output.files), "base": len(manifest.base.files)},
    }
    if manifest.training is not None:  # trained after the up-scaling: why the logits moved
        report["training_steps"] = manifest.training.get("steps")

    length, sliding = logit_length(hf_config)
    ids = fixed_token_batch(int(base_config["vocab_size"]), length=length).to(device)
    warning = post_norm_warning(manifest)
    report["warnings"] = [warning] if warning else []
    results = {}
    for name, directory in (("base", base_dir), ("output", out_dir)):
        step(f"{name}: loading")()
        try:
            model = load_model(directory, device)
        except OptDeusError as e:  # a model that does not load is a failed check, not a crash
            problems.append(str(e))
            continue
        step(f"{name}: logits on fixed token ids")()
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float().cpu()
        results[name] = {"logits": logits, "layers": model.config.num_hidden_layers}
        if text_tokens is not None:
            results[name]["perplexity"] = text_perplexity(
                model, text_tokens, device, step(f"{name}: perplexity on {Path(text).name}")
            )
        del model

    report["tokens"] = list(ids.shape)
    report["sliding_window"] = sliding  # the logit check's rows are longer than it, when not None
    if len(results) == 2:
        base_logits, out_logits = results["base"]["logits"], results["output"]["logits"]
        diff = (base_logits - out_logits).abs()
        tolerance = RELATIVE_TOLERANCE * (1.0 + base_logits.abs().max().item())
        report.update(
            {
                "base_layers": results["base"]["layers"],
                "output_layers": results["output"]["layers"],
                "max_abs_logit_diff": diff.max().item(),
                "mean_abs_logit_diff": diff.mean().item(),
                # checked against the tolerance only when the recipe promises the same function
                "tolerance": tolerance if preserving else None,
            }
        )
        if text_tokens is not None:
            report["text_tokens"] = len(text_tokens.token_ids)
            report["text_words"] = text_tokens.words
            report["perplexity"] = {
                name: results[name]["perplexity"]["token_perplexity"] for name in ("base", "output")
            }
            report["word_perplexity"] = {
                name: results[name]["perplexity"]["word_perplexity"] for name in ("base", "output")
            }
        if not torch.isfinite(out_logits).all():
            problems.append("the output model's logits contain NaN or Inf")
        if results["output"]["layers"] != manifest.output.num_layers:
            problems.append(
                f"the loaded output has {results['output']['layers']} layers, manifest says {manifest.output.num_layers}"
            )
        if preserving and report["max_abs_logit_diff"] > tolerance:
            problems.append(
                f"recipe is function-preserving but logits differ by up to {report['max_abs_logit_diff']:.3g} (tolerance {tolerance:.3g})"
            )
    if progress:
        progress("done", total, total)
    report["problems"] = problems
    report["ok"] = not problems
    return report


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2)
