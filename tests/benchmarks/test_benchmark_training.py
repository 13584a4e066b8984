"""Fast checks (seconds) for benchmarks/training.py on a tiny LLaMA."""

import re

import pytest
import torch

from benchmarks import training as T  # the checkout's root is on the path (pyproject.toml: pythonpath)

FROZEN_REGEX = r"^model\.layers\.(?:2|3)\."


def tiny_llama(layers=4, vocab=64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def pattern_blocks(n, length=32, vocab=64, seed=0):
    # Learnable synthetic data: each block is a window of a fixed periodic
    # sequence at a random offset, so next-token loss can drop quickly.
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(3, vocab, (17,), generator=g).repeat(8)
    offs = torch.randint(0, 17, (n,), generator=g)
    return torch.stack([base[o : o + length] for o in offs.tolist()])


def test_split_is_by_file_deterministic_and_disjoint():
    paths = T.stdlib_paths()
    assert len(paths) > 100 and paths == T.stdlib_paths()
    assert not any(p.split("/")[0] in ("site-packages", "test") for p in paths)
    held = {p for p in paths if T.is_heldout(p)}
    assert 0 < len(held) < 0.15 * len(paths)

    a = T.load_corpus(max_bytes=300_000)
    b = T.load_corpus(max_bytes=300_000)
    assert a == b  # deterministic, including the size cap
    train_p = [p for p, _ in a.train]
    held_p = [p for p, _ in a.heldout]
    assert train_p and held_p
    assert not set(train_p) & set(held_p)  # whole files on one side only
    assert all(p in held for p in held_p) and not any(p in held for p in train_p)
    total = sum(len(t.encode()) for t in a.train_texts + a.heldout_texts)
    assert total < 300_000 + 2 * T.MAX_FILE_BYTES


def test_tokenizer_round_trips_and_loads_with_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    corpus = T.load_corpus(max_bytes=150_000)
    tok = T.train_tokenizer(corpus.train_texts, vocab_size=400)
    assert tok.get_vocab_size() == 400
    text = 'def f(x):\n\tif x:  # naïve ✓\n        return "a\\n" * 3\n\n\n'
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text

    T.save_tokenizer(tok, tmp_path, model_max_length=64)
    hf = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (T.BOS, T.EOS, T.PAD)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    ids = hf(text).input_ids
    assert ids[0] == hf.bos_token_id  # LLaMA-style BOS is prepended
    assert hf.decode(ids, skip_special_tokens=True) == text

    stream = T.encode_documents(tok, ["a = 1\n", "b = 2\n"])
    assert stream[0] == 0 and stream[-1] == 1 and (stream == 0).sum() == 2


def test_blocks_and_sampler():
    blocks = T.make_blocks(torch.arange(103), 10)
    assert blocks.shape == (10, 10) and blocks[1, 0] == 10
    take = lambda s: [next(s).tolist() for _ in range(7)]  # noqa: E731  (crosses an epoch)
    a, b = take(T.batch_sampler(10, 3, seed=1)), take(T.batch_sampler(10, 3, seed=1))
    assert a == b and a != take(T.batch_sampler(10, 3, seed=2))
    epoch = [i for part in a[:3] for i in part]
    assert sorted(epoch) == sorted(set(epoch))  # no repeats within an epoch


def test_loss_decreases_and_is_deterministic():
    blocks = pattern_blocks(64)
    train_b, held_b = blocks[:48], blocks[48:]
    runs = []
    for _ in range(2):
        h = T.train(tiny_llama(layers=2), train_b, held_b, steps=15, lr=1e-2, batch_size=8, seed=0, eval_every=5)
        runs.append(h)
    h = runs[0]
    assert h["eval_steps"] == [0, 5, 10, 15]
    assert len(h["train_loss"]) == 15 and h["sec_per_step"] > 0
    assert h["heldout_loss"][-1] < h["heldout_loss"][0] - 1.0
    assert T.heldout_loss(tiny_llama(layers=2), held_b) == pytest.approx(h["heldout_loss"][0])
    assert runs[0]["train_loss"] == runs[1]["train_loss"]
    assert runs[0]["heldout_loss"] == runs[1]["heldout_loss"]


def test_only_regex_matched_parameters_change():
    model = tiny_llama(layers=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    blocks = pattern_blocks(24)
    h = T.train(model, blocks[:16], blocks[16:], steps=3, lr=1e-2, batch_size=4, seed=0, trainable_regex=FROZEN_REGEX)
    expected = {n for n in before if re.search(FROZEN_REGEX, n)}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert expected and len(expected) < len(before)
    assert changed == expected
    assert set(h["trainable"]) == expected
    assert h["n_trainable"] == sum(before[n].numel() for n in expected)

    with pytest.raises(ValueError):
        T.set_trainable(model, r"^no_such_param")
