"""The plan's data and its pure decision logic: measurements in, recommendations out.

Nothing here measures. `build_plan` takes what the probes and the noise measurement found
and applies the pure models of `batchlab.core`; tests feed it known answers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchlab.core.batching import split
from batchlab.core.lr import TRAIN_LR_RULES, scale_lr, warmup_steps_for
from batchlab.core.lr_choice import LrCheck
from batchlab.core.optim import default_lr_rule
from batchlab.core.step_time import StepTimeModel, fit_step_time
from batchlab.core.tradeoff import efficient_batch_size, predicted_speedup, relative_steps
from batchlab.errors import ConfigError
from batchlab.measure.memory_fit import MemoryPoint
from batchlab.measure.noise_run import NoisePoint, NoiseRun
from batchlab.measure.probe import ProbeResult
from batchlab.measure.throughput import ThroughputPoint
from batchlab.results import JsonResult


@dataclass(frozen=True)
class Measurements(JsonResult):
    """Everything the plan is built from; saved inside the plan so reports need no re-run."""

    task: str
    device: str
    num_train: int
    reference_batch_size: int
    reference_lr: float
    optimizer: str
    has_batchnorm: bool
    reference_epochs: int | None
    max_batch_size: int
    memory_predicted_only: bool
    fixed_bytes: float
    bytes_per_sample: float
    budget_bytes: float | None
    margin: float
    memory_points: tuple[MemoryPoint, ...]  # the probe's points that ran (peak_bytes known)
    throughput: tuple[ThroughputPoint, ...]
    knee_batch_size: int
    aligned_multiple: int | None  # round to this multiple only where the probe showed it pays
    noise: tuple[NoisePoint, ...]
    noise_reliable: bool = True
    noise_reason: str | None = None
    probe_steps: int = 0
    noise_steps: int = 0


@dataclass(frozen=True)
class Recommendation(JsonResult):
    batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    lr: float
    lr_rule: str
    warmup_steps: int
    predicted_speedup: float
    steps_factor: float  # S(B) / S(B0)
    step_s: float
    reasons: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Candidate(JsonResult):
    batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    steps_factor: float  # S(B) / S(B0)
    step_s: float
    predicted_speedup: float
    relative_time: float  # 1 / predicted_speedup
    measured: bool  # B was on the measured throughput ladder


@dataclass(frozen=True)
class PlanWarning(JsonResult):
    code: str
    message: str


@dataclass(frozen=True)
class Plan(JsonResult):
    """What to train with, and why. `batchlab plan` prints it; `batchlab report` draws it."""

    task: str
    device: str
    reference: dict[str, float]  # {"batch_size": B0, "lr": lr0}
    recommended: Recommendation
    efficient: Recommendation
    max_batch_size: int
    knee_batch_size: int
    b_simple: float
    b_simple_source: str
    b_simple_trajectory: tuple[NoisePoint, ...]
    candidates: tuple[Candidate, ...]
    lr_alternatives: dict[str, float]  # lr for the recommended batch under each rule
    warnings: tuple[PlanWarning, ...]
    measurements: Measurements
    plan_seconds: float = 0.0
    plan_steps: int = 0
    predicted_seconds_to_target: float | None = None
    reference_seconds_to_target: float | None = None
    target: str | None = None
    command: str = ""
    partial: bool = False
    # The full measurements behind the plan, so `batchlab report plan.json` can redraw
    # every figure without measuring again. None for plans built from synthetic inputs.
    probe: ProbeResult | None = None
    noise: NoiseRun | None = None
    # The recommended LR probed at the recommended batch (`batchlab.planner.lr_check`);
    # None when the check was skipped (`check_lr=False`) or for plans saved before it.
    lr_check: LrCheck | None = None

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan saved by `Plan.save` (what `batchlab plan` writes as JSON).

        Every reader of a plan file goes through here, so a missing, empty, cut-off or
        foreign file gets one clear `ConfigError` that names the file and what is wrong.
        """
        data = _read_json_object(Path(path))
        _check_plan_fields(data, path)
        try:
            return cls.from_dict(data)
        except (TypeError, KeyError, ValueError) as exc:  # a field of the wrong shape
            raise ConfigError(
                f"plan file {str(path)!r} does not match this version's plan schema ({exc}); "
                "make the plan again with `batchlab plan`"
            ) from None


def _read_json_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(
            f"plan file {str(path)!r} does not exist; make one with `batchlab plan` "
            "(save its JSON) or `Plan.save`"
        )
    text = path.read_text()
    if not text.strip():
        raise ConfigError(f"plan file {str(path)!r} is empty; make the plan again")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"plan file {str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno}); "
            "was it cut off while being written? Make the plan again"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"plan file {str(path)!r} holds a JSON {type(data).__name__}, expected the object "
            "a plan saves"
        )
    return data


def _check_plan_fields(data: dict[str, Any], path: str | Path) -> None:
    """A whole plan has every field without a default; say which are missing and why."""
    if data.get("partial") and "interrupted_during" in data:
        raise ConfigError(
            f"plan file {str(path)!r} is a partial plan (interrupted during "
            f"{data['interrupted_during']}): it has no recommendation; run the plan to the end"
        )
    required = [
        f.name
        for f in dataclasses.fields(Plan)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in data]
    if missing:
        raise ConfigError(
            f"plan file {str(path)!r} is not a plan: expected the JSON of a whole plan, but it "
            f"lacks {', '.join(missing)}; pass the JSON `batchlab plan` wrote"
        )


def b_simple_used(points: tuple[NoisePoint, ...]) -> tuple[float, str]:
    """The noise scale the plan uses: the mean over the last half of the measured phase.

    B_simple rises as the loss falls (McCandlish et al. 2018, fig. 8) and single values
    swing 2-5x, so the late half of a short real training phase is both less biased
    towards initialisation and averaged.
    """
    values = [p.b_simple for p in points if p.b_simple is not None and p.b_simple > 0]
    if not values:
        raise ConfigError(
            "no usable B_simple was measured (|G|^2 estimate <= 0 at every point); "
            "measure over more steps (`noise_steps`)"
        )
    late = values[len(values) // 2 :]
    mean = sum(late) / len(late)
    first_step = [p.step for p in points if p.b_simple is not None and p.b_simple > 0]
    lo = first_step[len(values) // 2]
    return mean, f"mean of {len(late)} measurements from step {lo} to {first_step[-1]}"


def candidate_batch_sizes(m: Measurements, b_noise: float) -> list[int]:
    """The measured ladder, powers of two, B0 and ~B_noise, capped at the training set."""
    sizes = {p.batch_size for p in m.throughput}
    sizes |= {2**k for k in range(0, 30) if 2**k <= m.num_train}
    sizes.add(m.reference_batch_size)
    sizes.add(max(1, round(b_noise)))
    if m.aligned_multiple:
        sizes = {
            max(m.aligned_multiple, m.aligned_multiple * round(b / m.aligned_multiple))
            if b >= m.aligned_multiple
            else b
            for b in sizes
        }
        sizes.add(m.reference_batch_size)
    return sorted(b for b in sizes if 1 <= b <= m.num_train)


def step_time_model(m: Measurements) -> StepTimeModel:
    """The shared step-time model through the measured ladder (one micro-batch a step, so
    the per-step cost is folded into the micro-batch time), extrapolated conservatively."""
    return fit_step_time([(p.batch_size, 1, p.step_s) for p in m.throughput])


def _step_seconds(m: Measurements, batch_size: int) -> tuple[int, int, float]:
    """`(micro, accumulation, seconds per optimizer step)` at B within the memory max."""
    micro, accum = split(batch_size, m.max_batch_size)
    return micro, accum, step_time_model(m).step_seconds(micro, accum)


def _recommend(
    m: Measurements,
    batch_size: int,
    b_noise: float,
    rule: str,
    reference_step_s: float,
    reasons: dict[str, str],
) -> Recommendation:
    micro, accum, step_s = _step_seconds(m, batch_size)
    lr = scale_lr(m.reference_lr, m.reference_batch_size, batch_size, rule, b_simple=b_noise)
    epochs = m.reference_epochs or 1
    total_steps = epochs * math.ceil(m.num_train / batch_size)
    warmup = warmup_steps_for(lr / m.reference_lr, total_steps)
    reasons = dict(reasons)
    reasons["lr"] = (
        f"{rule} rule from the reference (B0={m.reference_batch_size}, lr={m.reference_lr:g}) "
        f"for {m.optimizer}: x{lr / m.reference_lr:.3g}"
    )
    reasons["warmup"] = (
        f"LR grows {lr / m.reference_lr:.2g}x > 2x: linear warm-up over 5% of the "
        f"{total_steps} planned steps (Goyal et al. 2017)"
        if warmup
        else f"LR grows {lr / m.reference_lr:.2g}x <= 2x: no warm-up needed"
    )
    reasons["accumulation"] = (
        f"{batch_size} > memory max {m.max_batch_size}: {accum} micro-batches of {micro}"
        if accum > 1
        else f"fits in memory (max {m.max_batch_size}): no accumulation"
    )
    return Recommendation(
        batch_size=batch_size,
        micro_batch_size=micro,
        accumulation_steps=accum,
        lr=lr,
        lr_rule=rule,
        warmup_steps=warmup,
        predicted_speedup=predicted_speedup(
            batch_size, m.reference_batch_size, b_noise, step_s, reference_step_s
        ),
        steps_factor=relative_steps(batch_size, m.reference_batch_size, b_noise),
        step_s=step_s,
        reasons=reasons,
    )


def build_plan(
    m: Measurements,
    *,
    lr_rule: str | None = None,
    b_simple: float | None = None,
    reference_seconds_to_target: float | None = None,
    target: str | None = None,
    plan_seconds: float = 0.0,
    command: str = "",
    partial: bool = False,
    probe: ProbeResult | None = None,
    noise: NoiseRun | None = None,
) -> Plan:
    """Turn measurements into the fastest and the efficient recommendation, with reasons."""
    if b_simple is None:
        b_noise, source = b_simple_used(m.noise)
    else:
        b_noise, source = b_simple, "given"
    rule = lr_rule or default_lr_rule(m.optimizer)
    _, _, ref_step_s = _step_seconds(m, m.reference_batch_size)
    candidates = _candidates(m, b_noise, ref_step_s)
    recommended = _recommend_fastest(m, candidates, b_noise, rule, ref_step_s)
    efficient = _recommend_efficient(m, b_noise, rule, ref_step_s)
    alternatives = {
        r: scale_lr(
            m.reference_lr, m.reference_batch_size, recommended.batch_size, r, b_simple=b_noise
        )
        for r in TRAIN_LR_RULES
    }
    predicted_seconds = (
        reference_seconds_to_target / recommended.predicted_speedup
        if reference_seconds_to_target is not None
        else None
    )
    return Plan(
        task=m.task,
        device=m.device,
        reference={"batch_size": m.reference_batch_size, "lr": m.reference_lr},
        recommended=recommended,
        efficient=efficient,
        max_batch_size=m.max_batch_size,
        knee_batch_size=m.knee_batch_size,
        b_simple=b_noise,
        b_simple_source=source,
        b_simple_trajectory=m.noise,
        candidates=tuple(candidates),
        lr_alternatives=alternatives,
        warnings=tuple(plan_warnings(m, recommended, efficient, candidates)),
        measurements=m,
        plan_seconds=plan_seconds,
        plan_steps=m.probe_steps + m.noise_steps,
        predicted_seconds_to_target=predicted_seconds,
        reference_seconds_to_target=reference_seconds_to_target,
        target=target,
        command=command,
        partial=partial,
        probe=probe,
        noise=noise,
    )


def _candidates(m: Measurements, b_noise: float, ref_step_s: float) -> list[Candidate]:
    """Every candidate batch with its predicted steps, step time and speedup over B0."""
    candidates = []
    measured = {p.batch_size for p in m.throughput}
    for b in candidate_batch_sizes(m, b_noise):
        micro, accum, step_s = _step_seconds(m, b)
        speedup = predicted_speedup(b, m.reference_batch_size, b_noise, step_s, ref_step_s)
        candidates.append(
            Candidate(
                batch_size=b,
                micro_batch_size=micro,
                accumulation_steps=accum,
                steps_factor=relative_steps(b, m.reference_batch_size, b_noise),
                step_s=step_s,
                predicted_speedup=speedup,
                relative_time=1.0 / speedup,
                measured=b in measured,
            )
        )
    return candidates


def _recommend_fastest(
    m: Measurements, candidates: list[Candidate], b_noise: float, rule: str, ref_step_s: float
) -> Recommendation:
    """The candidate with the least predicted time to target (the smaller batch on a tie)."""
    fastest = max(candidates, key=lambda c: (c.predicted_speedup, -c.batch_size))
    reason = (
        f"minimum predicted time to target among {len(candidates)} candidates: "
        f"{fastest.predicted_speedup:.2f}x the reference B0={m.reference_batch_size} "
        f"(steps x{fastest.steps_factor:.2f}, step time x{fastest.step_s / ref_step_s:.2f})"
    )
    return _recommend(m, fastest.batch_size, b_noise, rule, ref_step_s, {"batch_size": reason})


def _recommend_efficient(
    m: Measurements, b_noise: float, rule: str, ref_step_s: float
) -> Recommendation:
    """B ~ B_noise, within the training set and on the aligned multiple where it pays."""
    eff_b = min(efficient_batch_size(b_noise), m.num_train)
    if m.aligned_multiple and eff_b >= m.aligned_multiple:
        eff_b = m.aligned_multiple * round(eff_b / m.aligned_multiple)
    reason = (
        f"B ~ B_noise = {b_noise:.0f}: 2x the minimum steps and 2x the minimum "
        "examples (McCandlish et al. 2018), the balanced choice when compute costs money"
    )
    return _recommend(m, eff_b, b_noise, rule, ref_step_s, {"batch_size": reason})


def plan_warnings(
    m: Measurements,
    recommended: Recommendation,
    efficient: Recommendation,
    candidates: list[Candidate],
) -> list[PlanWarning]:
    out = []
    for rec in {recommended.micro_batch_size, efficient.micro_batch_size}:
        if m.has_batchnorm and rec < 8:
            out.append(
                PlanWarning(
                    "batchnorm-small-batch",
                    f"the model has BatchNorm and the per-device batch is {rec} < 8: "
                    "its batch statistics are noisy (meaningless at 1); consider GroupNorm",
                )
            )
            break
    if recommended.batch_size > 0.1 * m.num_train:
        out.append(
            PlanWarning(
                "large-batch-regime",
                f"recommended B={recommended.batch_size} is more than 10% of the "
                f"{m.num_train} training examples: the large-batch regime of Keskar et al. "
                "2016, expect a generalization gap; check with `batchlab sweep`",
            )
        )
    if not m.noise_reliable:
        out.append(
            PlanWarning(
                "unreliable-noise",
                f"the B_simple estimate is unreliable ({m.noise_reason or 'wide interval'}); "
                "measure over more steps (`noise_steps`)",
            )
        )
    tp = sorted(m.throughput, key=lambda p: p.batch_size)
    # Only when memory is the limit: at the training-set size there is nothing to gain.
    memory_bound = m.max_batch_size < m.num_train
    if memory_bound and len(tp) >= 2 and tp[-1].batch_size >= m.max_batch_size * 0.9:
        gain = tp[-1].samples_per_s / tp[-2].samples_per_s
        if gain > 1.05:
            out.append(
                PlanWarning(
                    "throughput-rising-at-max",
                    f"throughput still rises at the memory max ({gain:.2f}x over the last "
                    "step of the ladder): gradient accumulation makes the batch bigger, "
                    "not faster; more memory (or AMP) would",
                )
            )
    if m.memory_predicted_only:
        out.append(
            PlanWarning(
                "predicted-memory",
                "the memory max is a prediction for a target device, not verified by a run",
            )
        )
    return out
