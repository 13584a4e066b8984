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
import math
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import read_config, sha256_file
from .errors import OptDeusError, UsageError
from .manifest import Manifest, read_manifest

if TYPE_CHECKING:  # torch is imported by the checks that run models: argument errors come without it
    import torch

# logits are compared in float32; zeroed residual writers add exact zeros, so a function-
# preserving result agrees to rounding (relative to the logits' size)
RELATIVE_TOLERANCE = 1e-5


def fixed_token_batch(vocab_size: int, batch: int = 2, length: int = 48, seed: int = 0) -> torch.Tensor:
    import torch

    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def _load(model_dir: Path, device: torch.device):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our output is one report, not transformers' bars
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False,
                                                     use_safetensors=True, local_files_only=True)
    except Exception as e:  # transformers raises many kinds; name the directory and the reason
        raise OptDeusError(f"transformers cannot load {model_dir}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return model.to(device).eval()


def _perplexity(model, token_ids: list[int], window: int, device: torch.device) -> float:
    """exp(mean next-token loss) over non-overlapping windows of the text."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(token_ids) - 1, window):
            chunk = torch.tensor(token_ids[start:start + window + 1], device=device)[None]
            if chunk.shape[1] < 2:
                break
            logits = model(input_ids=chunk[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
            total, count = total + loss.item(), count + chunk.shape[1] - 1
    return math.exp(total / count)


def _tokenize(model_dir: Path, text_file: Path) -> list[int]:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True)
    except Exception as e:
        raise UsageError(f"{model_dir} has no usable tokenizer for --text ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    try:
        text = Path(text_file).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read --text {text_file}: {e}")
    hf_logging.set_verbosity_error()  # the text is scored in windows: its length is no problem
    ids = tokenizer(text)["input_ids"]
    if len(ids) < 2:
        raise UsageError(f"--text {text_file} has fewer than two tokens")
    return ids


def _changed_files(directory: Path, entries, missing, differs) -> list[str]:
    """Each recorded file (name, bytes, sha256) missing from directory or changed, said by
    missing(name) or differs(name)."""
    problems = []
    for entry in entries:
        path = directory / entry.name
        if not path.is_file():
            problems.append(missing(entry.name))
        elif path.stat().st_size != entry.bytes or sha256_file(path) != entry.sha256:
            problems.append(differs(entry.name))
    return problems


def check_files(out_dir: Path, manifest: Manifest) -> list[str]:
    return _changed_files(out_dir, manifest.output.files, lambda name: f"{name} is missing",
                          lambda name: f"{name} differs from the file the manifest recorded")


def check_base_files(base_dir: Path, manifest: Manifest) -> list[str]:
    """The base as the up-scaling read it: every file the manifest recorded, same size and sha256
    (a Hub cache's snapshot links are followed to their blobs)."""
    return _changed_files(base_dir, manifest.base.files, lambda name: f"base file {name} is missing from {base_dir}",
                          lambda name: f"base file {name} differs from the one the up-scaling read (sha256 in "
                          "the manifest): the base changed, or this is another model")


def check_arguments(base_dir: Path, out_dir: Path, text: Path | None) -> Manifest:
    """What verify needs before it can check anything; missing pieces are usage errors (exit 2)."""
    for role, directory in (("base model", base_dir), ("output", out_dir)):
        if not directory.is_dir():
            raise UsageError(f"{role} directory {directory} does not exist" if not directory.exists()
                             else f"{role} {directory} is not a directory")
    if not (base_dir / "config.json").is_file():
        raise UsageError(f"{base_dir} has no config.json; give the base model directory first, then the output")
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise UsageError(f"{out_dir} has no opt-deus manifest; give the up-scaled output second "
                         "(`opt-deus verify BASE_DIR OUT_DIR`)")
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


def verify(base_dir: Path | str, out_dir: Path | str, device: torch.device, text: Path | None = None) -> dict:
    import torch

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    manifest = check_arguments(base_dir, out_dir, text)
    preserving = manifest.function_preserving
    problems = check_files(out_dir, manifest) + check_base_files(base_dir, manifest) + check_config(out_dir, manifest)
    report: dict = {"base": str(base_dir), "output": str(out_dir), "method": manifest.method,
                    "function_preserving": preserving,
                    "files_checked": {"output": len(manifest.output.files), "base": len(manifest.base.files)}}

    base_config = read_config(base_dir)
    ids = fixed_token_batch(int(base_config["vocab_size"])).to(device)
    token_ids = _tokenize(base_dir, text) if text else None
    window = min(int(base_config.get("max_position_embeddings") or 512), 512)
    results = {}
    for name, directory in (("base", base_dir), ("output", out_dir)):
        try:
            model = _load(directory, device)
        except OptDeusError as e:  # a model that does not load is a failed check, not a crash
            problems.append(str(e))
            continue
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float().cpu()
        results[name] = {"logits": logits, "layers": model.config.num_hidden_layers}
        if token_ids is not None:
            results[name]["perplexity"] = _perplexity(model, token_ids, window, device)
        del model

    report["tokens"] = list(ids.shape)
    if len(results) == 2:
        base_logits, out_logits = results["base"]["logits"], results["output"]["logits"]
        diff = (base_logits - out_logits).abs()
        tolerance = RELATIVE_TOLERANCE * (1.0 + base_logits.abs().max().item())
        report.update({
            "base_layers": results["base"]["layers"],
            "output_layers": results["output"]["layers"],
            "max_abs_logit_diff": diff.max().item(),
            "mean_abs_logit_diff": diff.mean().item(),
            # checked against the tolerance only when the recipe promises the same function
            "tolerance": tolerance if preserving else None,
        })
        if token_ids is not None:
            report["text_tokens"] = len(token_ids)
            report["perplexity"] = {"base": results["base"]["perplexity"], "output": results["output"]["perplexity"]}
        if not torch.isfinite(out_logits).all():
            problems.append("the output model's logits contain NaN or Inf")
        if results["output"]["layers"] != manifest.output.num_layers:
            problems.append(f"the loaded output has {results['output']['layers']} layers, manifest says {manifest.output.num_layers}")
        if preserving and report["max_abs_logit_diff"] > tolerance:
            problems.append(f"recipe is function-preserving but logits differ by up to {report['max_abs_logit_diff']:.3g} (tolerance {tolerance:.3g})")
    report["problems"] = problems
    report["ok"] = not problems
    return report


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2)
