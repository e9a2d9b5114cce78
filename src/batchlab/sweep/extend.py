"""`lr_rule="tuned"`: widen the LR grid where the best LR sits at its edge.

A grid of x0.5, 1, 2 around the rule's LR is too narrow where the rule is off: on
mnist1d-cnn with Adam the best LR sat at the grid's edge at B = 16, 32 and 64 (issue 11),
and a best LR at an edge says only that a better one may lie beyond it. So, once every run
of one optimizer at one batch size is recorded (all repeats, all multipliers so far), and
the best multiplier (`groups.pick_multiplier`, by steps to the spec's target, or by min val
loss without one) is the lowest or the highest that ran, the next factor-2 multiplier past
it is added for every repeat, up to `TUNED_LR_EXTENSIONS` per side (x1/8 to x8).

The spec stays what the user asked for; extension runs are derived from the recorded
results by this pure function and recorded like any run (their `RunSpec` is in their line
of `results.jsonl`). A run's own results decide only its own batch's extensions, so the
same records always give the same extension runs: a resumed sweep derives them again and
skips those already recorded, and a killed one redoes only the runs not yet recorded.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence

from batchlab.core.lr import warmup_steps_for
from batchlab.sweep.build import run_id_for
from batchlab.sweep.groups import pick_multiplier
from batchlab.sweep.metrics import run_metrics
from batchlab.sweep.spec import TUNED_LR_EXTENSION_FACTOR, RunSpec, SweepSpec, lr_grid_limits
from batchlab.sweep.store import RunRecord
from batchlab.target import parse_target


def all_runs(spec: SweepSpec, records: Sequence[RunRecord]) -> tuple[RunSpec, ...]:
    """The spec's runs, then the extension runs `records` call for (recorded or not)."""
    return (*spec.runs, *lr_extensions(spec, records))


def lr_extensions(spec: SweepSpec, records: Sequence[RunRecord]) -> tuple[RunSpec, ...]:
    """Every extension run the recorded results call for, in a fixed order (module docstring).

    Each (optimizer, batch) is extended step by step: while all its runs so far are
    recorded and the best multiplier is at the edge of those that ran, add the next one.
    """
    if spec.lr_rule != "tuned" or len(spec.lr_grid) < 2:
        return ()
    by_id = {r.run_id: r for r in records}
    target = parse_target(spec.target)
    planned: dict[tuple[str, int], list[RunSpec]] = defaultdict(list)
    for run in spec.runs:
        if run.source == "ladder":
            planned[(run.optimizer, run.batch_size)].append(run)
    added: list[RunSpec] = []
    for runs in planned.values():
        while all(r.run_id in by_id for r in runs):
            metrics = [run_metrics(by_id[r.run_id], target) for r in runs]
            if all(m.status == "failed" for m in metrics):
                break  # the runs raised: another LR will not mend that
            best = pick_multiplier(metrics)[0].lr_multiplier
            multiplier = next_multiplier(spec.lr_grid, {r.lr_multiplier for r in runs}, best)
            if multiplier is None:
                break
            new = [_extension_run(r, multiplier) for r in runs if r.lr_multiplier == 1.0]
            if not new:  # a hand-made spec without the x1 run: nothing to extend from
                break
            added += new
            runs = [*runs, *new]
    return tuple(added)


def next_multiplier(grid: tuple[float, ...], ran: set[float], best: float) -> float | None:
    """The multiplier past the edge of `ran` where `best` sits, or None: `best` is inside,
    or the edge already reached `lr_grid_limits(grid)`."""
    low, high = lr_grid_limits(grid)
    if best == min(ran) and best / TUNED_LR_EXTENSION_FACTOR >= low:
        return best / TUNED_LR_EXTENSION_FACTOR
    if best == max(ran) and best * TUNED_LR_EXTENSION_FACTOR <= high:
        return best * TUNED_LR_EXTENSION_FACTOR
    return None


def _extension_run(x1: RunSpec, multiplier: float) -> RunSpec:
    """The run at `multiplier` times the LR of `x1` (the grid's x1 run of the same repeat),
    warmed up as the builder warms every run up (Goyal et al. 2017)."""
    lr = x1.lr * multiplier
    return dataclasses.replace(
        x1,
        run_id=run_id_for(x1.source, x1.optimizer, x1.batch_size, multiplier, x1.repeat),
        lr=lr,
        lr_multiplier=multiplier,
        warmup_steps=warmup_steps_for(lr / x1.reference_lr, x1.max_steps),
    )
