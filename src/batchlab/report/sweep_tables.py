"""The sweep report's tables: rows of strings built from a `SweepAnalysis`, no layout."""

from __future__ import annotations

from batchlab.report.numbers import format_number
from batchlab.sweep.analysis import SweepAnalysis
from batchlab.sweep.groups import BatchPoint, GroupAnalysis


def comparison_pair(group: GroupAnalysis) -> tuple[BatchPoint, BatchPoint] | None:
    """The smallest batch and the largest that did not diverge: the blog-post comparison."""
    usable = [p for p in group.points if p.diverged < p.repeats and p.failed < p.repeats]
    if len(usable) < 2:
        return None
    return usable[0], usable[-1]


def comparison_rows(small: BatchPoint, large: BatchPoint) -> list[list[str]]:
    def ratio(a: float | None, b: float | None) -> str:
        return f"{b / a:.2f}x" if a and a > 0 and b is not None and b >= 0 else "-"

    rows = []
    for label, field in (
        ("min val loss", "min_val_loss"),
        ("final val acc", "final_val_acc"),
        ("seconds / epoch", "seconds_per_epoch"),
        ("epochs to target", "median_epochs_to_target"),
        ("steps to target", "median_steps_to_target"),
        ("seconds to target", "median_seconds_to_target"),
        ("total training seconds", "train_seconds"),
        ("generalization gap (acc)", "gap_acc"),
        ("generalization gap (loss)", "gap_loss"),
        ("sharpness (top Hessian eigenvalue)", "sharpness"),
    ):
        a, b = getattr(small, field), getattr(large, field)
        if a is None and b is None:
            continue
        rows.append([label, format_number(a), format_number(b), ratio(a, b)])
    return rows


SPEED_HEADERS = [
    "B",
    "lr",
    "reached",
    "steps to target",
    "epochs to target",
    "s to target",
    "s / epoch",
    "total s",
    "regime",
]
QUALITY_HEADERS = [
    "B",
    "min val loss",
    "final val acc",
    "train loss",
    "gap (acc)",
    "gap (loss)",
    "lambda_max",
    "eps-sharpness",
    "mean |g_B|",
    "|theta - theta0|",
]


def speed_rows(group: GroupAnalysis) -> list[list[str]]:
    rows = []
    for p in group.points:
        lr = format_number(p.lr) + (f" (x{p.lr_multiplier:g})" if p.lr_multiplier != 1.0 else "")
        reached = f"{p.reached}/{p.repeats}" + (f", {p.diverged} diverged" if p.diverged else "")
        rows.append(
            [
                str(p.batch_size),
                lr,
                reached,
                format_number(p.median_steps_to_target),
                format_number(p.median_epochs_to_target),
                format_number(p.median_seconds_to_target),
                format_number(p.seconds_per_epoch),
                format_number(p.train_seconds),
                p.regime or "-",
            ]
        )
    return rows


def quality_rows(group: GroupAnalysis) -> list[list[str]]:
    return [
        [
            str(p.batch_size),
            format_number(p.min_val_loss),
            format_number(p.final_val_acc),
            format_number(p.final_train_loss),
            format_number(p.gap_acc),
            format_number(p.gap_loss),
            format_number(p.sharpness),
            format_number(p.epsilon_sharpness),
            format_number(p.grad_norm),
            format_number(p.distance_from_init),
        ]
        for p in group.points
    ]


PLAN_HEADERS = [
    "role",
    "B",
    "lr",
    "predicted speedup",
    "measured speedup",
    "predicted steps ratio",
    "measured steps ratio",
    "reached",
]


def plan_rows(analysis: SweepAnalysis) -> list[list[str]]:
    """The plan check: each planned (and ladder) batch, predicted next to measured."""
    return [
        [
            r.role,
            str(r.batch_size),
            format_number(r.lr),
            format_number(r.predicted_speedup),
            format_number(r.measured_speedup),
            format_number(r.predicted_steps_ratio),
            format_number(r.measured_steps_ratio),
            f"{r.reached}/{r.repeats}",
        ]
        for r in analysis.plan
    ]


ADAPTIVE_HEADERS = [
    "run",
    "batch",
    "reached",
    "steps to target",
    "examples to target",
    "seconds to target",
]


def adaptive_rows(analysis: SweepAnalysis, reference_batch_size: int) -> list[list[str]]:
    """The adaptive runs next to the best fixed batch and the reference batch."""
    a = analysis.adaptive
    if a is None:
        return []
    return [
        [
            "adaptive",
            " -> ".join(str(b) for b in a.batch_path) or "-",
            f"{a.reached}/{a.runs}",
            format_number(a.median_steps_to_target),
            format_number(a.median_examples_to_target),
            format_number(a.median_seconds_to_target),
        ],
        [
            "best fixed",
            str(a.best_fixed_batch_size),
            "",
            "",
            "",
            format_number(a.best_fixed_seconds_to_target),
        ],
        [
            "reference",
            str(reference_batch_size),
            "",
            "",
            "",
            format_number(a.reference_seconds_to_target),
        ],
    ]
