"""Data formats of `opt-deus train` (issue 20): which one a file holds, and its rows read, checked
and put in the shape TRL's SFTTrainer takes.

    text               a `text` column (or --text-field), or .txt/.md files: packed continued pre-training (data.py)
    chat               `messages`: a list of {role, content}, rendered with the chat template
    prompt-completion  `prompt` and `completion`: two strings, or two message lists
    alpaca             `instruction`, optional `input`, `output`: the Alpaca project's prompt (below)
                       and the output as completion; with a chat template, one user and one assistant turn

A row's format is named by its non-empty columns, in this order: messages, then prompt +
completion, then instruction + output, then the text column (Alpaca-GPT4 rows also carry a
`text` column; they are alpaca rows). The first row of each file decides (or --format); every
other row must be of the same format. Rows with nothing to learn (no assistant turn, an empty
completion or output) are skipped and counted; roles out of order are an error."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OptDeusError, UsageError
from .data import file_format, read_file

FORMATS = ("text", "chat", "prompt-completion", "alpaca")
SFT_FORMATS = FORMATS[1:]
LOSS_ON = ("completion", "all")
# format -> the columns that name it (all of them non-empty in a row of that format), by priority
COLUMNS = {"chat": ("messages",), "prompt-completion": ("prompt", "completion"), "alpaca": ("instruction", "output")}
ROLES = ("system", "user", "assistant")

# The Alpaca project's prompts (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT); the output follows
# "### Response:" directly, as its training examples are source + target.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
KNOWN = (
    "text: a 'text' column (or --text-field); chat: 'messages'; prompt-completion: 'prompt' and 'completion'; "
    "alpaca: 'instruction' and 'output'"
)


@dataclass
class Examples:
    """The rows of a format, ready for SFTTrainer, and what reading them left out."""

    dataset: object  # datasets.Dataset: messages | prompt, completion
    rows: int  # rows read
    skipped: dict = field(default_factory=dict)  # reason -> rows left out


def row_format(columns: set[str], text_field: str) -> str | None:
    """The format named by a row's non-empty columns."""
    for name, needed in COLUMNS.items():
        if set(needed) <= columns:
            return name
    return "text" if text_field in columns else None


def _present(row: dict) -> set[str]:
    return {k for k, v in row.items() if v is not None}


def detect_format(files: list[Path], text_field: str, forced: str | None, what: str = "--data") -> str:
    """The format of the files: --format, else each file's first row (all files must agree).
    Plain text files are known by their name: datasets is imported only to read a row."""
    found = {}
    for path in files:
        builder = file_format(path)
        if builder == "text":
            fmt = "text"
        elif forced is not None:
            continue  # json/parquet rows are checked against --format when read
        else:
            from datasets import load_dataset

            try:  # streaming: reads the first row only, writes no cache
                first = next(
                    iter(load_dataset(builder, data_files=[str(path.resolve())], split="train", streaming=True)), None
                )
            except Exception as e:
                raise OptDeusError(
                    f"cannot read {path} as {builder}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                ) from e
            if first is None:
                raise OptDeusError(f"{path} holds no rows")
            fmt = row_format(_present(first), text_field)
            if fmt is None:
                raise OptDeusError(
                    f"the first row of {path} has columns {', '.join(sorted(first)) or 'none'}, which name "
                    f"no format ({KNOWN}); rename them, or say which with --format"
                )
        found[path] = fmt
    if forced is not None:
        texts = [p for p, f in found.items() if f == "text"]
        if forced != "text" and texts:
            raise UsageError(
                f"--format {forced}: {texts[0]} is plain text (one document per file); "
                f"{forced} data comes in .json/.jsonl/.parquet rows"
            )
        return forced
    kinds = sorted(set(found.values()))
    if len(kinds) > 1:
        by_kind = {f: p for p, f in found.items()}
        raise OptDeusError(
            f"the {what} files mix formats ({', '.join(f'{by_kind[k]}: {k}' for k in kinds)}); "
            "train on one format at a time"
        )
    return kinds[0]


def check_options(fmt: str, loss_on: str, packing: bool, chat_template: str | None, drop_long: bool) -> None:
    """The SFT flags make sense for this format (text is packed continued pre-training)."""
    if fmt != "text":
        return
    given = [
        name
        for name, on in (
            ("--packing", packing),
            ("--chat-template", chat_template is not None),
            ("--drop-long", drop_long),
            ("--loss-on all", loss_on == "all"),
        )
        if on
    ]
    if given:
        raise UsageError(
            f"{given[0]} is for chat, prompt-completion and alpaca data; this data is text, which is "
            "always packed into --seq-len blocks with the loss on every token"
        )


def _order_problem(messages, completion_side: bool = False) -> str | None:
    """Why a message list is out of order (None: it is fine). A conversation is an optional system
    turn, then user and assistant turns alternating from a user turn; a completion list holds
    assistant turns only."""
    if not isinstance(messages, list) or not messages:
        return "is not a non-empty list of {role, content} messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            return f"message {i} is not a {{role, content}} with role {', '.join(ROLES)}"
    roles = [m["role"] for m in messages]
    if completion_side:
        return (
            None
            if set(roles) == {"assistant"}
            else f"completion roles {roles}: a completion holds assistant turns only"
        )
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    return (
        None
        if turns == expected
        else (
            f"roles {roles} are out of order (an optional system turn, then user and "
            "assistant alternating from a user turn)"
        )
    )


def _row_verdict(row: dict, fmt: str, text_field: str) -> str | None:
    """None: keep; 'skip:<reason>'; else an error naming what is wrong with the row."""
    kind = row_format(_present(row), text_field)
    if kind != fmt:
        return (
            f"is {kind or 'of no known format'}, not {fmt}: the rows of the data share one format "
            "(the first row's, or --format's)"
        )
    if fmt == "chat":
        problem = _order_problem(row["messages"])
        if problem:
            return problem
        if not any(m["role"] == "assistant" and m["content"].strip() for m in row["messages"]):
            return "skip:no_completion"
    elif fmt == "prompt-completion":
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) != isinstance(completion, str):
            return "has a string and a message list for prompt and completion; use two strings or two lists"
        if not isinstance(prompt, str):
            problem = _order_problem(prompt) or _order_problem(completion, completion_side=True)
            if problem:
                return problem
            completion = "".join(m["content"] for m in completion)
        if not completion.strip():
            return "skip:no_completion"
    elif fmt == "alpaca":
        if not isinstance(row["instruction"], str) or not isinstance(row["output"], str):
            return "has an instruction or output that is not a string"
        if not row["output"].strip():
            return "skip:no_completion"
    return None


def read_examples(files: list[Path], fmt: str, text_field: str, cache_dir: Path | None, what: str) -> Examples:
    """Every row of every file (in order) as the format's columns; rows to skip are counted, a
    row of another format or with roles out of order is an error naming its file and row."""
    from datasets import concatenate_datasets

    parts, rows, skipped = [], 0, {}
    for path in files:
        part = read_file(path, cache_dir)
        columns = [c for c in (*COLUMNS[fmt], "input") if c in part.column_names]
        missing = [c for c in COLUMNS[fmt] if c not in part.column_names]
        if missing:
            raise OptDeusError(
                f"{path} has no {', '.join(repr(c) for c in missing)} column for {fmt} data "
                f"(it has {', '.join(part.column_names)}); {KNOWN}"
            )
        named = [c for c in (*(c for f in COLUMNS.values() for c in f), text_field) if c in part.column_names]
        verdicts = part.select_columns(named).map(lambda row: {"verdict": _row_verdict(row, fmt, text_field) or ""})[
            "verdict"
        ]
        for index, verdict in enumerate(verdicts):
            if verdict and not verdict.startswith("skip:"):
                raise OptDeusError(f"{path}, row {index + 1}: {verdict}")
        keep = [i for i, v in enumerate(verdicts) if not v]
        for v in verdicts:
            if v.startswith("skip:"):
                skipped[v[5:]] = skipped.get(v[5:], 0) + 1
        rows += len(part)
        parts.append(part.select_columns(columns).select(keep))
    dataset = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(dataset) == 0:
        raise OptDeusError(
            f"the {what} ({', '.join(map(str, files))}) holds no example with something to learn: "
            f"{sum(skipped.values())} of {rows} rows have no assistant turn or an empty completion"
        )
    return Examples(dataset, rows, skipped)


def alpaca_as_prompt_completion(dataset, with_chat_template: bool):
    """Alpaca rows -> prompt/completion: the published prompt and the output as text, or one user
    turn (instruction, a blank line, input) and one assistant turn through the chat template."""

    def convert(row: dict) -> dict:
        extra = (row.get("input") or "").strip()
        if with_chat_template:
            user = row["instruction"] + (f"\n\n{extra}" if extra else "")
            return {
                "prompt": [{"role": "user", "content": user}],
                "completion": [{"role": "assistant", "content": row["output"]}],
            }
        template = ALPACA_PROMPT if extra else ALPACA_PROMPT_NO_INPUT
        return {"prompt": template.format(instruction=row["instruction"], input=extra), "completion": row["output"]}

    return dataset.map(convert, remove_columns=dataset.column_names)


def set_chat_template(tokenizer, template_file: str | None) -> str | None:
    """--chat-template FILE on the tokenizer; returns where the template in use comes from."""
    if template_file is not None:
        path = Path(template_file)
        try:
            tokenizer.chat_template = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(
                f"--chat-template {path} cannot be read ({type(e).__name__}); give a Jinja template file"
            ) from e
        return str(path.resolve())
    return "tokenizer" if tokenizer.chat_template else None


def require_chat_template(source: str | None, model_dir: Path) -> None:
    if source is None:
        raise UsageError(
            f"the tokenizer of {model_dir} has no chat template, which this conversational data needs; "
            "give one with --chat-template FILE (a Jinja template, e.g. examples/chat-template.jinja)"
        )
