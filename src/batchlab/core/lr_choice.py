"""Choosing among a few probed learning rates: the pure half of the plan's LR check.

A scaling rule (linear, sqrt, AdaScale) extrapolates the LR from a known-good `(B0, lr0)`;
past the critical batch it stops holding (McCandlish et al. 2018, fig. 5; Shallue et al.
2019, fig. 8: the best LR plateaus while the linear rule keeps growing, and diverges). The
planner (`batchlab.planner.lr_check`) therefore trains the rule's LR and its neighbours for
a few steps from the same start (where the plan's noise phase ended) and hands the loss
logs here. Nothing here measures.

The decision, in words: keep the rule's LR unless another LR reached a clearly lower
training loss (lower by more than the noise of the tail averages, and by more than
`rel_margin`); otherwise take, among the LRs within that margin of the best, the one
closest to the rule's. The margin is wide (5%) on purpose: a short probe favours small
LRs (the short-horizon bias of Wu et al. 2018; on MNIST-1D at B=1024 a 4.5% lead of x0.5
after 20 steps did not survive the whole run, benchmarks/results/lr_check.md). A run whose loss went non-finite, or ended no lower than it started,
did not train and is never chosen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from batchlab.results import JsonResult

PROBE_FACTORS = (1.0, 0.5, 2.0)  # in this order; x2 only while x1 is the choice
MIN_PROBE_STEPS = 40  # ~4 momentum horizons (1/(1-0.9) = 10 steps); 20-30 favoured small LRs
PROBE_STEP_FRACTION = 0.0025  # of the planned run's steps, per LR, when that is more
MAX_STEPS_DOWN = 3  # extra halvings below x0.5 when the best is at the small edge
MAX_STEPS_UP = 2  # extra doublings above x2 when the best is at the large edge
REL_MARGIN = 0.05  # "clearly" lower: by more than 5% of the loss and more than its noise
MIN_PROGRESS = 0.01  # "trained": the loss ended >1% below every loss of the first steps
MAX_RISE = 1.0  # "diverged": the loss ended above twice the first step's (batch noise is less)


@dataclass(frozen=True)
class LrTrial(JsonResult):
    """One probed LR: its training-loss log summarised."""

    lr: float
    factor: float  # lr / the rule's lr
    head_loss: float | None  # mean loss of the first `tail_steps` steps (same weights for all)
    head_range: tuple[float, float] | None  # the lowest and highest loss of those steps
    tail_loss: float | None  # mean loss of the last `tail_steps` steps; None: non-finite
    tail_se: float | None  # its standard error (std / sqrt(n) over those steps)
    steps: int
    examples: int
    diverged_step: int | None = None
    # The first step's loss: at the start's weights, on the same batch for every LR (None in
    # files written before it was recorded).
    start_loss: float | None = None

    @property
    def outcome(self) -> str:
        """`diverged`: non-finite, or the last steps' mean loss is above every loss of the
        first steps, or `MAX_RISE` above the first step's; `trained`: below every loss of
        the first steps (by `MIN_PROGRESS`); else `stalled`.

        Against the first window's range, not its mean and noise: a loss that falls or
        explodes fast has a trend that would swamp a standard error, and noise alone
        rarely puts a mean outside the range of as many single values. The rise above the
        start catches a blow-up inside the first window, which the range then contains:
        from the plan's noise phase (loss 0.3) the linear rule on mnist1d-cnn at B=1024
        jumped to chance (ln 10 = 2.3) within 10 steps and stayed there."""
        if self.tail_loss is None or self.head_range is None:
            return "diverged"
        low, high = self.head_range
        if self.tail_loss > high:
            return "diverged"
        start = self.start_loss
        if start is not None and self.tail_loss - start > MAX_RISE * abs(start):
            return "diverged"
        if self.tail_loss < low - MIN_PROGRESS * abs(low):
            return "trained"
        return "stalled"

    @property
    def trained(self) -> bool:
        return self.outcome == "trained"


@dataclass(frozen=True)
class LrCheck(JsonResult):
    """What the plan's LR check tried at the recommended batch, and what it chose."""

    batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    rule: str
    rule_lr: float
    chosen_lr: float
    action: str  # "kept", "lowered", "raised" or "none-trained"
    verdict: str  # one sentence, e.g. "lowered from 1.28 (did not train) to 0.32"
    trials: tuple[LrTrial, ...]
    steps_per_lr: int
    warmup_steps: int
    tail_steps: int
    examples: int  # all probe runs together
    reference_examples: int  # the reference training: epochs x training examples
    seconds: float = 0.0
    # Where every probe started: "initialisation", or e.g. "where the noise phase ended
    # (step 125 at B=32)"; files written before this field started from initialisation.
    started_from: str = "initialisation"

    @property
    def fraction_of_reference(self) -> float:
        return self.examples / self.reference_examples if self.reference_examples else math.nan

    @property
    def summary(self) -> str:
        """The verdict and what it cost, in one sentence (the plan's reason, the CLI line)."""
        if not self.trials:
            return self.verdict
        return (
            f"{self.verdict}; {len(self.trials)} probes of {self.steps_per_lr} steps from "
            f"{self.started_from}, {self.fraction_of_reference:.1%} of the reference "
            "training's examples"
        )

    @property
    def tried_lrs(self) -> tuple[float, ...]:
        return tuple(t.lr for t in self.trials)

    @property
    def losses(self) -> tuple[float | None, ...]:
        return tuple(t.tail_loss for t in self.trials)


def probe_steps(planned_steps: int) -> int:
    """Steps per probed LR: `PROBE_STEP_FRACTION` of the planned run, at least `MIN_PROBE_STEPS`.

    The floor is what shows an instability under momentum 0.9 and a loss trend; probes
    continuing from the plan's noise phase needed 40 (at 20-30 they took the smaller LR more
    often than the sweep's best: lr_check.md, section 4). On long runs (ImageNet-scale,
    >16000 steps) the fraction takes over so each LR sees 0.25% of them.
    """
    return max(MIN_PROBE_STEPS, math.ceil(PROBE_STEP_FRACTION * planned_steps))


def summarize_trial(
    factor: float,
    rule_lr: float,
    losses: Sequence[float],
    *,
    steps: int,
    examples: int,
    tail_steps: int,
    diverged_step: int | None = None,
) -> LrTrial:
    """Tail-average the per-step training losses of the probe at `factor` x the rule's LR.

    The tail mean over the last `tail_steps` steps (not the last loss) because one step's
    batch loss swings; a non-finite loss means the LR did not train."""
    finite = all(math.isfinite(x) for x in losses) and diverged_step is None
    head = list(losses[:tail_steps])
    head_loss, _ = _mean_se(head)
    head_range = None if head_loss is None else (min(head), max(head))
    tail_loss, tail_se = _mean_se(losses[-tail_steps:]) if finite else (None, None)
    return LrTrial(
        lr=rule_lr * factor,
        factor=factor,
        head_loss=head_loss,
        head_range=head_range,
        tail_loss=tail_loss,
        tail_se=tail_se,
        steps=steps,
        examples=examples,
        diverged_step=diverged_step,
        start_loss=losses[0] if losses and math.isfinite(losses[0]) else None,
    )


def _mean_se(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and standard error (std / sqrt(n)); None for no values or a non-finite one."""
    if not values or not all(math.isfinite(x) for x in values):
        return None, None
    mean = sum(values) / len(values)
    var = sum((x - mean) ** 2 for x in values) / max(1, len(values) - 1)
    return mean, math.sqrt(var / len(values))


def _within_margin(trial: LrTrial, best: LrTrial, rel_margin: float) -> bool:
    """`trial` is not clearly worse than `best`: within the tails' noise or `rel_margin`."""
    noise = 2.0 * math.hypot(trial.tail_se or 0.0, best.tail_se or 0.0)
    return trial.tail_loss - best.tail_loss <= max(noise, rel_margin * abs(best.tail_loss))


def choose(trials: Sequence[LrTrial], *, rel_margin: float = REL_MARGIN) -> LrTrial | None:
    """The trained LR within the margin of the best loss that is closest to the rule's
    (on a log scale; the smaller on a tie). None when no LR trained."""
    trained = [t for t in trials if t.trained]
    if not trained:
        return None
    best = min(trained, key=lambda t: t.tail_loss)
    near = [t for t in trained if _within_margin(t, best, rel_margin)]
    return min(near, key=lambda t: (abs(math.log(t.factor)), t.factor))


def next_factor(
    trials: Sequence[LrTrial],
    *,
    max_steps_down: int = MAX_STEPS_DOWN,
    rel_margin: float = REL_MARGIN,
) -> float | None:
    """The next factor of the rule's LR to probe, or None when the choice is settled.

    x1 first, then x0.5, then x2 only while x1 is the choice (when x1 did not train or
    x0.5 beat it clearly, a larger LR is not worth its cost). Then one more doubling while
    the choice sits at the largest LR tried (at most `MAX_STEPS_UP` times above x2), or one
    more halving while it sits at the smallest (or every LR tried diverged), at most
    `max_steps_down` times below x0.5.
    """
    tried = {round(t.factor, 12) for t in trials}
    chosen = choose(trials, rel_margin=rel_margin) if trials else None
    for factor in PROBE_FACTORS:
        if factor in tried:
            continue
        if factor > 1.0 and (chosen is None or not math.isclose(chosen.factor, 1.0)):
            continue
        return factor
    largest = max(t.factor for t in trials)
    if chosen is not None and chosen.factor == largest > 1.0:
        # A larger LR won clearly although a short probe favours small ones (Wu et al.
        # 2018): the rule is below the best LR, so look further up (dots at B=512 from
        # B0=32: the sqrt rule's 0.08, its x2 won, the sweep's best LR was x4).
        return largest * 2 if largest < 2.0 * 2.0**MAX_STEPS_UP else None
    smallest = min(t.factor for t in trials)
    if smallest <= 0.5 * 0.5**max_steps_down:
        return None
    if chosen is None:  # keep halving only while every LR tried diverged
        return smallest / 2 if all(t.outcome == "diverged" for t in trials) else None
    if chosen.factor == smallest and chosen.factor < 1.0:
        return smallest / 2
    return None


def decide(
    trials: Sequence[LrTrial], rule_lr: float, *, rel_margin: float = REL_MARGIN
) -> tuple[float, str, str]:
    """`(chosen lr, action, verdict)` from the probed trials, in words a plan can print."""
    x1 = next((t for t in trials if math.isclose(t.factor, 1.0)), None)
    chosen = choose(trials, rel_margin=rel_margin)
    why = _why_not(x1)
    if chosen is None:
        return _no_lr_trained(trials, rule_lr, x1)
    if math.isclose(chosen.lr, rule_lr):
        return chosen.lr, "kept", f"kept the rule's {rule_lr:.3g} (tried {_lrs(trials)})"
    smallest = min(t.lr for t in trials)
    edge = " (the smallest tried)" if chosen.lr == smallest and chosen.lr < rule_lr else ""
    if chosen.lr < rule_lr:
        return (
            chosen.lr,
            "lowered",
            f"lowered from {rule_lr:.3g} ({why}) to {chosen.lr:.3g}{edge} (tried {_lrs(trials)})",
        )
    return (
        chosen.lr,
        "raised",
        f"raised from {rule_lr:.3g} to {chosen.lr:.3g}: clearly lower loss (tried {_lrs(trials)})",
    )


def _no_lr_trained(
    trials: Sequence[LrTrial], rule_lr: float, x1: LrTrial | None
) -> tuple[float, str, str]:
    """No LR lowered the loss measurably: keep the rule's unless it diverged."""
    steps = max(t.steps for t in trials)
    if x1 is not None and x1.outcome == "stalled":
        return (
            rule_lr,
            "kept",
            f"kept the rule's {rule_lr:.3g} unverified: no probed LR lowered the loss "
            f"measurably in {steps} steps (tried {_lrs(trials)})",
        )
    calm = [t for t in trials if t.outcome != "diverged"]
    if calm:
        pick = max(calm, key=lambda t: t.lr)
        return (
            pick.lr,
            "lowered",
            f"lowered from {rule_lr:.3g} ({_why_not(x1)}) to {pick.lr:.3g}, the largest that "
            f"did not diverge; none lowered the loss measurably in {steps} steps "
            f"(tried {_lrs(trials)})",
        )
    smallest = min(trials, key=lambda t: t.lr)
    return (
        smallest.lr,
        "none-trained",
        f"every probed LR diverged (tried {_lrs(trials)}); lowered from {rule_lr:.3g} to the "
        f"smallest tried, {smallest.lr:.3g}: check the reference lr",
    )


def _why_not(x1: LrTrial | None) -> str:
    if x1 is None:
        return "not probed"
    if x1.tail_loss is None:
        return f"diverged at step {x1.diverged_step}" if x1.diverged_step else "diverged"
    if x1.outcome == "diverged":
        start = x1.head_loss if x1.start_loss is None else x1.start_loss
        return f"diverged: loss rose from {start:.3g} to {x1.tail_loss:.3g}"
    if x1.outcome == "stalled":
        return f"no measurable progress, loss {x1.tail_loss:.3g}"
    return f"clearly higher loss, {x1.tail_loss:.3g}"


def _lrs(trials: Sequence[LrTrial]) -> str:
    return ", ".join(f"{t.lr:.3g}" for t in sorted(trials, key=lambda t: t.lr))
