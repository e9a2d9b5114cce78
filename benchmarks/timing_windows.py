"""How far a step-time ratio moves between identical timings, by windows per size.

Why the plan times its leading candidates again (`planner/head_to_head.py`): which batch
wins is often a few percent between two neighbours, so what matters is how much the ratio
of their step times moves from one plan to the next. Each run here is a fresh process (as
each `batchlab plan` is) timing the same sizes with `profile_throughput`, interleaved, once
with the ladder's 5 windows per size and once with the head-to-head's 15; it prints the
ratio of each size's median step time to the first size's, per process, and the min-max
over processes.

    .venv/bin/python benchmarks/timing_windows.py mnist1d-cnn --sizes 100,256,512,810 --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, sys
from batchlab.measure.throughput import profile_throughput
task, sizes, windows, budget = sys.argv[1], [int(b) for b in sys.argv[2].split(",")], int(sys.argv[3]), float(sys.argv[4])
p = profile_throughput(task, batch_sizes=sizes, windows=windows, time_budget=budget, check_alignment=False)
print(json.dumps({"step_s": {q.batch_size: q.step_s for q in p.points}, "warnings": list(p.warnings)}))
"""


def time_once(task: str, sizes: list[int], windows: int, budget: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    args = [sys.executable, "-c", CHILD, task, ",".join(map(str, sizes)), str(windows), str(budget)]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task")
    parser.add_argument("--sizes", default="100,256,512,810")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--settings", default="5:3,15:8", help="windows:seconds pairs")
    args = parser.parse_args(argv)
    sizes = [int(b) for b in args.sizes.split(",")]
    settings = [tuple(s.split(":")) for s in args.settings.split(",")]
    print(f"# benchmarks/timing_windows.py {' '.join(sys.argv[1:])}")
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# {platform.machine()} cpus={os.cpu_count()} {stamp}")
    ratios: dict[str, list[list[float]]] = {w: [] for w, _ in settings}
    for run in range(args.runs):  # alternate the settings so both see the same load
        order = settings if run % 2 == 0 else settings[::-1]
        for windows, budget in order:
            load = os.getloadavg()[0]
            got = time_once(args.task, sizes, int(windows), float(budget))
            step = {int(b): s for b, s in got["step_s"].items()}
            row = [step[b] / step[sizes[0]] for b in sizes if b in step]
            ratios[windows].append(row)
            print(
                f"run {run} windows {windows:>2} load {load:.1f}: "
                + " ".join(f"{b}:{step[b] * 1e3:.2f}ms" for b in sizes if b in step)
                + f"  ratios to B={sizes[0]}: "
                + " ".join(f"{r:.2f}" for r in row)
                + (f"  ({len(got['warnings'])} warnings)" if got["warnings"] else ""),
                flush=True,
            )
    print("\n| windows | " + " | ".join(f"B={b} / B={sizes[0]}" for b in sizes[1:]) + " |")
    print("|---|" + "---|" * (len(sizes) - 1))
    for windows, rows in ratios.items():
        cells = []
        for i in range(1, len(sizes)):
            vals = [r[i] for r in rows if len(r) > i]
            cells.append(f"{min(vals):.2f}-{max(vals):.2f} (x{max(vals) / min(vals):.2f})")
        print(f"| {windows} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
