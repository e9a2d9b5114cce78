"""What a finished sweep measured, at the resolution it measured it, and what that cost.

Reads a sweep directory (no training) and prints, per group and batch size: the LR
multipliers that ran (the tuned grid with its extensions), the one kept, the steps to
target of each repeat and their median; then the S(B) fit; then the evaluation cost of
the geometric schedule: evaluations per run, evaluation seconds as a share of training
seconds, and how many evaluations the old schedule (every `max_steps // 50` steps) would
have made up to the same stopping step.

    .venv/bin/python benchmarks/sweep_resolution.py DIR [--target val_acc>=0.85]
        [--reference 16:1216,32:640,...]
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

from batchlab.sweep.analysis import analyze_sweep
from batchlab.sweep.store import load_sweep

OLD_EVALS_PER_RUN = 50  # the schedule the sweep used before issue 11


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--target", default=None)
    parser.add_argument("--reference", default="", help="B:steps,... to print alongside")
    args = parser.parse_args()
    spec, contents = load_sweep(args.directory)
    records = contents.records
    analysis = analyze_sweep(spec, records, target=args.target, n_boot=1000)
    reference = dict(
        (int(b), float(s))
        for b, s in (item.split(":") for item in args.reference.split(",") if item)
    )
    ran = defaultdict(set)
    for r in records:
        if r.spec.source == "ladder":
            ran[(r.spec.optimizer, r.spec.batch_size)].add(r.spec.lr_multiplier)
    print(
        f"{spec.task}: {len(records)} runs recorded ({len(spec.runs)} in the spec), "
        f"target {analysis.target}"
    )
    for group in analysis.groups:
        print(f"\n{group.label}")
        print(
            "| B | LR multipliers run | kept | steps to target (each repeat) | median | reference |"
        )
        print("|---:|---|---:|---|---:|---:|")
        for p in group.points:
            mults = ", ".join(f"x{m:g}" for m in sorted(ran[(group.optimizer, p.batch_size)]))
            steps = ", ".join(str(s) for s in p.steps_to_target) or "not reached"
            med = "-" if p.median_steps_to_target is None else f"{p.median_steps_to_target:g}"
            ref = reference.get(p.batch_size)
            print(
                f"| {p.batch_size} | {mults} | x{p.lr_multiplier:g} | {steps} | {med} | "
                f"{'-' if ref is None else f'{ref:g}'} |"
            )
        if group.fit is not None:
            f = group.fit
            ci = f.b_crit_ci
            ci_text = f"{ci[0]:.0f}-{ci[1]:.0f}" if ci else "none"
            print(
                f"\nB_crit = {f.b_crit:.0f} (95% CI {ci_text}, {f.ci_method}), "
                f"S_min = {f.s_min:.1f}, R^2 = {f.r2:.3f}"
            )
        if group.fit_note:
            print(f"note: {group.fit_note}")
    _eval_cost(records)
    for w in analysis.warnings:
        print(f"warning: {w}")


def _eval_cost(records) -> None:
    """Evaluations per run now and under the old fixed spacing, and their share of time."""
    counts, old_counts, shares = [], [], []
    seconds = {"train": 0.0, "eval": 0.0, "old eval (estimated)": 0.0, "run total": 0.0}
    for r in records:
        h = r.history
        if h is None:
            continue
        counts.append(len(h.evals))
        old_every = max(1, r.spec.max_steps // OLD_EVALS_PER_RUN)
        old_counts.append(1 + h.total_steps // old_every + (h.total_steps % old_every > 0))
        if h.train_seconds:
            shares.append(h.eval_seconds / h.train_seconds)
        seconds["train"] += h.train_seconds
        seconds["eval"] += h.eval_seconds
        seconds["old eval (estimated)"] += h.eval_seconds * old_counts[-1] / counts[-1]
        seconds["run total"] += r.seconds.get("total", 0.0)
    print("\nseconds summed over runs: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    print(
        f"\nevaluations per run: median {statistics.median(counts):g}, max {max(counts)}, "
        f"total {sum(counts)} (old every-max_steps//50 schedule to the same steps: median "
        f"{statistics.median(old_counts):g}, total {sum(old_counts)}); evaluation seconds / "
        f"training seconds: median {statistics.median(shares):.2f}, "
        f"max {max(shares):.2f}"
    )


if __name__ == "__main__":
    main()
