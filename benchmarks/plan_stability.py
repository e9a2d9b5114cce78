"""Plan stability: the same `batchlab plan` command, run N times, picks the same batch (issue 14, item 7).

Each run is the CLI command a user types (`batchlab plan TASK --json F`), in a fresh
process, with the load average recorded before and after. With the same seed the noise
phase is bit-for-bit reproducible on CPU, so what can move between runs is the timing of
the throughput ladder, and the decision it feeds.

Two code versions can be compared side by side: `--src NAME=DIR` (a `src/` directory to
put on PYTHONPATH) more than once runs them in alternating order (round 1: A B, round 2:
B A, ...), so both see the same load.

`--replay` also rebuilds each saved plan's decision with the code on PYTHONPATH of this
script (`build_plan` on the plan's own saved measurements): the decision rule compared on
identical data, with the timing held fixed.

`--jitter PLAN.json ...` measures the decision rule alone: it rebuilds each saved plan
`--draws` times with every ladder median moved by a random factor exp(N(0, s)), s the
point's own standard error of the median (log of its window range / (2 sqrt(windows))),
and counts how often the most common batch comes out. Run it with each version's src on
PYTHONPATH to compare rules on the same draws.

    .venv/bin/python benchmarks/plan_stability.py mnist1d-cnn mnist1d-mlp --runs 5 \\
        --src before=/tmp/before/src --src after=src --out /tmp/plan_stability
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Run:
    """One plan: what it recommended and under what load."""

    task: str
    version: str
    index: int
    batch_size: int | None  # None: refused or failed
    lr: float | None
    keep_reference: bool | None
    verdict: str
    speedup: float | None
    interval: tuple[float, float] | None
    load_before: float
    load_after: float
    seconds: float
    json_path: str
    exit_code: int


def run_plan(task: str, version: str, src: Path, index: int, out: Path, extra: list[str]) -> Run:
    """`batchlab plan TASK --json F` in a fresh process with `src` on PYTHONPATH."""
    path = out / f"{task}.{version}.{index}.json"
    env = dict(os.environ, PYTHONPATH=str(src))
    command = [sys.executable, "-m", "batchlab", "plan", task, "--json", str(path), *extra]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    load_after = os.getloadavg()[0]
    (out / f"{task}.{version}.{index}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0 or not path.exists():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Run(task, version, index, None, None, None, last, None, None,
                   load_before, load_after, seconds, str(path), done.returncode)  # fmt: skip
    plan = json.loads(path.read_text())
    rec = plan["recommended"]
    interval = rec.get("predicted_speedup_interval")
    return Run(
        task, version, index, rec["batch_size"], rec["lr"], plan["keep_reference"],
        plan["verdict"], rec["predicted_speedup"], tuple(interval) if interval else None,
        load_before, load_after, seconds, str(path), 0,
    )  # fmt: skip


def within_each_other(runs: list[Run]) -> bool:
    """Whether every pair of runs that chose differently rates the other's batch as fast as
    its own within its stated interval: each run's candidate table puts the other batch's
    predicted speed-up at or above the low end of its own recommendation's interval."""
    tables = {}
    for r in runs:
        plan = json.loads(Path(r.json_path).read_text())
        tables[r.index] = {c["batch_size"]: c["predicted_speedup"] for c in plan["candidates"]}
    for a, b in itertools.permutations(runs, 2):
        if a.batch_size == b.batch_size:
            continue
        other = tables[a.index].get(b.batch_size)
        if a.interval is None or other is None or other < a.interval[0]:
            return False
    return True


def replay(run: Run) -> tuple[int, str]:
    """The batch and verdict this script's `build_plan` gives on the run's saved measurements."""
    from batchlab.planner.model import build_plan
    from batchlab.planner.plan_types import Plan

    plan = Plan.load(run.json_path)
    rebuilt = build_plan(
        plan.measurements,
        lr_rule=plan.recommended.lr_rule,
        target=plan.target,
        probe=plan.probe,
        noise=plan.noise,
    )
    return rebuilt.recommended.batch_size, rebuilt.verdict


def timing_table(run: Run) -> str:
    """The ladder's median step times (ms) and window spreads of one run."""
    plan = json.loads(Path(run.json_path).read_text())
    cells = [
        f"{p['batch_size']}:{1000 * p['step_s']:.3g}({p['spread']:.0%})"
        for p in plan["measurements"]["throughput"]
    ]
    return " ".join(cells)


def what_moved(group: list[Run]) -> list[str]:
    """Which quantities differ between the runs of one task and version, and by how much:
    the predicted critical batch (the noise phase: the same seed should give the same),
    the thread count the ladder was timed with, each ladder size's step time relative to
    the smallest size's, and each candidate's predicted speed-up."""
    plans = [json.loads(Path(r.json_path).read_text()) for r in group if r.batch_size is not None]
    if len(plans) < 2:
        return []
    out = [
        f"- B_noise (predicted critical batch): {sorted({round(p['b_simple'], 6) for p in plans})}"
        f", interval {sorted({tuple(round(x, 3) for x in p['b_simple_interval']) for p in plans})}",
        "- ladder timed with 1 thread (contended): "
        + " ".join(str(any("re-timed with 1 thread" in w for w in p["probe"]["warnings"]))
                   for p in plans),
    ]  # fmt: skip
    ladders = [
        {q["batch_size"]: q["step_s"] for q in p["measurements"]["throughput"]} for p in plans
    ]
    sizes = sorted(set.intersection(*(set(t) for t in ladders)))
    moved = []
    for b in sizes[1:]:
        rel = [t[b] / t[sizes[0]] for t in ladders]
        moved.append(f"{b}:{max(rel) / min(rel):.2f}")
    out.append(f"- step time / B={sizes[0]}'s, max/min over runs: {' '.join(moved)}")
    speedups = []
    for c in plans[0]["candidates"]:
        b = c["batch_size"]
        v = [x["predicted_speedup"] for p in plans for x in p["candidates"] if x["batch_size"] == b]
        if len(v) == len(plans) and max(v) >= 0.5:
            speedups.append(f"{b}:{min(v):.2f}-{max(v):.2f}")
    out.append(f"- predicted speed-up over B0, min-max over runs: {' '.join(speedups)}")
    return out


def jitter_agreement(path: str, draws: int, seed: int = 0) -> tuple[dict[int, int], int]:
    """How often each batch is recommended when the plan's ladder medians are jittered
    by their own standard errors (`draws` rebuilds), and the batch without jitter."""
    import dataclasses
    import math
    import random

    from batchlab.planner.model import build_plan
    from batchlab.planner.plan_types import Plan

    plan = Plan.load(path)
    m = plan.measurements
    rng = random.Random(seed)
    counts: dict[int, int] = {}
    for _ in range(draws):
        points = []
        for p in m.throughput:
            sigma = math.log(p.samples_per_s_high / p.samples_per_s_low) / (2 * p.windows**0.5)
            f = math.exp(rng.gauss(0.0, sigma))
            points.append(dataclasses.replace(
                p, step_s=p.step_s * f, samples_per_s=p.samples_per_s / f,
                samples_per_s_low=p.samples_per_s_low / f,
                samples_per_s_high=p.samples_per_s_high / f,
            ))  # fmt: skip
        rebuilt = build_plan(
            dataclasses.replace(m, throughput=tuple(points)), lr_rule=plan.recommended.lr_rule,
            target=plan.target, probe=plan.probe, noise=plan.noise,
        )  # fmt: skip
        b = rebuilt.recommended.batch_size
        counts[b] = counts.get(b, 0) + 1
    return counts, plan.recommended.batch_size


def report(runs: list[Run], do_replay: bool) -> str:
    lines = []
    for (task, version), group in itertools.groupby(
        sorted(runs, key=lambda r: (r.task, r.version, r.index)), key=lambda r: (r.task, r.version)
    ):
        group = list(group)
        lines.append(f"\n### {task}, {version}\n")
        header = "| run | load before/after | s | batch | lr | keep B0 | speed-up (interval) |"
        lines += [header + (" replayed batch |" if do_replay else ""),
                  "|---" * (8 if do_replay else 7) + "|"]  # fmt: skip
        for r in group:
            span = f"{r.interval[0]:.2f}-{r.interval[1]:.2f}" if r.interval else "-"
            speed = f"{r.speedup:.2f}x ({span})" if r.speedup is not None else r.verdict
            row = (
                f"| {r.index} | {r.load_before:.1f}/{r.load_after:.1f} | {r.seconds:.0f} | "
                f"{r.batch_size} | {r.lr if r.lr is None else f'{r.lr:.3g}'} | "
                f"{r.keep_reference} | {speed} |"
            )
            if do_replay:
                row += f" {replay(r)[0] if r.batch_size is not None else '-'} |"
            lines.append(row)
        batches = [r.batch_size for r in group]
        top = max(set(batches), key=batches.count)
        same = batches.count(top)
        ok = [r for r in group if r.batch_size is not None]
        inside = within_each_other(ok) if len(ok) == len(group) else False
        lines.append(
            f"\nsame batch in {same} of {len(group)} (B={top}); "
            f"all within each other's intervals: {inside}"
        )
        lines += what_moved(group)
        for r in group:
            lines.append(f"- run {r.index} verdict: {r.verdict}")
        for r in group:
            if r.batch_size is not None:
                lines.append(f"- run {r.index} ladder ms/step (spread): {timing_table(r)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="*", default=["mnist1d-cnn"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--src", action="append", default=[], metavar="NAME=DIR",
        help="a code version to run (a src/ directory); repeat to compare side by side",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("/tmp/plan_stability"))
    parser.add_argument("--replay", action="store_true", help="rebuild each decision here")
    parser.add_argument("--jitter", nargs="+", default=[], metavar="PLAN.json")
    parser.add_argument("--draws", type=int, default=50)
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    extra = argv[cut + 1 :]  # after --: extra `batchlab plan` flags
    if args.jitter:
        total = modal = 0
        overall: dict[int, int] = {}
        for path in args.jitter:
            counts, _ = jitter_agreement(path, args.draws)
            total, modal = total + args.draws, modal + max(counts.values())
            for b, n in counts.items():
                overall[b] = overall.get(b, 0) + n
            print(f"{path}: {dict(sorted(counts.items()))}")
        top = max(overall, key=overall.get)
        print(f"each plan's most common batch in {modal} of {total} jittered rebuilds "
              f"({modal / total:.0%}); B={top} over all plans in {overall[top]} ({overall[top] / total:.0%})")  # fmt: skip
        return 0
    versions = [tuple(s.split("=", 1)) for s in args.src] or [("current", str(ROOT / "src"))]
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"# {' '.join(sys.argv)}")
    print(f"# {platform.node()} {platform.machine()} cpus={os.cpu_count()} "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)  # fmt: skip
    runs = []
    for task in args.tasks:
        for i in range(args.runs):
            order = versions if i % 2 == 0 else versions[::-1]
            for name, src in order:
                r = run_plan(task, name, Path(src).resolve(), i, args.out, extra)
                runs.append(r)
                print(json.dumps(r.__dict__), flush=True)
    print(report(runs, args.replay))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
