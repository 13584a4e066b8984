"""Instruction data built offline from the documentation shipped with Python itself.

Two sources, both in every CPython installation (no network, no download):
* the stdlib's docstrings: for each public function and class (and a class's public methods) of
  the modules in MODULES, a question about it ("What does `textwrap.dedent` do?", three phrasings
  chosen by a hash of the name) answered by its signature and the first paragraphs of its
  docstring (`inspect.getdoc`, at most ANSWER_CHARS characters, cut at a paragraph or sentence);
  objects without a docstring of at least MIN_DOC_CHARS characters, private names, and
  objects re-exported from another module are skipped;
* pydoc's topic help (`pydoc_data.topics`, the text `help('assert')` shows): "Explain ... in
  Python" answered by the topic's first ANSWER_CHARS characters.

Split: every question about one module (or one pydoc topic) lands on the same side, by a sha256
of its name (HELDOUT_SHARE held out), so held-out questions are about modules never trained on.
Files written into OUT:
* train.jsonl, heldout.jsonl: one conversation per line in the conversational format TRL and
  transformers chat templates read: {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]};
* pydoc_qa/heldout_mc.jsonl and pydoc_qa/pydoc_qa.yaml: an lm-evaluation-harness task read
  from that local file (multiple choice: the held-out question with its answer's first sentence
  and CHOICES - 1 first sentences of other held-out answers of the same kind, the gold position
  set by a hash; scored by log-likelihood, acc and acc_norm);
* SOURCE.json: the Python version, counts and each file's sha256.
Deterministic for one Python version: the same interpreter gives byte-identical files.

    python -m benchmarks.sft.data OUT
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
import sys
import warnings
from pathlib import Path

# pure-library modules that import without side effects (no GUI, no network, no easter eggs)
MODULES = (
    "argparse",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "colorsys",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email.utils",
    "enum",
    "filecmp",
    "fnmatch",
    "fractions",
    "functools",
    "getopt",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "html.parser",
    "inspect",
    "ipaddress",
    "itertools",
    "json",
    "keyword",
    "linecache",
    "locale",
    "logging",
    "lzma",
    "math",
    "mimetypes",
    "numbers",
    "operator",
    "os",
    "os.path",
    "pathlib",
    "platform",
    "pprint",
    "queue",
    "quopri",
    "random",
    "re",
    "reprlib",
    "sched",
    "secrets",
    "shlex",
    "shutil",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "timeit",
    "tokenize",
    "traceback",
    "types",
    "typing",
    "unicodedata",
    "urllib.parse",
    "uuid",
    "warnings",
    "weakref",
    "xml.etree.ElementTree",
    "zipfile",
    "zlib",
)
ANSWER_CHARS = 700
MIN_DOC_CHARS = 40
HELDOUT_SHARE = 0.12
CHOICES = 4
QUESTIONS = (
    "What does `{name}` do in Python?",
    "Explain the Python function `{name}`.",
    "How is `{name}` used? Describe it briefly.",
)
CLASS_QUESTIONS = (
    "What is `{name}` in Python?",
    "Explain the Python class `{name}`.",
    "Describe `{name}` and what it is for.",
)


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def is_heldout(group: str) -> bool:
    return _hash(group) % 10_000 < HELDOUT_SHARE * 10_000


def shorten(text: str, limit: int = ANSWER_CHARS) -> str:
    """At most `limit` characters, cut after a whole paragraph, else after a sentence."""
    text = text.strip()
    if len(text) <= limit:
        return text
    cut = text.rfind("\n\n", 0, limit)
    if cut < limit // 3:
        cut = max(text.rfind(". ", 0, limit) + 1, text.rfind(".\n", 0, limit) + 1)
    return text[: cut if cut > limit // 3 else limit].strip()


def first_sentence(text: str) -> str:
    match = re.search(r"(.+?[.!?])(\s|$)", " ".join(text.split()))
    return (match.group(1) if match else " ".join(text.split()))[:200]


def _signature(name: str, obj) -> str:
    try:
        # a sentinel default renders as "<object object at 0x7f...>": drop the address, which
        # changes from process to process, so that the files are byte-identical run to run
        return re.sub(r" at 0x[0-9a-fA-F]+", "", f"`{name}{inspect.signature(obj)}`")
    except (TypeError, ValueError):
        return f"`{name}`"


def docstring_pairs(module_name: str) -> list[dict]:
    """(question, answer) pairs for the public functions, classes and class methods of a module."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module(module_name)
    pairs = []
    for attr in sorted(getattr(module, "__all__", None) or dir(module)):
        obj = getattr(module, attr, None)
        if (
            attr.startswith("_")
            or obj is None
            or getattr(obj, "__module__", None) not in (module_name, module.__name__)
        ):
            continue
        if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
            continue
        name = f"{module_name}.{attr}"
        pairs += _pair(name, obj, module_name)
        if inspect.isclass(obj):
            for meth_name, meth in sorted(vars(obj).items()):
                if not meth_name.startswith("_") and (inspect.isfunction(meth) or inspect.ismethoddescriptor(meth)):
                    pairs += _pair(f"{name}.{meth_name}", meth, module_name)
    return pairs


def _pair(name: str, obj, group: str) -> list[dict]:
    doc = inspect.getdoc(obj) or ""
    if len(doc) < MIN_DOC_CHARS:
        return []
    is_class = inspect.isclass(obj)
    question = (CLASS_QUESTIONS if is_class else QUESTIONS)[_hash(name) % 3].format(name=name)
    answer = f"{_signature(name, obj)}: {shorten(doc)}"
    return [
        {
            "group": group,
            "kind": "class" if is_class else "function",
            "question": question,
            "answer": answer,
            "summary": first_sentence(doc),
        }
    ]


def topic_pairs() -> list[dict]:
    from pydoc_data.topics import topics

    pairs = []
    for topic in sorted(topics):
        text = topics[topic]
        body = text.split("\n", 2)[-1] if text.count("\n") > 2 else text  # drop the title and its underline
        if len(body.strip()) < MIN_DOC_CHARS:
            continue
        title = topic.replace("-", " ")
        pairs.append(
            {
                "group": f"topic:{topic}",
                "kind": "topic",
                "question": f"Explain {title} in Python.",
                "answer": shorten(body),
                "summary": first_sentence(body),
            }
        )
    return pairs


def conversation(pair: dict) -> dict:
    return {
        "messages": [{"role": "user", "content": pair["question"]}, {"role": "assistant", "content": pair["answer"]}]
    }


def multiple_choice(heldout: list[dict]) -> list[dict]:
    """Each held-out question with its answer's first sentence among CHOICES - 1 others of its kind."""
    rows = []
    for kind in sorted({p["kind"] for p in heldout}):
        same = [p for p in heldout if p["kind"] == kind]
        summaries = sorted({p["summary"] for p in same})
        if len(summaries) < CHOICES:
            continue
        for p in same:
            h = _hash(p["question"])
            others = [s for s in summaries if s != p["summary"]]
            picked = [others[(h // (i + 1) + 7919 * i) % len(others)] for i in range(len(others))]
            distractors = list(dict.fromkeys(picked))[: CHOICES - 1]
            if len(distractors) < CHOICES - 1:
                continue
            gold = h % CHOICES
            choices = distractors[:gold] + [p["summary"]] + distractors[gold:]
            rows.append({"question": p["question"], "choices": choices, "gold": gold})
    return rows


TASK_YAML = """task: pydoc_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()


def build(out: Path) -> dict:
    """Write the files into `out`; returns SOURCE.json's content."""
    pairs = topic_pairs()
    for name in MODULES:
        pairs += docstring_pairs(name)
    seen, unique = set(), []
    for p in pairs:  # an object re-exported under two names: keep one question per answer
        if p["answer"] not in seen:
            seen.add(p["answer"])
            unique.append(p)
    train = [p for p in unique if not is_heldout(p["group"])]
    heldout = [p for p in unique if is_heldout(p["group"])]
    out.mkdir(parents=True, exist_ok=True)
    (out / "pydoc_qa").mkdir(exist_ok=True)
    mc = multiple_choice(heldout)
    sums = {
        "train.jsonl": _write_jsonl(out / "train.jsonl", [conversation(p) for p in train]),
        "heldout.jsonl": _write_jsonl(out / "heldout.jsonl", [conversation(p) for p in heldout]),
        "pydoc_qa/heldout_mc.jsonl": _write_jsonl(out / "pydoc_qa" / "heldout_mc.jsonl", mc),
    }
    (out / "pydoc_qa" / "pydoc_qa.yaml").write_text(
        TASK_YAML.format(data=(out / "pydoc_qa" / "heldout_mc.jsonl").resolve())
    )
    source = {
        "python": sys.version.split()[0],
        "modules": list(MODULES),
        "pairs": len(unique),
        "train": len(train),
        "heldout": len(heldout),
        "heldout_groups": sorted({p["group"] for p in heldout}),
        "multiple_choice": len(mc),
        "sha256": sums,
    }
    (out / "SOURCE.json").write_text(json.dumps(source, indent=1) + "\n")
    return source


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m benchmarks.sft.data OUT")
    info = build(Path(sys.argv[1]))
    print(
        f"{info['train']} training and {info['heldout']} held-out conversations, {info['multiple_choice']} "
        f"multiple-choice questions (Python {info['python']}) in {sys.argv[1]}"
    )
