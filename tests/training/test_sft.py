"""Supervised fine-tuning (issue 20): `opt-deus train` on chat, prompt-completion and alpaca rows
through TRL's SFTTrainer. The labels the trainer sees are compared with the completion / assistant
spans this test finds itself (by rendering the prompt alone with the tokenizer), a run with noise
prompts and one fixed completion must learn the completion, the base tensors stay bit-identical,
and each bad input is one line with nothing written."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import (
    ROOT,
    checkpoint_tensors,
    load_model,
    make_model,
    messages,
)
from opt_deus_cli.cli import app
from opt_deus_cli.errors import UsageError
from opt_deus_cli.manifest import read_manifest
from opt_deus_cli.recipe import parse_recipe
from opt_deus_cli.training import TrainOptions, sft, train
from opt_deus_cli.training.formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT
from opt_deus_cli.upscale import Options, upscale

SHIPPED = ROOT / "examples" / "tiny-llama"
runner = CliRunner()

# A ChatML-like template written for this test (the shipped model has none): the assistant's text
# and its end token inside {% generation %}, so TRL can mask everything else.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>\n"
    "{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}\n"
    "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
NO_MARKERS = TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")


@pytest.fixture(scope="module")
def deeper(tmp_path_factory) -> Path:
    """A small random LLaMA with the shipped tokenizer (BOS 0, EOS 1, PAD 2), 4 -> 6 layers (new 3 and 5)."""
    d = tmp_path_factory.mktemp("sft")
    base = make_model(
        d / "base",
        "llama",
        layers=4,
        vocab_size=4096,
        max_position_embeddings=256,
        tied=True,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    model = load_model(base)
    with torch.no_grad():  # a tied head of std 0.02 bounds every logit near 0: nothing could be learnt confidently
        model.get_input_embeddings().weight.mul_(25)
    model.to(torch.bfloat16).save_pretrained(base, max_shard_size="60KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SHIPPED / name, base / name)
    out = d / "deeper"
    upscale(base, parse_recipe({"method": "copy", "positions": [2, 3]}), out, Options(device="cpu"))
    assert read_manifest(out).trainable_layers == [3, 5]
    (d / "template.jinja").write_text(TEMPLATE)
    return out


def tokenizer_with_template():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CHATS = [
    [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": f"square of {i}?"},
        {"role": "assistant", "content": f"{i * i}"},
        {"role": "user", "content": "and the cube?"},
        {"role": "assistant", "content": f"{i**3}, as {i} * {i} * {i}"},
    ]
    for i in range(2, 10)
]


def expected_chat(messages: list[dict], tokenizer) -> tuple[list[int], list[bool]]:
    """input ids and which of them carry loss: each assistant turn's tokens, from the end of the
    conversation rendered up to its generation prompt to the end of it rendered with the turn."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    loss = [False] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(
                tokenizer.apply_chat_template(
                    messages[:k], add_generation_prompt=True, tokenize=True, return_dict=True
                )["input_ids"]
            )
            end = len(tokenizer.apply_chat_template(messages[: k + 1], tokenize=True, return_dict=True)["input_ids"])
            loss[start:end] = [True] * (end - start)
    return ids, loss


def spy_on_batches(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every training batch's (input_ids, labels) as the trainer of `train()` computes its loss on them."""
    seen = []
    original = sft._trainer_class

    def spying():
        class Spy(original()):
            def compute_loss(self, model, inputs, *args, **kwargs):
                if model.training:
                    seen.append((inputs["input_ids"].clone(), inputs["labels"].clone()))
                return super().compute_loss(model, inputs, *args, **kwargs)

        return Spy

    monkeypatch.setattr(sft, "_trainer_class", spying)
    return seen


def check_rows_against(seen, expected: dict[tuple, list[bool]], pad: int) -> int:
    """Each trained row is one expected example then padding; its labels are its ids exactly where
    the example's tokens carry loss, -100 elsewhere. Returns the rows checked."""
    rows = 0
    for ids, labels in seen:
        for row_ids, row_labels in zip(ids.tolist(), labels.tolist()):
            match = [
                key
                for key in expected
                if tuple(row_ids[: len(key)]) == key and all(t == pad for t in row_ids[len(key) :])
            ]
            assert len(match) == 1, row_ids
            key, loss = match[0], expected[match[0]]
            want = [t if carries else -100 for t, carries in zip(key, loss)] + [-100] * (len(row_ids) - len(key))
            assert row_labels == want
            rows += 1
    return rows


# ---- the loss mask ---------------------------------------------------------------------------


@pytest.mark.slow
def test_chat_labels_are_exactly_the_assistant_turns(deeper, tmp_path, monkeypatch):
    data = write_rows(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS])
    seen = spy_on_batches(monkeypatch)
    record = train(
        deeper,
        [data],
        tmp_path / "out",
        TrainOptions(
            steps=2,
            batch_size=4,
            seq_len=128,
            device="cpu",
            chat_template=str(deeper.parent / "template.jinja"),
            cache_dir=tmp_path / "cache",
        ),
    )
    tokenizer = tokenizer_with_template()
    expected = {tuple(ids): loss for ids, loss in (expected_chat(m, tokenizer) for m in CHATS)}
    assert check_rows_against(seen, expected, tokenizer.pad_token_id) == 8
    # the system and user turns are in the inputs and never in the loss; both assistant turns are
    assert all(sum(loss) > 0 and not all(loss) for loss in expected.values())
    assert record["format"] == "chat" and record["loss_on"] == "completion" and record["examples"] == 8
    assert record["loss_tokens"] == sum(sum(loss[1:]) for loss in expected.values())  # one epoch of 8 in 2 x 4
    assert (
        record["tokens"] == sum(len(k) for k in expected)
        and record["train_examples"]["examples_starting_with_bos"] == 8
    )


@pytest.mark.slow
def test_prompt_completion_and_alpaca_labels_are_exactly_the_completion(deeper, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED)
    pairs = [(f"# the square of {i}\n", f"{i * i}\n") for i in range(2, 10)]
    alpaca = [
        {"instruction": f"Square {i}.", "input": "" if i % 2 else f"x = {i}", "output": f"{i * i}"}
        for i in range(2, 10)
    ]
    cases = [
        ("prompt-completion", [{"prompt": p, "completion": c} for p, c in pairs], pairs),
        (
            "alpaca",
            alpaca,
            [((ALPACA_PROMPT if r["input"] else ALPACA_PROMPT_NO_INPUT).format(**r), r["output"]) for r in alpaca],
        ),
    ]
    seen = spy_on_batches(monkeypatch)
    for fmt, rows, texts in cases:
        seen.clear()
        data = write_rows(tmp_path / f"{fmt}.jsonl", rows)
        record = train(
            deeper,
            [data],
            tmp_path / fmt,
            TrainOptions(steps=2, batch_size=4, seq_len=128, device="cpu", cache_dir=tmp_path / "cache"),
        )
        expected = {}
        for prompt, completion in texts:
            prompt_ids = tokenizer(prompt)["input_ids"]
            ids = tokenizer(prompt + completion)["input_ids"] + [tokenizer.eos_token_id]
            assert ids[: len(prompt_ids)] == prompt_ids  # the completion starts on a token boundary
            expected[tuple(ids)] = [False] * len(prompt_ids) + [True] * (len(ids) - len(prompt_ids))
        assert check_rows_against(seen, expected, tokenizer.pad_token_id) == 8, fmt
        assert record["format"] == fmt and record["loss_tokens"] == sum(sum(v) for v in expected.values())
    # prompt and completion as message lists: through the chat template, the completion's turn alone in the loss
    seen.clear()
    rows = [{"prompt": m[:2], "completion": m[2:3]} for m in CHATS]
    data = write_rows(tmp_path / "messages.jsonl", rows)
    record = train(
        deeper,
        [data],
        tmp_path / "messages",
        TrainOptions(
            steps=2,
            batch_size=4,
            seq_len=128,
            device="cpu",
            chat_template=str(deeper.parent / "template.jinja"),
            cache_dir=tmp_path / "cache",
        ),
    )
    chat = tokenizer_with_template()
    expected = {tuple(ids): loss for ids, loss in (expected_chat(r["prompt"] + r["completion"], chat) for r in rows)}
    assert check_rows_against(seen, expected, tokenizer.pad_token_id) == 8
    assert record["format"] == "prompt-completion" and record["chat_template"].endswith("template.jinja")


@pytest.mark.slow
def test_loss_on_all_puts_every_token_in_the_loss(deeper, tmp_path, monkeypatch):
    seen = spy_on_batches(monkeypatch)
    data = write_rows(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS])
    record = train(
        deeper,
        [data],
        tmp_path / "out",
        TrainOptions(
            steps=1,
            batch_size=8,
            seq_len=128,
            device="cpu",
            loss_on="all",
            chat_template=str(deeper.parent / "template.jinja"),
            cache_dir=tmp_path / "cache",
        ),
    )
    tokenizer = tokenizer_with_template()
    expected = {tuple(ids): [True] * len(ids) for ids, _ in (expected_chat(m, tokenizer) for m in CHATS)}
    assert check_rows_against(seen, expected, tokenizer.pad_token_id) == 8
    assert record["loss_on"] == "all"


@pytest.mark.slow
def test_noise_prompts_and_a_fixed_completion_drive_the_completion_loss_down(deeper, tmp_path):
    """Only the completion can be learnt (the prompts are noise): the loss, on completion tokens
    only, falls; had the prompts been in the loss it could not fall like this."""
    rng = random.Random(0)
    noise = lambda: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789 ") for _ in range(rng.randint(20, 60)))  # noqa: E731
    rows = [{"prompt": noise() + "\n", "completion": "return None\n"} for _ in range(64)]
    data = write_rows(tmp_path / "noise.jsonl", rows)
    record = train(
        deeper,
        [data],
        tmp_path / "out",
        TrainOptions(
            steps=24,
            batch_size=8,
            seq_len=128,
            lr=3e-3,
            device="cpu",
            cache_dir=tmp_path / "cache",
            trainer_args={"logging_steps": 1},
        ),
    )
    losses = [row["loss"] for row in record["history"] if "loss" in row]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4, losses
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED)
    per_example = [
        len(tokenizer(r["prompt"] + r["completion"])["input_ids"]) + 1 - len(tokenizer(r["prompt"])["input_ids"])
        for r in rows
    ]
    assert len(set(per_example)) == 1  # "return None\n" + EOS, whatever the noise before it
    assert record["loss_tokens"] == 24 * 8 * per_example[0]


# ---- the guarantees of `opt-deus train` ------------------------------------------------------


@pytest.mark.slow
def test_sft_keeps_every_base_tensor_bit_identical(deeper, tmp_path):
    data = write_rows(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS])
    out = tmp_path / "out"
    record = train(
        deeper,
        [data],
        out,
        TrainOptions(
            steps=3,
            batch_size=2,
            seq_len=256,
            lr=1e-3,
            device="cpu",
            packing=True,
            chat_template=str(deeper.parent / "template.jinja"),
            cache_dir=tmp_path / "cache",
            trainer_args={"weight_decay": 0.1},
            eval_data=(data,),
        ),
    )
    new = read_manifest(deeper).trainable_layers
    before, after = checkpoint_tensors(deeper), checkpoint_tensors(out)
    assert before.keys() == after.keys()
    layer = lambda n: int(n.split(".")[2]) if n.startswith("model.layers.") else None  # noqa: E731
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype
        if layer(name) not in new:
            assert torch.equal(after[name].view(torch.int16), tensor.view(torch.int16)), name
    assert {layer(n) for n in before if not torch.equal(before[n], after[n])} == set(new)
    assert read_manifest(out).training == json.loads(json.dumps(record))
    assert (
        record["packing"] is True and record["packing_strategy"] == "bfd" and record["train_examples"]["sequences"] < 8
    )
    assert record["eval_loss"] > 0 and record["eval_examples"]["examples"] == 8 and record["eval_examples"]["rows"] == 8
    assert record["versions"]["trl"] and record["check"]["frozen_identical"] == sum(layer(n) not in new for n in before)


@pytest.mark.slow
def test_packed_examples_attend_only_to_themselves(deeper, tmp_path):
    """The same 8 examples evaluated in one batch, padded and packed (TRL's padding-free rows with
    position ids): the loss over the same assistant tokens is the same only if no packed example
    sees its neighbours."""
    data = write_rows(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS])
    losses = {}
    for packing in (False, True):
        record = train(
            deeper,
            [data],
            tmp_path / f"packed-{packing}",
            TrainOptions(
                steps=1,
                batch_size=8,
                seq_len=256,
                lr=1e-12,
                device="cpu",
                packing=packing,
                eval_data=(data,),
                chat_template=str(deeper.parent / "template.jinja"),
                cache_dir=tmp_path / "cache",
            ),
        )
        losses[packing] = record["eval_loss"]
        assert record["eval_examples"]["sequences"] == (8 if not packing else record["train_examples"]["sequences"])
    assert record["train_examples"]["sequences"] < 8  # packed: several examples a row
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


@pytest.mark.slow
def test_long_examples_are_truncated_and_counted_or_dropped(deeper, tmp_path):
    data = write_rows(
        tmp_path / "pc.jsonl",
        [
            {"prompt": "# short\n", "completion": "x = 1\n"},
            {"prompt": "# long\n", "completion": "y = [" + ", ".join(map(str, range(60))) + "]\n"},
        ],
    )
    options = dict(steps=1, batch_size=2, seq_len=24, device="cpu", cache_dir=tmp_path / "cache")
    kept = train(deeper, [data], tmp_path / "a", TrainOptions(**options))["train_examples"]
    assert (kept["examples"], kept["truncated"], kept["dropped_long"]) == (2, 1, 0)
    dropped = train(deeper, [data], tmp_path / "b", TrainOptions(drop_long=True, **options))["train_examples"]
    assert (dropped["examples"], dropped["truncated"], dropped["dropped_long"]) == (1, 0, 1)


# ---- bad input ---------------------------------------------------------------------------------


def bad_input_cases(tmp_path: Path, template: Path) -> list[tuple[list[str], int, str]]:
    chat = {"messages": CHATS[0]}
    files = {
        "mixed.jsonl": [chat, {"prompt": "a", "completion": "b"}],
        "order.jsonl": [chat, {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}],
        "nothing.jsonl": [
            {"messages": CHATS[0][:2]},
            {"prompt": None, "completion": None, "messages": [{"role": "user", "content": "x"}]},
        ],
        "empty.jsonl": [{"prompt": "a", "completion": ""}, {"prompt": "b", "completion": " "}],
        "unknown.jsonl": [{"question": "a", "answer": "b"}],
        "chat.jsonl": [chat],
        "alpaca.jsonl": [{"instruction": "Say hi.", "output": "hi"}],
    }
    for name, rows in files.items():
        write_rows(tmp_path / name, rows)
    (tmp_path / "doc.txt").write_text("def f():\n    return 1\n" * 20)
    (tmp_path / "plain.jinja").write_text(NO_MARKERS)
    args = tmp_path / "sft.yaml"
    args.write_text("max_length: 64\n")
    t = ["--chat-template", str(template)]
    return [  # (data files, more options, exit code, the error line holds)
        (["mixed.jsonl"], t, 1, "row 2: is prompt-completion, not chat: the rows of the data share one format"),
        (["order.jsonl"], t, 1, "row 2: roles ['assistant', 'user'] are out of order"),
        (["nothing.jsonl"], t, 1, "holds no example with something to learn: 2 of 2 rows"),
        (["empty.jsonl"], [], 1, "holds no example with something to learn: 2 of 2 rows"),
        (["unknown.jsonl"], [], 1, "has columns answer, question, which name no format"),
        (
            ["chat.jsonl"],
            [],
            2,
            "has no chat template, which this conversational data needs; give one with --chat-template",
        ),
        (["chat.jsonl"], ["--chat-template", str(tmp_path / "plain.jinja")], 2, "{% generation %}"),
        (["chat.jsonl", "alpaca.jsonl"], t, 1, "files mix formats"),
        (["doc.txt"], ["--format", "chat"], 2, "--format chat: "),
        (["doc.txt"], ["--packing"], 2, "--packing is for chat, prompt-completion and alpaca data"),
        (["chat.jsonl"], [*t, "--args", str(args)], 2, "max_length in the --args file is set by --seq-len"),
        (["doc.txt"], ["--args", str(args)], 2, "'max_length' is an SFTConfig field"),
        (
            ["chat.jsonl"],
            [*t, "--eval-data", str(tmp_path / "alpaca.jsonl")],
            1,
            "--eval-data files are alpaca but the --data files are chat",
        ),
        (["chat.jsonl"], ["--format", "dialog"], 2, "--format 'dialog' not understood"),
        (["chat.jsonl"], [*t, "--loss-on", "prompt"], 2, "--loss-on 'prompt' not understood"),
    ]


@pytest.mark.slow
def test_bad_input_is_one_line_and_nothing_is_written(deeper, tmp_path):
    for files, extra, code, message in bad_input_cases(tmp_path, deeper.parent / "template.jinja"):
        result = runner.invoke(
            app,
            [
                "train",
                str(deeper),
                "--data",
                *(str(tmp_path / f) for f in files),
                "--out",
                str(tmp_path / "o"),
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--seq-len",
                "64",
                "--device",
                "cpu",
                "--cache-dir",
                str(tmp_path / "cache"),
                *extra,
            ],
        )
        lines = messages(result.output)  # besides progress lines
        assert result.exit_code == code, (files, extra, result.output)
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (files, extra, result.output)
        assert not (tmp_path / "o").exists() and not any(p.name.startswith(".o") for p in tmp_path.iterdir())


def test_options_refuse_what_they_do_not_know():
    for options, message in (
        (TrainOptions(format="dialog"), "--format 'dialog'"),
        (TrainOptions(loss_on="x"), "--loss-on 'x'"),
        (TrainOptions(chat_template="/no/such.jinja"), "does not exist"),
    ):
        with pytest.raises(UsageError, match=message):
            options.check()
    assert TrainOptions().format is None and TrainOptions().loss_on == "completion" and not TrainOptions().packing


# ---- the README's commands -------------------------------------------------------------------

README = ROOT / "README.md"
SFT_SECTION = "## Supervised fine-tuning"


def sft_readme_commands() -> list[str]:
    """The `opt-deus` lines of the fenced blocks of the README's SFT section."""
    section = README.read_text().split(f"\n{SFT_SECTION}\n", 1)[1].split("\n## ", 1)[0]
    commands, fenced = [], False
    for line in section.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced and line.startswith("opt-deus "):
            commands.append(line.split("  #")[0].strip())
    return commands


@pytest.mark.slow
def test_readme_sft_commands_run_as_written_on_the_demo(tmp_path, monkeypatch):
    import shlex

    commands = sft_readme_commands()
    assert {c.split("--data ")[1].split()[0] for c in commands} == {
        "examples/sft/chat.jsonl",
        "examples/sft/alpaca.jsonl",
        "examples/sft/prompt-completion.jsonl",
    }
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (tmp_path / "out").mkdir()  # as `make demo` makes it
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    demo = runner.invoke(app, shlex.split("upscale examples/tiny-llama --recipe top-half --out out/demo --overwrite"))
    assert demo.exit_code == 0, demo.output  # what `make demo` leaves, as "The commands" write it
    for command in commands:
        result = runner.invoke(app, shlex.split(command)[1:])
        assert result.exit_code == 0, f"README: {command}\n{result.output}"
        record = read_manifest(tmp_path / "out" / "sft").training
        fmt = command.split("examples/sft/")[1].split(".jsonl")[0]
        assert record["format"] == fmt and record["steps"] == 2 and 0 < record["loss_tokens"] < record["tokens"]
        assert record["trainable_layers"] == [4, 6, 8, 10] and record["check"]["frozen_identical"] > 0
