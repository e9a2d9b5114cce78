"""The plan as one self-contained HTML page (`batchlab plan --out DIR`, `batchlab report`)."""

from __future__ import annotations

from pathlib import Path

from batchlab.measure.sizes import format_bytes
from batchlab.planner.plan_types import Plan, Recommendation
from batchlab.report.html import Card, HtmlPage, esc
from batchlab.report.plan_plots import plot_noise_trajectory, plot_time_to_target

REPORT_FILE = "report.html"


def _rec_cards(title: str, rec: Recommendation, b0: float, accent: bool) -> list[Card]:
    return [
        Card(f"{title}: batch size", str(rec.batch_size),
             f"{rec.accumulation_steps} x {rec.micro_batch_size} micro-batch", accent=accent),
        Card(f"{title}: learning rate", f"{rec.lr:.3g}",
             f"{rec.lr_rule} rule, warm-up {rec.warmup_steps} steps", accent=accent),
        Card(f"{title}: predicted", f"{rec.predicted_speedup:.2f}x",
             f"time to target vs B0={b0:g}{_span(rec.predicted_speedup_interval)}",
             accent=accent),
    ]  # fmt: skip


def _span(interval: tuple[float, float] | None) -> str:
    return "" if interval is None else f" (interval {interval[0]:.2f}-{interval[1]:.2f}x)"


def plan_page(plan: Plan) -> HtmlPage:
    """Lay out the plan's page: the picks, why, the figures, the candidate table."""
    b0 = plan.reference["batch_size"]
    m = plan.measurements
    subtitle = (
        f"{plan.device} · measured in {plan.plan_seconds:.1f} s and {plan.plan_steps} training "
        f"steps · reference B0={b0:g}, lr={plan.reference['lr']:g} ({m.optimizer})"
    )
    if plan.partial:
        subtitle += " · PARTIAL"
    page = HtmlPage(f"batchlab plan: {plan.task}", subtitle=subtitle)
    page.cards(
        _rec_cards("fastest", plan.recommended, b0, True)
        + _rec_cards("efficient", plan.efficient, b0, False)
        + [
            Card(
                "memory max",
                str(plan.max_batch_size),
                f"budget {format_bytes(m.budget_bytes)}, margin {m.margin:.0%}",
            ),
            Card("throughput knee", str(plan.knee_batch_size), ">= 90% of peak samples/s"),
            Card("predicted critical batch", f"{plan.b_simple:.0f}", _noise_note(plan)),
        ]  # fmt: skip
    )
    if plan.verdict:
        page.section("Verdict")
        page.paragraph(plan.verdict)
    _noise_section(page, plan)
    _schedule_section(page, plan)
    page.section("Why")
    for name, rec in (("Fastest", plan.recommended), ("Efficient", plan.efficient)):
        items = "".join(
            f"<li><b>{esc(key.replace('_', ' '))}</b>: {esc(rec.reasons.get(key, ''))}</li>"
            for key in ("batch_size", "lr", "lr_check", "warmup", "accumulation")
            if key in rec.reasons
        )
        page.html(f"<p><b>{name}</b> (B={rec.batch_size})</p><ul>{items}</ul>")
    page.section("Warnings")
    page.warnings([f"{w.message} ({w.code})" for w in plan.warnings])
    _figure_sections(page, plan)
    page.section("Candidates")
    header, rows, highlight = _candidate_table(plan)
    page.table(header, rows, highlight=highlight)
    alts = ", ".join(f"{k}: {v:.4g}" for k, v in plan.lr_alternatives.items())
    page.paragraph(f"Learning rate at B={plan.recommended.batch_size} under each rule: {alts}.")
    _lr_check_section(page, plan)
    if plan.command:
        page.reproduce(plan.command)
    return page


def _figure_sections(page: HtmlPage, plan: Plan) -> None:
    """Predicted time to target and B_simple; then memory and throughput when measured."""
    page.section(
        "What learns fastest, and what that costs",
        "S(B) = S_min (1 + B_noise/B) (McCandlish et al. 2018) times the measured step time.",
    )
    figures = [(plot_time_to_target(plan).figure, "Predicted time to target, relative to B0")]
    if plan.noise is not None:
        from batchlab.report.noise_plots import plot_noise_run

        ax = plot_noise_run(plan.noise)
        figures.append((ax.figure, "B_simple over the measured training phase, and the loss"))
    figures.append(
        (plot_noise_trajectory(plan).figure, "B_noise against the loss: the fit and the target")
    )
    if plan.schedule is not None:
        from batchlab.report.schedule_plots import plot_schedule

        figures.append((plot_schedule(plan).figure, "The schedule B(t) over B_noise(t)"))
    page.figures(figures)
    if plan.probe is not None:
        from batchlab.report.probe_plots import plot_memory, plot_throughput

        page.section("What fits and what runs fastest")
        page.figures(
            [
                (plot_memory(plan.probe.memory).figure, "Peak memory of one training step"),
                (
                    plot_throughput(plan.probe.throughput_profile()).figure,
                    "Throughput (median and spread over timed windows)",
                ),
            ]
        )


def _noise_note(plan: Plan) -> str:
    if plan.b_simple_interval is None:
        return plan.b_simple_source
    lo, hi = plan.b_simple_interval
    return f"interval {lo:.0f}-{hi:.0f}; {plan.b_simple_source}"


def _noise_section(page: HtmlPage, plan: Plan) -> None:
    """The trajectory in numbers: fit, value at the target, path end, cost."""
    o = plan.noise_outlook
    if o is None:
        return
    t = o.trajectory
    lo, hi = o.b_noise_at_target_interval
    page.section("B_noise along the run")
    items = [
        f"fit ({t.kind}, {t.num_points} points): log B = {t.log_scale:.2f} {t.exponent:+.2f} log L",
        f"at the target: training loss {o.target_loss:.3g} at step {o.end_step:.0f}, "
        f"B_noise {o.b_noise_at_target:.0f} (interval {lo:.0f}-{hi:.0f})"
        + (", extrapolated" if o.extrapolated else ""),
        f"path ends at {o.path_end}",
        f"predicted critical batch (S_min-weighted mean over the path): {plan.b_simple:.0f}",
    ]
    c = plan.cost
    if c:
        items.append(
            f"cost: the noise phase trained {c['noise_examples']:.0f} examples, "
            f"{c['noise_fraction']:.1%} of the reference training's {c['reference_examples']:.0f}"
        )
    page.html("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul>")


def _schedule_section(page: HtmlPage, plan: Plan) -> None:
    """The schedule's phases and predictions, as the plan made them."""
    fc = plan.schedule
    if fc is None:
        return
    page.section("Batch-size schedule", fc.reasons.get("batch", ""))
    items = [
        f"from {p.start} examples (~step {step:.0f}): B={p.batch_size} "
        f"({p.micro_batch_size} x {p.accumulation_steps}), lr {p.lr:.4g}, B_noise {bn:.0f}"
        for p, step, bn in zip(fc.schedule.phases, fc.phase_steps, fc.phase_b_noise, strict=True)
    ]
    items += [fc.reasons.get("gain", ""), f"lr: {fc.reasons.get('lr', '')}"]
    page.html("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul>")


def _lr_check_section(page: HtmlPage, plan: Plan) -> None:
    """The LRs probed at the recommended batch, their tail losses and the one chosen."""
    check = plan.lr_check
    if check is None:
        return
    page.section(
        "Learning-rate check",
        f"{check.verdict}. Each LR trained {check.steps_per_lr} steps at B={check.batch_size} "
        f"({check.accumulation_steps} x {check.micro_batch_size}) from {check.started_from}; the "
        f"losses are means over the first and the last {check.tail_steps} steps.",
    )
    if not check.trials:
        return
    header = ["lr", "x rule", "training loss: first -> last steps (mean)", "outcome", ""]
    rows, highlight = [], []
    for i, t in enumerate(sorted(check.trials, key=lambda t: t.lr)):
        tail = "non-finite" if t.tail_loss is None else f"{t.tail_loss:.4g} ± {t.tail_se:.2g}"
        loss = tail if t.head_loss is None else f"{t.head_loss:.4g} -> {tail}"
        marks = [
            m for m, on in (("rule", t.factor == 1.0), ("chosen", t.lr == check.chosen_lr)) if on
        ]
        if t.lr == check.chosen_lr:
            highlight.append(i)
        rows.append([f"{t.lr:.4g}", f"{t.factor:g}", loss, t.outcome, ", ".join(marks)])
    page.table(header, rows, highlight=highlight)
    page.paragraph(
        f"Cost: {check.examples} examples, {check.fraction_of_reference:.1%} of the reference "
        f"training's {check.reference_examples}; {check.seconds:.1f} s."
    )


def _candidate_table(plan: Plan) -> tuple[list[str], list[list], list[int]]:
    """Header, rows and highlighted rows (the fastest) of the candidate table."""
    b0 = plan.reference["batch_size"]
    header = ["batch", "micro x accum", "steps vs B0", "ms / step", "predicted speedup",
              "interval", ""]  # fmt: skip
    rows, highlight = [], []
    for i, c in enumerate(plan.candidates):
        marks = []
        if c.batch_size == b0:
            marks.append("reference")
        if c.batch_size == plan.recommended.batch_size:
            marks.append("fastest")
            highlight.append(i)
        if c.batch_size == plan.efficient.batch_size:
            marks.append("efficient")
        if c.timing != "measured":
            marks.append(c.timing)  # "head-to-head", "interpolated" or "extrapolated"
        rows.append(
            [
                c.batch_size,
                f"{c.micro_batch_size} x {c.accumulation_steps}",
                f"{c.steps_factor:.2f}",
                f"{c.step_s * 1e3:.2f}",
                f"{c.predicted_speedup:.2f}x",
                "-" if c.speedup_low is None else f"{c.speedup_low:.2f}-{c.speedup_high:.2f}x",
                ", ".join(marks),
            ]
        )
    return header, rows, highlight


def write_plan_report(plan: Plan, out_dir: str | Path) -> Path:
    """Write `out_dir/report.html`; return its path."""
    return plan_page(plan).write(Path(out_dir) / REPORT_FILE)
