"""When a run evaluates: the one evaluation schedule `train()`, its loop and the sweep share.

Steps to target can only be read at evaluations, so the spacing of evaluations is the
resolution of every steps-to-target a sweep measures. A fixed spacing (`eval_every=k`)
resolves a run that needs ~k steps to within 100%: a sweep that evaluated every 4 epochs
put B=16 at 1000 or 2000 steps and inflated the fitted B_crit by ~2.5x (issue 11).

The geometric schedule evaluates at every step below `GEOMETRIC_EXACT_BELOW` (32) and then
whenever the step is a multiple of 2^floor(log2(t/16)): every 2 steps in [32, 64), every 4
in [64, 128), and so on. The gap after an evaluation at step t is at most t/16, so the
first evaluation at or past the true crossing s overshoots it by at most 6.25% of s
(`GEOMETRIC_RESOLUTION`), and is exact below 32. Its cost grows with log(steps): 31 + 16
evaluations per doubling (~140 for 4000 steps, instead of one per step).
"""

from __future__ import annotations

from batchlab.errors import ConfigError

GEOMETRIC = "geometric"
EVAL_SCHEDULES = (GEOMETRIC,)
GEOMETRIC_EXACT_BELOW = 32  # every step below this is evaluated
GEOMETRIC_RESOLUTION = 1 / 16  # the largest gap after an evaluation, relative to its step


def geometric_spacing(step: int) -> int:
    """Steps between evaluations around `step` (>= 1): 1 below 32, then 2^floor(log2(step/16))."""
    if step < GEOMETRIC_EXACT_BELOW:
        return 1
    # floor(log2(step / 16)) == floor(log2(step // 16)) for step >= 16: integer arithmetic.
    return 1 << ((step // 16).bit_length() - 1)


def eval_due(step: int, every: int | str, total_steps: int | None = None) -> bool:
    """Whether a run evaluates after optimizer step `step` (1-based; step 0, before
    training, is always evaluated by the loop).

    Args:
        every: a number of steps between evaluations, or `"geometric"` (module docstring).
        total_steps: the run's last step, which is always evaluated (None: unknown).
    """
    if total_steps is not None and step == total_steps:
        return True
    if every == GEOMETRIC:
        return step % geometric_spacing(step) == 0
    return step % every == 0


def eval_steps(total_steps: int, every: int | str) -> tuple[int, ...]:
    """Every step a run of `total_steps` steps evaluates at, 0 (before training) included."""
    return (0, *(t for t in range(1, total_steps + 1) if eval_due(t, every, total_steps)))


def check_eval_every(every: int | str, *, param: str = "eval_every") -> int | str:
    """`every` if it is a positive int or a schedule name in `EVAL_SCHEDULES`."""
    if isinstance(every, str):
        if every in EVAL_SCHEDULES:
            return every
    elif isinstance(every, int) and not isinstance(every, bool) and every >= 1:
        return every
    raise ConfigError(
        f"`{param}`: expected a positive number of steps or one of "
        f"{', '.join(repr(s) for s in EVAL_SCHEDULES)}, got {every!r}; e.g. 100 or 'geometric'",
        param=param,
    )
