"""The sweep's HTML report, built from its directory alone (`sweep.json` + `results.jsonl`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from batchlab.report import sweep_plots as plots
from batchlab.report.html import Card, HtmlPage
from batchlab.sweep.analysis import (
    BatchPoint,
    GroupAnalysis,
    SweepAnalysis,
    analyze_sweep,
    regime_borders,
)
from batchlab.sweep.spec import SweepSpec
from batchlab.sweep.store import RunRecord, load_sweep

REPORT_FILE = "report.html"


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def fmt_interval(ci: tuple[float, float] | None) -> str:
    return "" if ci is None else f"95% CI {fmt(ci[0])} to {fmt(ci[1])}"


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
        rows.append([label, fmt(a), fmt(b), ratio(a, b)])
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
        lr = fmt(p.lr) + (f" (x{p.lr_multiplier:g})" if p.lr_multiplier != 1.0 else "")
        reached = f"{p.reached}/{p.repeats}" + (f", {p.diverged} diverged" if p.diverged else "")
        rows.append(
            [
                str(p.batch_size),
                lr,
                reached,
                fmt(p.median_steps_to_target),
                fmt(p.median_epochs_to_target),
                fmt(p.median_seconds_to_target),
                fmt(p.seconds_per_epoch),
                fmt(p.train_seconds),
                p.regime or "-",
            ]
        )
    return rows


def quality_rows(group: GroupAnalysis) -> list[list[str]]:
    return [
        [
            str(p.batch_size),
            fmt(p.min_val_loss),
            fmt(p.final_val_acc),
            fmt(p.final_train_loss),
            fmt(p.gap_acc),
            fmt(p.gap_loss),
            fmt(p.sharpness),
            fmt(p.epsilon_sharpness),
            fmt(p.grad_norm),
            fmt(p.distance_from_init),
        ]
        for p in group.points
    ]


def _cards(spec: SweepSpec, analysis: SweepAnalysis) -> list[Card]:
    ok = sum(r.status == "ok" for r in analysis.runs)
    diverged = sum(r.status == "diverged" for r in analysis.runs)
    failed = sum(r.status == "failed" for r in analysis.runs)
    runs_detail = f"{ok} ok, {diverged} diverged" + (f", {failed} failed" if failed else "")
    cards = []
    group = analysis.groups[0] if analysis.groups else None
    fit = group.fit if group else None
    if fit is not None:
        which = f"{group.label}; " if len(analysis.groups) > 1 else ""
        cards.append(
            Card(
                "B_crit (fitted)",
                fmt(fit.b_crit),
                which + (fmt_interval(fit.b_crit_ci) or fit.ci_method),
                accent=True,
            )
        )
        cards.append(
            Card("S_min", fmt(fit.s_min), f"steps at B -> inf; {fmt_interval(fit.s_min_ci)}")
        )
        cards.append(
            Card(
                "R^2 (log S)",
                f"{fit.r2:.3f}",
                f"{fit.num_points} points, {len(fit.batch_sizes)} batch sizes",
            )
        )
    else:
        cards.append(
            Card(
                "B_crit (fitted)",
                "-",
                (group.fit_note or "") if group else "no runs yet",
                accent=True,
            )
        )
    if analysis.b_simple:
        cards.append(
            Card(
                "B_simple (measured)", fmt(analysis.b_simple), "gradient noise scale, from the plan"
            )
        )
    auto = " (chosen automatically)" if analysis.target_auto else ""
    cards.append(
        Card("target", analysis.target or "-", f"steps counted to the first eval reaching it{auto}")
    )
    cards.append(Card("runs", f"{analysis.runs_recorded}/{analysis.runs_total}", runs_detail))
    if group:
        timed = [p for p in group.points if p.median_seconds_to_target is not None]
        if timed:
            best = min(timed, key=lambda p: p.median_seconds_to_target)
            cards.append(
                Card(
                    "fastest to target",
                    f"B={best.batch_size}",
                    f"{fmt(best.median_seconds_to_target)} s of training",
                )
            )
        losses = [p for p in group.points if p.min_val_loss is not None]
        if losses:
            best = min(losses, key=lambda p: p.min_val_loss)
            cards.append(
                Card(
                    "lowest val loss",
                    f"B={best.batch_size}",
                    f"min val loss {fmt(best.min_val_loss)}",
                )
            )
    return cards


def _subtitle(spec: SweepSpec) -> str:
    budget = (
        f"{spec.max_steps} steps"
        if spec.max_steps
        else f"{spec.epochs:g} epochs (>= {spec.min_steps} steps)"
    )
    return (
        f"{len(spec.runs)} runs: batch sizes {', '.join(map(str, spec.batch_sizes))}; "
        f"optimizer {', '.join(spec.optimizers)}; lr rule {spec.lr_rule} from B0={spec.reference_batch_size}, "
        f"lr0={spec.reference_lr:g}; {budget}; {spec.repeats} repeat(s); device {spec.device}"
    )


def sweep_page(
    spec: SweepSpec, records: Sequence[RunRecord], analysis: SweepAnalysis, out_dir: str | Path
) -> HtmlPage:
    """Lay out the report page for one analyzed sweep."""
    page = HtmlPage(f"batchlab sweep: {spec.task}", subtitle=_subtitle(spec))
    page.cards(_cards(spec, analysis))
    page.section("Warnings")
    page.warnings(list(analysis.warnings))
    if not analysis.groups:
        page.paragraph("No finished runs yet.")
        page.section("Reproduce")
        page.reproduce([spec.reproduce_command(out_dir), f"batchlab report {out_dir}"])
        return page

    main = analysis.groups[0]
    page.section("Summary", "Medians over repeats. Target: " + (analysis.target or "-"))
    pair = comparison_pair(main)
    if pair is not None:
        small, large = pair
        page.table(
            ["", f"B={small.batch_size}", f"B={large.batch_size}", "ratio"],
            comparison_rows(small, large),
            caption=f"B={small.batch_size} vs B={large.batch_size} ({main.label})",
        )
    for group in analysis.groups:
        page.subsection(group.label)
        page.table(
            SPEED_HEADERS,
            speed_rows(group),
            caption="Speed: training seconds (evaluation excluded); regime from the fit.",
        )
        page.table(
            QUALITY_HEADERS,
            quality_rows(group),
            caption="Quality and dynamics at the end of each run.",
        )

    page.section(
        "Steps and examples to target",
        "McCandlish et al. 2018: S(B) = S_min (1 + B_crit/B) and E(B) = E_min (1 + B/B_crit), "
        "fitted by least squares on log S. Shaded: Shallue et al. 2018's regimes "
        + (
            "(perfect scaling below B_crit/4 = {:.0f}, maximal data parallelism above 4 B_crit = {:.0f}).".format(
                *regime_borders(main.fit.b_crit)
            )
            if main.fit is not None
            else "(need a fit)."
        ),
    )
    page.figures(
        [
            (plots.plot_steps_to_target(analysis).figure, "Steps to target; dots are repeats."),
            (plots.plot_examples_to_target(analysis).figure, "Examples to target."),
        ]
    )
    page.section("Time")
    page.figures(
        [
            (
                plots.plot_seconds_per_epoch(analysis).figure,
                "Training seconds per epoch (evaluation excluded).",
            ),
            (plots.plot_epochs_to_target(analysis).figure, "Epochs to reach the target."),
            (plots.plot_total_time(analysis).figure, "Time to target and for the whole run."),
        ]
    )
    page.section("Quality")
    figs = [(plots.plot_val_curves(records, analysis, "loss").figure, "Validation loss per epoch.")]
    if any("acc" in ev.metrics for r in records if r.history for ev in r.history.evals[:1]):
        figs.append(
            (
                plots.plot_val_curves(records, analysis, "acc").figure,
                "Validation accuracy per epoch.",
            )
        )
    figs.append(
        (
            plots.plot_generalization_gap(analysis).figure,
            "Gap at the end of each run: full training set vs validation set.",
        )
    )
    hess = next(
        (
            r.sharpness.get("hessian_top_eigenvalue")
            for r in records
            if r.sharpness.get("hessian_top_eigenvalue", {}).get("description")
        ),
        None,
    )
    figs.append(
        (
            plots.plot_sharpness(analysis).figure,
            "Sharpness at the end: "
            + (hess["description"] if hess else "top Hessian eigenvalue")
            + ". Cross-entropy curvature vanishes as the train loss goes to 0, so compare it "
            "with the train loss in the table above.",
        )
    )
    page.figures(figs)
    page.section("Training dynamics")
    page.figures(
        [
            (
                plots.plot_distance_from_init(records, analysis).figure,
                "Distance travelled from the initial weights.",
            ),
            (
                plots.plot_grad_norm(analysis).figure,
                "Mean |g_B| over each run: E|g_B|^2 = |G|^2 + tr(Sigma)/B.",
            ),
        ]
    )
    optimizers = {g.optimizer for g in analysis.groups}
    if len(optimizers) > 1:
        page.section(
            "Optimizers", "The steps-to-target curves above show each optimizer; here, quality."
        )
        page.figures(
            [
                (plots.plot_optimizers(analysis).figure, "Min validation loss per optimizer."),
                (
                    plots.plot_batch_metric(
                        analysis,
                        "final_val_acc",
                        title="final val acc by optimizer",
                        ylabel="val acc",
                    ).figure,
                    "Validation accuracy at the end of each run.",
                ),
            ]
        )
    if analysis.plan:
        page.section(
            "Plan check",
            "The plan's predictions next to the measurement, relative to the plan's reference "
            "batch. The steps ratio tests the plan's S(B) model alone; the speedup also tests "
            "its step-time model (measured here with the sweep's parallel jobs).",
        )
        page.figures(
            [
                (plots.plot_plan_check(analysis, "speedup").figure, "Time-to-target speedup."),
                (plots.plot_plan_check(analysis, "steps").figure, "Steps-to-target ratio."),
            ]
        )
        page.table(
            [
                "role",
                "B",
                "lr",
                "predicted speedup",
                "measured speedup",
                "predicted steps ratio",
                "measured steps ratio",
                "reached",
            ],
            [
                [
                    r.role,
                    str(r.batch_size),
                    fmt(r.lr),
                    fmt(r.predicted_speedup),
                    fmt(r.measured_speedup),
                    fmt(r.predicted_steps_ratio),
                    fmt(r.measured_steps_ratio),
                    f"{r.reached}/{r.repeats}",
                ]
                for r in analysis.plan
            ],
            caption="Relative to the plan's reference run (B0, lr0); 'ladder' rows use the sweep's LR rule.",
        )
    if analysis.adaptive is not None:
        a = analysis.adaptive
        page.section(
            "Adaptive vs fixed batch sizes",
            "train_adaptive starts at the reference batch and follows goodput = throughput x "
            "efficiency (Pollux); medians over repeats, training seconds to the target.",
        )
        page.table(
            [
                "run",
                "batch",
                "reached",
                "steps to target",
                "examples to target",
                "seconds to target",
            ],
            [
                [
                    "adaptive",
                    " -> ".join(str(b) for b in a.batch_path) or "-",
                    f"{a.reached}/{a.runs}",
                    fmt(a.median_steps_to_target),
                    fmt(a.median_examples_to_target),
                    fmt(a.median_seconds_to_target),
                ],
                [
                    "best fixed",
                    str(a.best_fixed_batch_size),
                    "",
                    "",
                    "",
                    fmt(a.best_fixed_seconds_to_target),
                ],
                [
                    "reference",
                    str(spec.reference_batch_size),
                    "",
                    "",
                    "",
                    fmt(a.reference_seconds_to_target),
                ],
            ],
        )
    page.section("Reproduce")
    page.reproduce([spec.reproduce_command(out_dir), f"batchlab report {out_dir}"])
    return page


def build_sweep_report(
    directory: str | Path, *, target: str | None = None, n_boot: int = 500
) -> Path:
    """Write `DIR/report.html` from the store alone, without training anything."""
    directory = Path(directory)
    spec, contents = load_sweep(directory)
    analysis = analyze_sweep(
        spec, contents.records, target=target, n_boot=n_boot, store_warnings=contents.warnings
    )
    page = sweep_page(spec, contents.records, analysis, directory)
    return page.write(directory / REPORT_FILE)
