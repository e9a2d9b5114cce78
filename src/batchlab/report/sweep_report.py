"""The sweep's HTML report: one page laid out from a sweep's spec, runs and analysis.

`write_sweep_report` is the one place that builds it (the `sweep` and `report` commands
both call it); `build_sweep_report` first reads the sweep directory and analyzes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from batchlab.report import sweep_plots as plots
from batchlab.report.html import Card, HtmlPage
from batchlab.report.numbers import format_interval, format_number
from batchlab.report.sweep_tables import (
    ADAPTIVE_HEADERS,
    PLAN_HEADERS,
    QUALITY_HEADERS,
    SPEED_HEADERS,
    adaptive_rows,
    comparison_pair,
    comparison_rows,
    plan_rows,
    quality_rows,
    speed_rows,
)
from batchlab.sweep.analysis import SweepAnalysis, analyze_sweep
from batchlab.sweep.fit import regime_borders
from batchlab.sweep.groups import GroupAnalysis
from batchlab.sweep.spec import SweepSpec
from batchlab.sweep.store import RunRecord, load_sweep

REPORT_FILE = "report.html"


def _cards(analysis: SweepAnalysis) -> list[Card]:
    """The headline numbers: the fit, the target, the runs, and the best batches."""
    ok = sum(r.status == "ok" for r in analysis.runs)
    diverged = sum(r.status == "diverged" for r in analysis.runs)
    failed = sum(r.status == "failed" for r in analysis.runs)
    runs_detail = f"{ok} ok, {diverged} diverged" + (f", {failed} failed" if failed else "")
    cards = _fit_cards(analysis)
    if analysis.b_simple:
        cards.append(
            Card(
                "B_simple (measured)",
                format_number(analysis.b_simple),
                "gradient noise scale, from the plan",
            )
        )
    auto = " (chosen automatically)" if analysis.target_auto else ""
    cards.append(
        Card("target", analysis.target or "-", f"steps counted to the first eval reaching it{auto}")
    )
    cards.append(Card("runs", f"{analysis.runs_recorded}/{analysis.runs_total}", runs_detail))
    if analysis.groups:
        cards += _best_cards(analysis.groups[0])
    return cards


def _fit_cards(analysis: SweepAnalysis) -> list[Card]:
    """B_crit, S_min and R^2 of the first group's fit (or why there is none)."""
    group = analysis.groups[0] if analysis.groups else None
    fit = group.fit if group else None
    if fit is None:
        note = (group.fit_note or "") if group else "no runs yet"
        return [Card("B_crit (fitted)", "-", note, accent=True)]
    which = f"{group.label}; " if len(analysis.groups) > 1 else ""
    return [
        Card(
            "B_crit (fitted)",
            format_number(fit.b_crit),
            which + (format_interval(fit.b_crit_ci) or fit.ci_method),
            accent=True,
        ),
        Card(
            "S_min",
            format_number(fit.s_min),
            f"steps at B -> inf; {format_interval(fit.s_min_ci)}",
        ),
        Card(
            "R^2 (log S)",
            f"{fit.r2:.3f}",
            f"{fit.num_points} points, {len(fit.batch_sizes)} batch sizes",
        ),
    ]


def _best_cards(group: GroupAnalysis) -> list[Card]:
    """The batch fastest to the target and the one with the lowest val loss."""
    cards = []
    timed = [p for p in group.points if p.median_seconds_to_target is not None]
    if timed:
        best = min(timed, key=lambda p: p.median_seconds_to_target)
        cards.append(
            Card(
                "fastest to target",
                f"B={best.batch_size}",
                f"{format_number(best.median_seconds_to_target)} s of training",
            )
        )
    losses = [p for p in group.points if p.min_val_loss is not None]
    if losses:
        best = min(losses, key=lambda p: p.min_val_loss)
        cards.append(
            Card(
                "lowest val loss",
                f"B={best.batch_size}",
                f"min val loss {format_number(best.min_val_loss)}",
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
    spec: SweepSpec,
    records: Sequence[RunRecord],
    analysis: SweepAnalysis,
    reproduce: Sequence[str] = (),
) -> HtmlPage:
    """Lay out the report page for one analyzed sweep.

    `reproduce`: the commands that make this sweep and this report again, shown last (the
    CLI knows them; a page built from Python may have none).
    """
    page = HtmlPage(f"batchlab sweep: {spec.task}", subtitle=_subtitle(spec))
    page.cards(_cards(analysis))
    page.section("Warnings")
    page.warnings(list(analysis.warnings))
    if not analysis.groups:
        page.paragraph("No finished runs yet.")
    else:
        _summary_section(page, analysis)
        _curve_sections(page, analysis)
        _quality_section(page, records, analysis)
        _dynamics_sections(page, records, analysis)
        if analysis.plan:
            _plan_section(page, analysis)
        if analysis.adaptive is not None:
            page.section(
                "Adaptive vs fixed batch sizes",
                "train_adaptive starts at the reference batch and follows goodput = throughput x "
                "efficiency (Pollux); medians over repeats, training seconds to the target.",
            )
            page.table(ADAPTIVE_HEADERS, adaptive_rows(analysis, spec.reference_batch_size))
    if reproduce:
        page.section("Reproduce")
        page.reproduce(list(reproduce))
    return page


def _summary_section(page: HtmlPage, analysis: SweepAnalysis) -> None:
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


def _regimes_note(main: GroupAnalysis) -> str:
    if main.fit is None:
        return "(need a fit)."
    low, high = regime_borders(main.fit.b_crit)
    return (
        f"(perfect scaling below B_crit/4 = {low:.0f}, maximal data parallelism above "
        f"4 B_crit = {high:.0f})."
    )


def _curve_sections(page: HtmlPage, analysis: SweepAnalysis) -> None:
    """Steps, examples and time to target against batch size."""
    page.section(
        "Steps and examples to target",
        "McCandlish et al. 2018: S(B) = S_min (1 + B_crit/B) and E(B) = E_min (1 + B/B_crit), "
        "fitted by least squares on log S. Shaded: Shallue et al. 2018's regimes "
        + _regimes_note(analysis.groups[0]),
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


def _quality_section(page: HtmlPage, records: Sequence[RunRecord], analysis: SweepAnalysis) -> None:
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


def _dynamics_sections(
    page: HtmlPage, records: Sequence[RunRecord], analysis: SweepAnalysis
) -> None:
    """How far and how noisily each run moved, and the optimizers side by side."""
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
    if len({g.optimizer for g in analysis.groups}) <= 1:
        return
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


def _plan_section(page: HtmlPage, analysis: SweepAnalysis) -> None:
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
        PLAN_HEADERS,
        plan_rows(analysis),
        caption="Relative to the plan's reference run (B0, lr0); 'ladder' rows use the sweep's LR rule.",
    )


def write_sweep_report(
    spec: SweepSpec,
    records: Sequence[RunRecord],
    analysis: SweepAnalysis,
    directory: str | Path,
    *,
    reproduce: Sequence[str] = (),
) -> Path:
    """Write `directory/report.html` for an analyzed sweep; return its path."""
    page = sweep_page(spec, records, analysis, reproduce)
    return page.write(Path(directory) / REPORT_FILE)


def build_sweep_report(
    directory: str | Path,
    *,
    target: str | None = None,
    n_boot: int = 500,
    reproduce: Sequence[str] = (),
) -> Path:
    """Write `DIR/report.html` from the store alone, without training anything."""
    spec, contents = load_sweep(directory)
    analysis = analyze_sweep(
        spec, contents.records, target=target, n_boot=n_boot, store_warnings=contents.warnings
    )
    return write_sweep_report(spec, contents.records, analysis, directory, reproduce=reproduce)
