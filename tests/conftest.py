"""Tiny real architectures built with transformers and saved sharded, as a user's would be."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# tiny tensors: thread start-up costs more than it saves, and a shared machine makes it worse
torch.set_num_threads(1)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
MORE_FAMILIES = ("gemma2", "gemma3_text", "phi3", "mixtral", "qwen3_moe")
# what a tiny model of a family needs beyond the shared sizes
FAMILY_KWARGS = {
    "gemma2": dict(pad_token_id=0, eos_token_id=1, bos_token_id=2, sliding_window=8),
    "gemma3_text": dict(pad_token_id=0, eos_token_id=1, bos_token_id=2, sliding_window=8, sliding_window_pattern=2),
    "phi3": dict(pad_token_id=0, eos_token_id=1, bos_token_id=2),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24),
}


def make_model(path: Path, model_type: str, layers: int = 6, tied: bool = False, dtype=torch.bfloat16,
               shard: str | None = "60KB", seed: int = 0, **overrides) -> Path:
    """Save a random tiny model of a family (GQA: 4 query heads, 2 KV heads) to `path`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, vocab_size=97, max_position_embeddings=64,
                  tie_word_embeddings=tied)
    kwargs.update(FAMILY_KWARGS.get(model_type, {}))
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms away from 1 so averaging and copying are visible
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    model = model.to(dtype)
    model.save_pretrained(path, max_shard_size=shard) if shard else model.save_pretrained(path)
    return path


def load_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """model_factory(model_type, **kw) -> path; cached per argument set for the session."""
    cache: dict = {}

    def get(model_type: str = "llama", **kw) -> Path:
        key = (model_type, tuple(sorted((k, str(v)) for k, v in kw.items())))
        if key not in cache:
            cache[key] = make_model(tmp_path_factory.mktemp(model_type), model_type, **kw)
        return cache[key]

    return get
