"""`opt-deus train` (issue 11): freeze_base, the options and --args file, the data formats, and
runs of the real Trainer on the shipped tiny LLaMA up-scaled (8 -> 10 layers, tied embeddings,
bf16), checked from the saved files by this test's own reading, not by the code under test."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import SHIPPED_MODEL, checkpoint_tensors, load_model, messages
from opt_deus_cli.cli import app
from opt_deus_cli.errors import OptDeusError, UsageError
from opt_deus_cli.manifest import MANIFEST_FILE, read_manifest
from opt_deus_cli.recipe import parse_recipe
from opt_deus_cli.training import TrainOptions, freeze_base, train
from opt_deus_cli.training.data import build_blocks, check_files, load_tokenizer
from opt_deus_cli.training.options import merged_settings, read_args_file
from opt_deus_cli.training.save import TRAINING_FILE, check_saved
from opt_deus_cli.upscale import Options, upscale

SHIPPED = SHIPPED_MODEL
TEXT = (SHIPPED / "heldout.txt").read_text()
runner = CliRunner()


def in_layers(name: str, layers) -> bool:
    parts = name.split(".")
    return name.startswith("model.layers.") and int(parts[2]) in layers


@pytest.fixture(scope="module")
def upscaled(tmp_path_factory) -> Path:
    """The shipped model with two LLaMA-Pro copies on top: 8 -> 10 layers, new [8, 9]."""
    out = tmp_path_factory.mktemp("shipped") / "deeper"
    upscale(SHIPPED, parse_recipe({"method": "copy", "positions": [6, 7]}), out, Options(device="cpu"))
    assert read_manifest(out).trainable_layers == [7, 9]
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """A training file (the first 12 KB of the held-out text) and a small eval file."""
    d = tmp_path_factory.mktemp("corpus")
    (d / "train.txt").write_text(TEXT[:12000])
    (d / "eval.txt").write_text(TEXT[-3000:])
    return {"train": d / "train.txt", "eval": d / "eval.txt", "cache": d / "cache"}


# ---- freeze_base --------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_freeze_base_leaves_exactly_the_new_layers_trainable(model_factory, tmp_path, tied):
    out = tmp_path / "out"
    upscale(
        model_factory("qwen3", tied=tied),
        parse_recipe({"method": "copy", "positions": [0, 4]}),
        out,
        Options(device="cpu"),
    )
    new = read_manifest(out).trainable_layers
    assert new == [1, 6]
    model = load_model(out)
    names = freeze_base(model, out)
    expected = [n for n, _ in model.named_parameters() if in_layers(n, new)]
    assert names == expected and expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(expected)
    # layer 1 must not select layers 10-19 or the embeddings (tied to the head when tied=True)
    assert not model.get_input_embeddings().weight.requires_grad


def test_freeze_base_refuses_the_wrong_model(model_factory, tmp_path):
    base = model_factory("llama")
    out = tmp_path / "out"
    upscale(base, parse_recipe({"method": "copy", "positions": [2]}), out, Options(device="cpu"))
    with pytest.raises(OptDeusError, match=r"6 layers.*describes 7"):
        freeze_base(load_model(base), out)  # the base, not the deeper model
    with pytest.raises(OptDeusError, match=r"no opt-deus-manifest.json"):
        freeze_base(load_model(base), base)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["trainable_layers"] = []
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    model = load_model(out)
    with pytest.raises(OptDeusError, match="lists no trainable layers"):
        freeze_base(model, out)
    assert all(p.requires_grad for p in model.parameters())


# ---- options and the --args file ----------------------------------------------------------------


def test_args_file_keys_are_training_arguments_fields(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("weight_decay: 0.1\nactivation_checkpointing: true\nlr_scheduler_type: cosine\n")
    assert read_args_file(good) == {
        "weight_decay": 0.1,
        "activation_checkpointing": True,
        "lr_scheduler_type": "cosine",
    }
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rte: 0.1\nwarmup_steps: 3\n")
    with pytest.raises(UsageError) as caught:
        read_args_file(bad)
    assert "'learning_rte' (did you mean 'learning_rate'?)" in str(caught.value) and "\n" not in str(caught.value)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    with pytest.raises(UsageError, match="must be a mapping"):
        read_args_file(listed)


def test_flags_and_args_file_merge_without_conflicts(tmp_path):
    settings = merged_settings(TrainOptions(steps=5, lr=3e-4, trainer_args={"weight_decay": 0.1}), tmp_path)
    assert settings["max_steps"] == 5 and settings["learning_rate"] == 3e-4 and settings["weight_decay"] == 0.1
    assert settings["save_strategy"] == "no" and settings["per_device_train_batch_size"] == 8
    with pytest.raises(UsageError, match="--lr and learning_rate"):
        merged_settings(TrainOptions(lr=1e-3, trainer_args={"learning_rate": 1e-4}), tmp_path)
    with pytest.raises(UsageError, match="--steps and num_train_epochs"):
        merged_settings(TrainOptions(steps=3, trainer_args={"num_train_epochs": 2}), tmp_path)
    for options, message in (
        (TrainOptions(steps=3, epochs=1.0), "--steps and --epochs"),
        (TrainOptions(train="some"), "--train 'some'"),
        (TrainOptions(eval_every=2), "--eval-every needs --eval-data"),
        (TrainOptions(batch_size=0), "--batch-size must be an integer >= 1"),
    ):
        with pytest.raises(UsageError, match=message):
            options.check()


# ---- data -----------------------------------------------------------------------------------


def test_every_format_packs_the_same_token_stream(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tokenizer = load_tokenizer(SHIPPED)
    docs = [TEXT[:900], TEXT[900:2000], TEXT[2000:2600]]
    (tmp_path / "a.txt").write_text(docs[0])
    (tmp_path / "b.md").write_text(docs[1])
    (tmp_path / "c.txt").write_text(docs[2])
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    (tmp_path / "e.json").write_text(json.dumps([{"body": d} for d in docs]))
    pq.write_table(pa.table({"text": docs}), tmp_path / "f.parquet")
    stream = [t for d in docs for t in tokenizer(d)["input_ids"] + [tokenizer.eos_token_id]]
    bos = tokenizer.bos_token_id  # the shipped tokenizer starts a sequence with it: so does every block (issue 25)
    expected, start = [], 0
    while start < len(stream):
        take = 16 if stream[start] == bos else 15  # a document's own BOS, or one prepended
        if start + take > len(stream):
            break
        expected.append(stream[start : start + 16] if take == 16 else [bos, *stream[start : start + 15]])
        start += take
    cache = tmp_path / "cache"
    for files, field in (
        ([tmp_path / "a.txt", tmp_path / "b.md", tmp_path / "c.txt"], "text"),
        ([tmp_path / "d.jsonl"], "text"),
        ([tmp_path / "e.json"], "body"),
        ([tmp_path / "f.parquet"], "text"),
    ):
        blocks = build_blocks(check_files(files, "--data"), tokenizer, 16, field, "training data", cache_dir=cache)
        assert [b["input_ids"].tolist() for b in blocks] == expected, files
    with pytest.raises(OptDeusError, match=r"no 'text' column .*body"):
        build_blocks([tmp_path / "e.json"], tokenizer, 16, "text", "training data", cache_dir=cache)
    with pytest.raises(OptDeusError, match="fewer tokens than one block"):
        build_blocks([tmp_path / "c.txt"], tokenizer, 4096, "text", "training data", cache_dir=cache)
    (tmp_path / "g.xml").write_text("<text>hello</text>\n")
    with pytest.raises(UsageError, match="cannot tell the format"):
        check_files([tmp_path / "g.xml"], "--data")
    with pytest.raises(UsageError, match="does not exist"):
        check_files([tmp_path / "missing.txt"], "--data")


# ---- the run --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(upscaled, corpus, tmp_path_factory):
    """Two runs with the same seed (weight decay on, so a decay reaching frozen weights would show)."""
    runs = []
    for k in range(2):
        out = tmp_path_factory.mktemp(f"trained{k}") / "out"
        options = TrainOptions(
            steps=4,
            batch_size=2,
            seq_len=32,
            lr=1e-3,
            device="cpu",
            eval_data=(corpus["eval"],),
            eval_every=2,
            trainer_args={"weight_decay": 0.1},
            cache_dir=corpus["cache"],
        )
        runs.append((out, train(upscaled, [corpus["train"]], out, options)))
    return runs


@pytest.mark.slow
def test_train_new_keeps_every_base_tensor_bit_identical(upscaled, trained):
    out, record = trained[0]
    new = read_manifest(upscaled).trainable_layers
    before, after = checkpoint_tensors(upscaled), checkpoint_tensors(out)
    assert before.keys() == after.keys() and "lm_head.weight" not in after  # tied: stored once, as the input
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype == torch.bfloat16, name
        if not in_layers(name, new):
            assert torch.equal(after[name].view(torch.int16), tensor.view(torch.int16)), name
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(in_layers(n, new) for n in changed)
    assert {f"model.layers.{i}.mlp.down_proj.weight" for i in new} <= changed  # zero-initialised, now trained
    assert record["check"]["frozen_identical"] == sum(not in_layers(n, new) for n in before)


@pytest.mark.slow
def test_output_loads_and_carries_the_manifest_with_a_training_record(upscaled, trained, corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opt_deus_cli.verify import check_files as verify_files

    out, record = trained[0]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 10 and model.dtype == torch.bfloat16
    assert AutoTokenizer.from_pretrained(out)("def f")["input_ids"]
    manifest = read_manifest(out)
    assert manifest.training == json.loads(json.dumps(record))
    assert manifest.new_layers == read_manifest(upscaled).new_layers and manifest.function_preserving is False
    assert verify_files(out, manifest) == []  # the files the manifest lists are the ones written
    data = corpus["train"].read_bytes()
    assert record["data"] == [
        {"path": str(corpus["train"].resolve()), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    ]
    assert record["steps"] == 4 and record["tokens"] == 4 * 2 * 32 and record["world_size"] == 1
    assert record["trainable_layers"] == [7, 9] and record["train"] == "new"
    assert record["format"] == "text" and record["bos_per_block"] is True and record["loss_tokens"] == 4 * 2 * 31
    assert [row["step"] for row in record["history"] if "eval_loss" in row] == [2, 4]
    assert record["eval_loss"] == record["history"][-1]["eval_loss"] and record["final_loss"] > 0
    assert record["seconds"] > 0 and record["trainer_args"] == {"weight_decay": 0.1}
    assert not any(p.name.endswith(".trainer") for p in out.parent.iterdir())  # Trainer's work directory is gone


@pytest.mark.slow
def test_same_seed_same_run(trained):
    (out_a, a), (out_b, b) = trained
    assert a["history"] == b["history"]
    assert all(torch.equal(x, checkpoint_tensors(out_b)[n]) for n, x in checkpoint_tensors(out_a).items())


@pytest.mark.slow
def test_gradient_checkpointing_trains_the_new_layers_behind_frozen_embeddings(upscaled, corpus, trained, tmp_path):
    """Checkpointed blocks get no gradient when their input does not ask for one (frozen embeddings)."""
    options = TrainOptions(
        steps=4,
        batch_size=2,
        seq_len=32,
        lr=1e-3,
        device="cpu",
        cache_dir=corpus["cache"],
        trainer_args={
            "weight_decay": 0.1,
            "activation_checkpointing": True,
            "activation_checkpointing_kwargs": {"use_reentrant": True},
        },
    )
    record = train(upscaled, [corpus["train"]], tmp_path / "out", options)
    expected = [row["loss"] for row in trained[0][1]["history"] if "loss" in row]
    assert [row["loss"] for row in record["history"] if "loss" in row] == pytest.approx(expected, rel=1e-4)
    assert record["check"]["trained_changed"] > 0


@pytest.mark.slow
def test_check_fails_loudly_when_a_base_tensor_moved(upscaled, trained, tmp_path):
    out = trained[0][0]
    layers = set(read_manifest(upscaled).trainable_layers)
    frozen = lambda name: not in_layers(name, layers)  # noqa: E731
    doctored = tmp_path / "doctored"
    shutil.copytree(out, doctored)
    weights = checkpoint_tensors(doctored)
    weights["model.layers.3.self_attn.q_proj.weight"][0, 0] += 1
    save_file(weights, str(doctored / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(OptDeusError, match=r"base tensor model.layers.3.self_attn.q_proj.weight .* differs"):
        check_saved(upscaled, doctored, frozen)
    weights = checkpoint_tensors(out)
    weights["model.norm.weight"] = weights["model.norm.weight"].float()
    save_file(weights, str(doctored / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(OptDeusError, match=r"model.norm.weight was saved as .*float32"):
        check_saved(upscaled, doctored, frozen)


# ---- the command ----------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_train_new_needs_a_manifest_and_train_all_runs_without(corpus, tmp_path):
    result = runner.invoke(app, ["train", str(SHIPPED), "--data", str(corpus["train"]), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "no opt-deus-manifest.json" in result.output and "--train all" in result.output
    assert len(messages(result.output)) == 1 and not (tmp_path / "o").exists()  # besides progress lines
    result = runner.invoke(
        app,
        [
            "train",
            str(SHIPPED),
            "--data",
            str(corpus["train"]),
            str(corpus["eval"]),
            "--out",
            str(tmp_path / "o"),
            "--train",
            "all",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--device",
            "cpu",
            "--cache-dir",
            str(corpus["cache"]),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["train"] == "all" and record["trainable_parameters"] == record["total_parameters"]
    assert [Path(f["path"]).name for f in record["data"]] == ["train.txt", "eval.txt"]  # --data a b: both, in order
    assert json.loads((tmp_path / "o" / TRAINING_FILE).read_text()) == record
    before, after = checkpoint_tensors(SHIPPED), checkpoint_tensors(tmp_path / "o")
    assert before.keys() == after.keys() and all(after[n].dtype == before[n].dtype for n in before)
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])


@pytest.mark.slow
def test_cli_refuses_unknown_args_keys_and_bad_options(upscaled, corpus, tmp_path):
    args = tmp_path / "trainer.yaml"
    args.write_text("bf17: true\n")
    base = ["train", str(upscaled), "--data", str(corpus["train"]), "--out", str(tmp_path / "o")]
    for extra, message in (
        (["--args", str(args)], "'bf17' (did you mean 'bf16'?) is not a TrainingArguments or SFTConfig field"),
        (["--steps", "2", "--epochs", "1"], "--steps and --epochs"),
        (["--seq-len", "4096"], "exceeds the model's max_position_embeddings 256"),
        (["--device", "tpu"], "--device 'tpu' not understood"),
    ):
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 2, result.output
        lines = messages(result.output)  # besides progress lines
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert not (tmp_path / "o").exists()
