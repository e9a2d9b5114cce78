"""`AdaptiveBatchSize`: pick the batch size that makes training progress fastest, as it goes.

Goodput (Qiao et al. 2021, "Pollux", OSDI'21, eq. 1) is throughput times statistical
efficiency. With the simple noise scale B_simple (McCandlish et al. 2018, eq. 2.8) and the
reference batch B0 where the learning rate lr0 is known to work, the efficiency of batch B
relative to B0 is

    E(B) = (B_simple + B0) / (B_simple + B)

(one example at batch B is worth E(B) examples at B0), so

    goodput(b, k) = samples_per_second(b, k) * E(b * k * world_size)

in reference-batch examples per second. That is B0 (1 + B_noise/B0) / [(1 + B_noise/B) t(B)]
with t(B) the step time, so the batch with the most goodput is the one that minimises
(1 + B_noise/B) t(B): the plan's rule (`core.schedule.fastest_batch`, McCandlish et al.
eq. 2.11), which the controller calls, with the same step-time model (`core.step_time`)
fitted to the run's own timings and S(B)/S(B0) from `core.tradeoff`. At every `interval`
optimizer steps it scores a ladder of batch sizes within `max_growth` of the current one,
each split into the largest micro-batch the memory cap allows times the fewest accumulation
steps, and switches only when the best beats the current choice by more than `threshold`
(hysteresis: B_simple is noisy). Each `Decision` carries a one-line `reason`.

The learning rate follows the AdaScale gain r = (B/B0) E(B) (Johnson et al. 2020) for
SGD-like optimizers and sqrt(r) for Adam-like ones (as AdaptDL's AdamScale does: Adam's
update is already normalised, and sqrt matches the square-root rule of Hoffer et al. 2017
and Malladi et al. 2022 in the noise-dominated regime). Progress is counted in reference
examples, sum of r * B0 = B * E(B) over steps, so "N epochs" keeps meaning N epochs at B0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from batchlab.adaptive.throughput_model import ThroughputModel
from batchlab.core.batching import split
from batchlab.core.checks import check_batch_size, check_lr
from batchlab.core.lr import (
    ADAPTIVE_LR_RULES,
    adascale_gain,
    check_lr_rule,
    efficiency,
    lr_from_gain,
    scale_lr,
)
from batchlab.core.optim import default_lr_rule
from batchlab.core.schedule import fastest_batch
from batchlab.core.step_time import StepTimeModel
from batchlab.core.tradeoff import relative_steps
from batchlab.errors import ConfigError
from batchlab.results import JsonResult

LrRule = str | Callable[[float, float], float]


@dataclass(frozen=True)
class Decision(JsonResult):
    """One evaluation of the controller, kept in its log whether or not it switched."""

    step: int  # optimizer steps done; the choice applies from step + 1
    batch_size: int  # examples per optimizer step over all replicas
    micro_batch_size: int  # examples per forward/backward on one replica
    accumulation_steps: int
    lr: float  # learning rate from step + 1 on (before any warm-up factor)
    b_simple: float | None  # the smoothed noise scale it used (None: no estimate yet)
    predicted_goodput: float | None  # reference examples per second at this choice
    efficiency: float | None  # E(batch_size) relative to the reference batch
    gain: float  # predicted goodput of this choice / that of the previous one
    action: str  # start, keep, switch, explore (time a new micro-batch size at the same B)
    reason: str = ""  # one line: what it used and why it chose this


class AdaptiveBatchSize:
    """Chooses `(micro_batch_size, accumulation_steps)` and the learning rate during training.

    Args:
        reference_batch_size: B0, where `reference_lr` is known to work. Also the smallest
            batch it picks unless `min_batch_size` says otherwise.
        reference_lr: lr0.
        optimizer: the optimizer (instance, class or class name); picks the lr rule when
            `lr_rule="auto"`.
        lr_rule: `auto` (default), `adascale`, `sqrt-adascale`, `none`, or a function
            `(lr0, gain) -> lr` given the AdaScale gain r; or `linear` / `sqrt`, the fixed
            rules at the current batch (how a plan couples its schedule's LRs by default).
        max_micro_batch_size: the memory cap, in examples per micro-batch on one replica
            (e.g. `probe_memory(...).max_batch_size`). None: no cap.
        max_batch_size: the largest batch over all replicas (default 64 * B0).
        min_batch_size: the smallest (default B0).
        max_accumulation_steps: most micro-batches per optimizer step (default 16).
        world_size: data-parallel replicas; batch = micro * accumulation * world_size.
        interval: optimizer steps between decisions (default 50).
        threshold: relative goodput gain needed to switch (default 0.05, i.e. 5%).
        max_growth: the batch changes by at most this factor per decision (default 2): the
            throughput line is extrapolated beyond the sizes timed so far, so move in steps.
        ladder_ratio: ratio between neighbouring candidate batch sizes (default 2**0.25).
        throughput: the `ThroughputModel` to read (a fresh one by default); the training loop
            feeds it measured micro-batch and optimizer-step times.
        explore: when only one micro-batch size has been timed, time another one at the same
            batch (half the micro-batch, twice the accumulation), which changes nothing in
            the optimisation and makes the throughput line identifiable. Default True.
        fixed_micro_batch_size: only the accumulation steps may change (for trainers that
            own their data loader, e.g. the Hugging Face Trainer).
        fixed_accumulation_steps: only the micro-batch size may change (for trainers that
            cannot change accumulation mid-epoch, e.g. Lightning).
        start: `(batch_size, lr, why)` to start from instead of (B0, lr0), e.g. a plan's first
            schedule phase; the lr rule is then rescaled so that it gives `lr` at that batch
            (a plan's LR-check correction carries over to every later decision).
    """

    def __init__(
        self,
        reference_batch_size: int,
        reference_lr: float,
        *,
        optimizer: torch.optim.Optimizer | type | str | None = None,
        lr_rule: LrRule = "auto",
        max_micro_batch_size: int | None = None,
        max_batch_size: int | None = None,
        min_batch_size: int | None = None,
        max_accumulation_steps: int = 16,
        world_size: int = 1,
        interval: int = 50,
        threshold: float = 0.05,
        max_growth: float = 2.0,
        ladder_ratio: float = 2**0.25,
        throughput: ThroughputModel | None = None,
        explore: bool = True,
        fixed_micro_batch_size: int | None = None,
        fixed_accumulation_steps: int | None = None,
        start: tuple[int, float, str, float | None] | None = None,
    ) -> None:
        self.reference_batch_size = check_batch_size(reference_batch_size, what="reference batch")
        self.reference_lr = check_lr(reference_lr, what="reference lr")
        self.world_size = check_batch_size(world_size, what="world size")
        self.max_accumulation_steps = check_batch_size(
            max_accumulation_steps, what="max accumulation steps"
        )
        self.interval = check_batch_size(interval, what="decision interval")
        self.min_batch_size = check_batch_size(
            reference_batch_size if min_batch_size is None else min_batch_size,
            what="min batch size",
        )
        self.max_batch_size = check_batch_size(
            64 * reference_batch_size if max_batch_size is None else max_batch_size,
            what="max batch size",
        )
        if self.max_batch_size < self.min_batch_size:
            raise ConfigError(
                f"max batch size: expected at least the min batch size {self.min_batch_size}, "
                f"got {self.max_batch_size}; raise it or lower min_batch_size"
            )
        if max_micro_batch_size is not None:
            check_batch_size(max_micro_batch_size, what="memory cap (max micro-batch size)")
            if max_micro_batch_size * self.world_size < self.min_batch_size:
                raise ConfigError(
                    f"memory cap: expected at least {math.ceil(self.min_batch_size / self.world_size)}"
                    f" examples per micro-batch (the reference batch B0={self.min_batch_size} over "
                    f"{self.world_size} replica(s)), got {max_micro_batch_size}; the reference "
                    "setting itself does not fit, so give a task with a smaller reference batch "
                    "or a larger memory budget"
                )
        self.max_micro_batch_size = max_micro_batch_size
        self.threshold = _check_number(threshold, "threshold", "in [0, 10)", lambda v: 0 <= v < 10)
        self.max_growth = _check_number(max_growth, "max growth", "> 1", lambda v: v > 1)
        self.ladder_ratio = _check_number(ladder_ratio, "ladder ratio", "> 1", lambda v: v > 1)
        if fixed_micro_batch_size is not None:
            check_batch_size(fixed_micro_batch_size, what="fixed micro-batch size")
        if fixed_accumulation_steps is not None:
            check_batch_size(fixed_accumulation_steps, what="fixed accumulation steps")
        if fixed_micro_batch_size is not None and fixed_accumulation_steps is not None:
            raise ConfigError(
                "adaptive batch: fixing both the micro-batch size and the accumulation steps "
                "leaves nothing to adapt; fix at most one"
            )
        self.fixed_micro_batch_size = fixed_micro_batch_size
        self.fixed_accumulation_steps = fixed_accumulation_steps
        self.lr_rule = self._resolve_rule(lr_rule, optimizer)
        self.throughput = throughput if throughput is not None else ThroughputModel()
        self.explore = explore

        self.lr_scale = 1.0  # the start's lr over the rule's at the start's batch
        start_noise = None if start is None else start[3]
        micro, accum, why = self._start(start)
        self.micro_batch_size = micro
        self.accumulation_steps = accum
        self.b_simple: float | None = None
        self.lr = self.lr_for(self.batch_size, start_noise)
        self.steps = 0
        self.examples = 0
        self.reference_examples = 0.0  # progress: sum of B * E(B) over steps
        self.decisions: list[Decision] = [
            Decision(
                step=0,
                batch_size=self.batch_size,
                micro_batch_size=micro,
                accumulation_steps=accum,
                lr=self.lr,
                b_simple=None,
                predicted_goodput=None,
                efficiency=None,
                gain=1.0,
                action="start",
                reason=f"start at B={self.batch_size} ({micro} x {accum}): {why}",
            )
        ]

    def _start(self, start: tuple[int, float, str, float | None] | None) -> tuple[int, int, str]:
        """The first (micro, accumulation) and why; sets `lr_scale` for a given start
        (batch, lr, why, the B_noise the start's lr was coupled at: under an AdaScale rule
        the gain's E(B) must not be folded into `lr_scale`, or every later decision, which
        applies the gain at the measured B_noise, would count it twice)."""
        if start is None:
            micro, accum = self._split(self.min_batch_size)
            return micro, accum, f"the reference batch B0 at lr {self.reference_lr:.4g}"
        batch, lr, why, noise = start
        check_batch_size(batch, what="start batch")
        if not self.min_batch_size <= batch <= self.max_batch_size:
            raise ConfigError(
                f"start batch: expected {self.min_batch_size}-{self.max_batch_size} (the "
                f"min and max batch size), got {batch}; widen them or start elsewhere"
            )
        micro, accum = self._split(batch)
        self.lr_scale = check_lr(lr, what="start lr") / self.lr_for(
            micro * accum * self.world_size, noise
        )
        return micro, accum, why

    # ----------------------------------------------------------------- formulas
    @property
    def batch_size(self) -> int:
        return self.micro_batch_size * self.accumulation_steps * self.world_size

    def efficiency(self, batch_size: int, b_simple: float | None) -> float:
        """E(B) relative to B0; 1 while no noise estimate exists (B is then B0 anyway)."""
        if b_simple is None:
            return 1.0
        return efficiency(batch_size, self.reference_batch_size, b_simple)

    def gain(self, batch_size: int, b_simple: float | None) -> float:
        """AdaScale gain r = (B/B0) E(B) (Johnson et al. 2020): B0-steps one step is worth.

        B/B0 while no noise estimate exists (E = 1).
        """
        if b_simple is None:
            return batch_size / self.reference_batch_size
        return adascale_gain(batch_size, self.reference_batch_size, b_simple)

    def lr_for(self, batch_size: int, b_simple: float | None) -> float:
        """The lr rule at the AdaScale gain of `batch_size`, times the start's `lr_scale`."""
        r = self.gain(batch_size, b_simple)
        rule, lr0 = self.lr_rule, self.reference_lr * self.lr_scale
        if callable(rule):
            lr = float(rule(lr0, r))
            return check_lr(lr, what="learning rate from the custom lr rule")
        if rule in ("linear", "sqrt"):  # the fixed rules: B alone, as a plan couples its phases
            return scale_lr(lr0, self.reference_batch_size, batch_size, rule)
        return lr_from_gain(lr0, r, rule)

    def predicted_goodput(
        self, micro_batch_size: int, accumulation_steps: int, b_simple: float, fit: StepTimeModel
    ) -> float:
        """Reference-batch examples per second: throughput(B) * E(B), which is
        B0 / [S(B)/S(B0) * t(B)] with S(B) from McCandlish et al. eq. 2.11
        (`core.tradeoff.relative_steps`): the inverse of the plan's cost per stretch."""
        seconds = fit.step_seconds(micro_batch_size, accumulation_steps, self.world_size)
        batch = micro_batch_size * accumulation_steps * self.world_size
        steps = relative_steps(batch, self.reference_batch_size, b_simple)
        return self.reference_batch_size / (steps * seconds)

    # ----------------------------------------------------------------- candidates
    def _split(self, batch_size: int) -> tuple[int, int]:
        """Largest micro-batch under the cap, fewest accumulation steps, for >= batch_size."""
        return split(
            batch_size,
            self.max_micro_batch_size,
            self.world_size,
            fixed_micro=self.fixed_micro_batch_size,
            fixed_accumulation=self.fixed_accumulation_steps,
        )

    def candidates(self) -> list[tuple[int, int]]:
        """`(micro, accumulation)` pairs on the batch ladder, within every limit."""
        out: dict[int, tuple[int, int]] = {}
        size = float(self.min_batch_size)
        while True:
            batch = round(size)
            if batch > self.max_batch_size:
                break
            micro, accum = self._split(batch)
            real = micro * accum * self.world_size
            fits = self.max_micro_batch_size is None or micro <= self.max_micro_batch_size
            if fits and accum <= self.max_accumulation_steps and real <= self.max_batch_size:
                out.setdefault(real, (micro, accum))
            size *= self.ladder_ratio
        return [out[b] for b in sorted(out)]

    def _exploration(self) -> tuple[int, int] | None:
        micro, accum = self.micro_batch_size, self.accumulation_steps
        cap = self.max_micro_batch_size or math.inf
        if self.fixed_micro_batch_size is not None:
            return None  # one micro-batch size: its time alone is the whole model
        if self.fixed_accumulation_steps is not None:
            # Only the micro-batch can move, so time the next size up (the batch grows).
            bigger = math.ceil(micro * self.ladder_ratio**2)
            if bigger <= cap and bigger * accum * self.world_size <= self.max_batch_size:
                return bigger, accum
            return None
        if accum % 2 == 0 and 2 * micro <= cap:
            return 2 * micro, accum // 2
        if micro >= 2 and 2 * accum <= self.max_accumulation_steps:
            return math.ceil(micro / 2), 2 * accum
        return None

    # ----------------------------------------------------------------- decisions
    def due(self, step: int) -> bool:
        """Whether `step` (optimizer steps done) is a decision point."""
        return step > 0 and step % self.interval == 0

    def decide(self, step: int, b_simple: float | None, source: str = "") -> Decision:
        """Re-plan at an optimizer-step boundary; returns (and logs) the choice from step + 1.

        `b_simple` is the smoothed noise scale now (None or non-finite: no estimate yet, so
        the batch stays where it is); `source` says in a few words where it came from, for
        the decision's one-line `reason`. The choice is the plan's (`core.schedule.
        fastest_batch`): the batch within `max_growth` of the current one that minimises
        (1 + B_noise/B) t(B), taken only when its goodput gain clears `threshold`.
        """
        if b_simple is not None and not (math.isfinite(b_simple) and b_simple > 0):
            b_simple = None
        if b_simple is not None:
            self.b_simple = b_simple
        elif self.b_simple is not None:
            source = "the last estimate"
        b_simple = self.b_simple
        current = (self.micro_batch_size, self.accumulation_steps)
        action, choice, goodput, gain = "keep", current, None, 1.0
        fixed_micro_timed = (
            self.fixed_micro_batch_size in self.throughput.micro_batch_sizes
            if self.fixed_micro_batch_size is not None
            else False
        )
        if not (self.throughput.ready or fixed_micro_timed):
            explore = self._exploration() if self.explore else None
            reason = "keep: one micro-batch size timed and no other to time at this batch"
            if explore is not None:
                action, choice = "explore", explore
                reason = (
                    f"time micro-batch {explore[0]} x {explore[1]} at the same B: the "
                    "step-time model needs two micro-batch sizes"
                )
        elif b_simple is None:
            reason = "keep: no B_noise estimate yet"
        else:
            action, choice, goodput, gain, reason = self._choose(current, b_simple, source)
        self.micro_batch_size, self.accumulation_steps = choice
        self.lr = self.lr_for(self.batch_size, b_simple)
        decision = Decision(
            step=step,
            batch_size=self.batch_size,
            micro_batch_size=self.micro_batch_size,
            accumulation_steps=self.accumulation_steps,
            lr=self.lr,
            b_simple=b_simple,
            predicted_goodput=goodput,
            efficiency=None if b_simple is None else self.efficiency(self.batch_size, b_simple),
            gain=gain,
            action=action,
            reason=reason,
        )
        self.decisions.append(decision)
        return decision

    def _choose(
        self, current: tuple[int, int], b_simple: float, source: str
    ) -> tuple[str, tuple[int, int], float, float, str]:
        """(action, choice, its goodput, gain over the current one, reason) at `b_simple`."""
        fit = self.throughput.fit(allow_single=not self.throughput.ready)
        world = self.world_size
        low, high = self.batch_size / self.max_growth, self.batch_size * self.max_growth
        pairs: dict[int, tuple[int, int]] = {}
        for m, a in [current, *self.candidates()]:
            b = m * a * world
            if low <= b <= high and (
                b not in pairs or fit.step_seconds(m, a, world) < fit.step_seconds(*pairs[b], world)
            ):
                pairs[b] = (m, a)
        best_b = fastest_batch(
            b_simple, sorted(pairs), lambda b: fit.step_seconds(*pairs[b], world)
        )
        best = pairs[best_b]
        now = self.predicted_goodput(*current, b_simple, fit)
        best_goodput = self.predicted_goodput(*best, b_simple, fit)
        gain = best_goodput / now
        timing = self.throughput.source
        said = f"B_noise {b_simple:.0f} ({source or 'given'}), {timing}; fastest by "
        said += "(1 + B_noise/B) t(B) "
        said += f"of B {min(pairs)}-{max(pairs)}: {best_b} ({best[0]} x {best[1]})"
        if best != current and gain > 1 + self.threshold:
            return "switch", best, best_goodput, gain, f"{said}, {gain - 1:+.0%} goodput"
        if best != current:
            said += f", {gain - 1:+.0%} goodput is under the {self.threshold:.0%} threshold"
        kept = f"keep {self.batch_size} ({current[0]} x {current[1]})"
        return "keep", current, now, gain, f"{kept}: {said}"

    def adopt(self, decision: Decision) -> None:
        """Take a decision made elsewhere (rank 0 under data parallelism) as this one's."""
        self.micro_batch_size = decision.micro_batch_size
        self.accumulation_steps = decision.accumulation_steps
        self.lr = decision.lr
        if decision.b_simple is not None:
            self.b_simple = decision.b_simple
        self.decisions.append(decision)

    def record_step(self, examples: int) -> float:
        """Account one optimizer step of `examples`; returns its progress in B0-examples.

        A short final step of an epoch counts its real size.
        """
        progress = examples * self.efficiency(examples, self.b_simple)
        self.steps += 1
        self.examples += examples
        self.reference_examples += progress
        return progress

    def reference_epochs(self, num_train: int) -> float:
        """Progress in epochs at the reference batch: sum of B * E(B) / num_train."""
        return self.reference_examples / num_train

    @staticmethod
    def _resolve_rule(rule: LrRule, optimizer: object) -> LrRule:
        if callable(rule):
            return rule
        check_lr_rule(
            rule, ADAPTIVE_LR_RULES, what="adaptive lr_rule (or a function (lr0, gain) -> lr)"
        )
        if rule != "auto":
            return rule
        if optimizer is None:
            raise ConfigError(
                "adaptive lr_rule 'auto' needs the optimizer to choose between AdaScale "
                "(SGD-like) and its square root (Adam-like); pass optimizer=... or lr_rule=..."
            )
        return default_lr_rule(optimizer, adaptive=True)


def _check_number(
    value: object, what: str, expected: str, within: Callable[[float], bool]
) -> float:
    """`value` as a float when it is a number and `within(value)`, else a ConfigError."""
    if not (isinstance(value, (int, float)) and within(value)):
        raise ConfigError(f"{what}: expected a number {expected}, got {value!r}")
    return float(value)
