"""How fast the CLI answers what needs no model work: `--help`, a usage error, `recipes`,
`handoff` and `inspect` of an output. Each is the installed `opt-deus` console script run as a
child process; the commands are interleaved round by round (drifting load hits all alike) and
the median wall time is reported with the range. Goal (issue 24): a usage error or `--help`
under 0.5 s.

    python -m benchmarks.startup [--rounds 10] [--json]

The output inspected and handed off is made once under bench-out/startup (the shipped model,
`llama-pro`, a byte-copy recipe).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench-out" / "startup"
SHIPPED = ROOT / "examples" / "tiny-llama"
GOAL_SECONDS = 0.5


def commands(out: Path) -> dict[str, list[str]]:
    return {
        "--help": ["--help"],
        "usage error (train --steps 0)": [
            "train",
            str(out),
            "--data",
            str(ROOT / "README.md"),
            "--out",
            str(WORK / "x"),
            "--steps",
            "0",
        ],
        "usage error (upscale --dtype fp8)": [
            "upscale",
            str(SHIPPED),
            "--recipe",
            "top-half",
            "--out",
            str(WORK / "x"),
            "--dtype",
            "fp8",
        ],
        "recipes": ["recipes"],
        "handoff --for peft": ["handoff", str(out), "--for", "peft"],
        "inspect OUT": ["inspect", str(out)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    script = str(Path(sys.executable).with_name("opt-deus"))
    out = WORK / "tiny-llama-llama-pro"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if not (out / "opt-deus-manifest.json").is_file():
        WORK.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [script, "upscale", str(SHIPPED), "--recipe", "llama-pro", "--out", str(out), "--overwrite"],
            check=True,
            capture_output=True,
            env=env,
        )
    cases = commands(out)
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for name, argv in cases.items():
            start = time.perf_counter()
            subprocess.run([script, *argv], capture_output=True, env=env)
            seconds[name].append(time.perf_counter() - start)
    load.append(os.getloadavg()[0])
    rows = [
        {
            "command": name,
            "median_s": round(statistics.median(s), 3),
            "min_s": round(min(s), 3),
            "max_s": round(max(s), 3),
        }
        for name, s in seconds.items()
    ]
    if args.json:
        print(json.dumps({"rounds": args.rounds, "load_avg": load, "goal_s": GOAL_SECONDS, "rows": rows}, indent=1))
        return
    print(f"{args.rounds} interleaved rounds, load average {load[0]:.2f} -> {load[1]:.2f}; goal < {GOAL_SECONDS} s")
    print("| command | median s | min-max s |")
    print("|---|---|---|")
    for row in rows:
        print(f"| `opt-deus {row['command']}` | {row['median_s']} | {row['min_s']}-{row['max_s']} |")


if __name__ == "__main__":
    main()
