"""Adaptive batch size vs. the reference batch vs. the best fixed batch of a small sweep.

For each task, in one run (so the ratios share the machine's load):
1. the reference batch B0 at the task's lr sets the target: the validation loss it reaches
   a third of the way through its run (so it reaches it, and faster settings have room to
   show it; near the end of a run the validation loss flattens and the time to reach it is
   mostly noise);
2. fixed batches B0 * {1, 2, 4, 8} with the square-root lr rule (Adam-like optimizers)
   run until the target or a budget; the best of them is "best fixed";
3. `train_adaptive` from B0, B_simple measured in training, runs until the target.
Time is training time to the first evaluation at the target (evaluation excluded);
evaluations are spaced by the same number of examples in every run.

Wall-clock times of runs made one after the other on a shared machine drift with its load,
so the script also reports a *replayed* time: every step configuration any run used is timed
in one interleaved pass (A B C A B C ..., the fastest round, by CPU time with one thread:
`replay.py`), and each run's steps up to its target are summed from those times, including
the adaptive run's split steps.

    .venv/bin/python benchmarks/adaptive_vs_fixed.py [--tasks mnist1d-cnn charlm] [--seeds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import batchlab
from batchlab.adaptive import train_adaptive

sys.path.insert(0, str(Path(__file__).parent))
from replay import replay_step_times, replayed_seconds  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "adaptive_vs_fixed.md"
SETTINGS = {
    # task: (reference epochs to set the target, eval every N examples)
    "mnist1d-cnn": (40, 2000),
    "charlm": (1, 2048),
}


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def bench_task(name: str, seeds: list[int], multipliers: list[int]) -> dict:
    task = batchlab.load_task(name)
    ref_epochs, eval_examples = SETTINGS[name]
    b0 = task.batch_size

    def fixed(batch: int, seed: int, epochs: float, target: str | None):
        return batchlab.train(
            task,
            batch,
            epochs=epochs,
            lr_rule="sqrt",
            device="cpu",
            seed=seed,
            target=target,
            eval_every=max(1, eval_examples // batch),
        )

    ref = fixed(b0, seeds[0], ref_epochs, None)
    third = ref.evals[len(ref.evals) // 3]
    target = f"val_loss<={third.val_loss:.4f}"
    rows: dict[str, list] = {}
    for seed in seeds:
        for m in multipliers:  # interleaved with adaptive, seed by seed
            h = fixed(b0 * m, seed, 2 * ref_epochs * m**0.5, target)
            rows.setdefault(f"fixed B={b0 * m}", []).append(h)
        h = train_adaptive(
            task,
            epochs=2 * ref_epochs,
            device="cpu",
            seed=seed,
            target=target,
            eval_every=max(1, eval_examples // b0),
        )
        rows.setdefault("adaptive", []).append(h)
    step_times = replay_step_times(task, rows)
    summary = {}
    for label, runs in rows.items():
        summary[label] = {
            "seconds": median_or_none([h.seconds_to_target for h in runs]),
            "steps": median_or_none([h.steps_to_target for h in runs]),
            "examples": median_or_none([h.examples_to_target for h in runs]),
            "reached": sum(h.reached_target for h in runs),
            "runs": len(runs),
            "path": _path(runs[0]) if label == "adaptive" else "",
            "replayed": median_or_none([replayed_seconds(h, step_times) for h in runs]),
        }
    return {"task": name, "target": target, "b0": b0, "rows": summary}


def _path(h) -> str:
    path = [d["batch_size"] for d in h.extras["adaptive"]["decisions"]]
    path = [b for i, b in enumerate(path) if i == 0 or b != path[i - 1]]
    return " -> ".join(map(str, path))


def ratio(a, b) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}x"


def render(results: list[dict], seeds: list[int], seconds: float) -> str:
    lines = [
        "# Adaptive batch size vs. fixed batches",
        "",
        f"`benchmarks/adaptive_vs_fixed.py`, seeds {seeds}, CPU ({torch.get_num_threads()} "
        f"threads, shared 2-core machine), torch {torch.__version__}, {seconds:.0f} s in all.",
        "Medians over seeds; time is training time to the target (evaluation excluded);",
        "replayed = the run's steps re-timed in one interleaved pass (robust to load drift).",
        "Best fixed is chosen by replayed time.",
        "",
    ]
    for r in results:
        rows = r["rows"]
        # "Best fixed" by replayed time: wall-clock order would rank the machine's load.
        fixed = {k: v for k, v in rows.items() if k.startswith("fixed") and v["replayed"]}
        best_label = min(fixed, key=lambda k: fixed[k]["replayed"]) if fixed else None
        ref = rows[f"fixed B={r['b0']}"]
        ada = rows["adaptive"]
        lines += [
            f"## {r['task']} (target {r['target']}, reference batch {r['b0']})",
            "",
            "| run | time to target (s) | replayed (s) | steps | examples | reached |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for label, v in rows.items():
            mark = " (best fixed)" if label == best_label else ""
            secs = "-" if v["seconds"] is None else f"{v['seconds']:.2f}"
            rep = "-" if v["replayed"] is None else f"{v['replayed']:.2f}"
            lines.append(
                f"| {label}{mark} | {secs} | {rep} | {v['steps'] or '-'} | "
                f"{v['examples'] or '-'} | {v['reached']}/{v['runs']} |"
            )
        best = (
            rows[best_label] if best_label else {"seconds": None, "steps": None, "replayed": None}
        )
        lines += [
            "",
            f"- adaptive batch path (seed {seeds[0]}): {ada['path']}",
            f"- adaptive time / best fixed time: **{ratio(ada['seconds'], best['seconds'])}** "
            "(goal <= 1.0x)",
            f"- reference time / adaptive time: **{ratio(ref['seconds'], ada['seconds'])}** "
            "(goal >= 1.5x)",
            f"- replayed: adaptive / best fixed {ratio(ada['replayed'], best['replayed'])}, "
            f"reference / adaptive {ratio(ref['replayed'], ada['replayed'])}",
            f"- steps: adaptive / reference {ratio(ada['steps'], ref['steps'])}, "
            f"adaptive / best fixed {ratio(ada['steps'], best['steps'])}",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(SETTINGS))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--multipliers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--write", action="store_true", help=f"write {RESULTS}")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the machine is shared; one thread keeps ratios stable
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    results = []
    for name in args.tasks:
        results.append(bench_task(name, seeds, args.multipliers))
        print(f"{name} done after {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    text = render(results, seeds, time.perf_counter() - t0)
    print(text)
    if args.write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
