"""Throughput: the ladder, the knee, alignment verdicts, accumulation plans, timing."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_task

import batchlab
from batchlab.errors import ConfigError
from batchlab.measure.state import live_tensor_bytes
from batchlab.measure.throughput import (
    AlignmentFinding,
    ThroughputPoint,
    ThroughputProfile,
    aligned_knee,
    alignment_candidates,
    find_knee,
    geometric_ladder,
    judge_alignment,
    plan_accumulation,
    profile_throughput,
    summarize_windows,
)


def test_geometric_ladder():
    assert geometric_ladder(100) == [2, 4, 8, 16, 32, 64, 100]
    assert geometric_ladder(64) == [2, 4, 8, 16, 32, 64]
    assert geometric_ladder(1, start=1) == [1]
    assert geometric_ladder(3) == [2, 3]


@pytest.mark.parametrize(
    ("sizes", "rates", "knee"),
    [
        ([2, 4, 8, 16], [10, 50, 95, 100], 8),  # 95 >= 0.9 * 100
        ([2, 4, 8, 16], [10, 50, 89.9, 100], 16),
        ([2, 4, 8, 16], [10, 90, 80, 100], 4),  # exactly 90%: the smallest such B
        ([2, 4, 8, 16], [100, 60, 50, 40], 2),  # throughput falls with B (CPU caches)
        ([32], [5.0], 32),
    ],
)
def test_find_knee(sizes, rates, knee):
    assert find_knee(sizes, rates) == knee


def test_find_knee_fraction_and_bad_input():
    assert find_knee([2, 4, 8], [50, 80, 100], fraction=0.5) == 2
    with pytest.raises(ConfigError, match="knee fraction"):
        find_knee([2], [1.0], fraction=1.5)
    with pytest.raises(ConfigError, match="matching, non-empty"):
        find_knee([2, 4], [1.0])


def test_summarize_windows_median_and_spread():
    point = summarize_windows(10, [40.0, 80.0, 20.0], steps_per_window=4)
    assert point.samples_per_s == 40
    assert point.step_s == pytest.approx(0.25)
    assert point.samples_per_s_low == 20 and point.samples_per_s_high == 80
    assert point.spread == pytest.approx((80 - 20) / 40)
    assert point.windows == 3


def test_alignment_candidates():
    assert alignment_candidates(100, 1000) == [
        ("multiple_of_8", 104, (103, 105)),
        ("power_of_2", 128, (120, 136)),
    ]
    # the knee is small: no power of two >= 32 to test
    assert alignment_candidates(20, 1000) == [("multiple_of_8", 24, (23, 25))]
    # the max caps the aligned sizes so that both neighbours fit
    assert alignment_candidates(128, 128) == [
        ("multiple_of_8", 120, (119, 121)),
        ("power_of_2", 64, (56, 72)),
    ]
    assert alignment_candidates(4, 8) == []


def rounds_for(aligned, others, gains):
    """Interleaved rounds where `aligned` runs `gain` times faster than `others`."""
    return [{aligned: 100.0 * g, **{b: 100.0 for b in others}} for g in gains]


def test_judge_alignment_confirms_only_a_consistent_gain():
    yes = judge_alignment("multiple_of_8", 64, (63, 65), rounds_for(64, (63, 65), [1.2] * 5))
    assert yes.confirmed and yes.speedup == pytest.approx(1.2) and yes.win_rate == 1.0
    assert "faster: round to it" in yes.note

    small = judge_alignment("multiple_of_8", 64, (63, 65), rounds_for(64, (63, 65), [1.01] * 5))
    assert not small.confirmed and "do not bother" in small.note

    # a large median gain that is not consistent across rounds is noise
    flaky = rounds_for(64, (63, 65), [1.3, 1.3, 1.3, 0.9, 0.9])
    flaky_finding = judge_alignment("multiple_of_8", 64, (63, 65), flaky)
    assert flaky_finding.win_rate == pytest.approx(0.6) and not flaky_finding.confirmed


def finding(rule, confirmed):
    return AlignmentFinding(rule, 64, (63, 65), 1.1, 1.0, confirmed, "")


def test_aligned_knee_rounds_only_where_confirmed():
    assert aligned_knee(100, [finding("multiple_of_8", False)], 1000) == 100
    assert aligned_knee(100, [finding("multiple_of_8", True)], 1000) == 104
    assert aligned_knee(100, [finding("power_of_2", True)], 1000) == 128
    assert aligned_knee(100, [finding("power_of_2", True)], 120) == 100  # 128 does not fit


def synthetic_profile(step_seconds):
    points = tuple(
        ThroughputPoint(b, b / s, s, 0.0, b / s, b / s, 5, 1) for b, s in step_seconds.items()
    )
    peak = max(p.samples_per_s for p in points)
    return ThroughputProfile("cpu", False, points, 64, 0.9, peak, (), 64, 0, 0.0)


def test_plan_accumulation_exact():
    plan = plan_accumulation(1000, 300)
    assert (plan.micro_batch_size, plan.accumulation_steps) == (250, 4)
    assert plan.samples_per_s is None and "4 micro-batches of 250" in plan.note

    uneven = plan_accumulation(1001, 300)
    assert (uneven.micro_batch_size, uneven.accumulation_steps) == (251, 4)
    assert "the last micro-batch has 248" in uneven.note

    single = plan_accumulation(200, 300)
    assert (single.micro_batch_size, single.accumulation_steps) == (200, 1)
    assert "no accumulation" in single.note


def test_plan_accumulation_throughput_cost():
    # step time = 1 ms + 0.01 ms/sample: 64 -> 1.64 ms, 256 -> 3.56 ms
    profile = synthetic_profile({64: 1.64e-3, 256: 3.56e-3})
    plan = plan_accumulation(512, 256, profile)
    assert (plan.micro_batch_size, plan.accumulation_steps) == (256, 2)
    assert plan.samples_per_s == pytest.approx(256 / 3.56e-3)
    assert plan.throughput_cost == pytest.approx(0.0)
    smaller = plan_accumulation(512, 64, profile)
    assert smaller.accumulation_steps == 8
    assert smaller.throughput_cost == pytest.approx(1 - (64 / 1.64e-3) / (256 / 3.56e-3))


class FakeDevice:
    """A `StepTimer` for a simulated device: step time = 1 ms + 2 us/sample, multiples of 8
    are `aligned_gain` times faster. Its clock advances only by the steps it runs."""

    def __init__(self, aligned_gain: float = 1.2) -> None:
        self.aligned_gain = aligned_gain
        self.calls: list[tuple[int, int]] = []
        self.steps = 0
        self.now = 0.0

    def step_seconds(self, batch_size: int) -> float:
        seconds = 1e-3 + 2e-6 * batch_size
        return seconds / self.aligned_gain if batch_size % 8 == 0 else seconds

    def run(self, batch_size: int, count: int) -> float:
        self.calls.append((batch_size, count))
        self.steps += count
        seconds = self.step_seconds(batch_size) * count
        self.now += seconds
        return seconds

    def clock(self) -> float:
        return self.now


def test_profile_throughput_on_a_fake_device_finds_knee_and_alignment():
    fake = FakeDevice()
    profile = profile_throughput(tiny_task(n=1024), device="cpu", max_batch_size=1000, timer=fake)
    sizes = [p.batch_size for p in profile.points]
    assert sizes == [2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
    # samples/s = 1.2 B / (1 ms + 2 us B) here (all multiples of 8): 303,557 at 512 and
    # 400,000 at 1000, so only B=1000 reaches 90% of the peak.
    assert profile.peak_samples_per_s == pytest.approx(400_000)
    assert profile.points[-2].samples_per_s == pytest.approx(512 * 1.2 / 2.024e-3)
    assert profile.knee_batch_size == 1000
    rules = {f.rule: f for f in profile.alignment}
    assert rules["multiple_of_8"].confirmed  # B vs B-1 and B+1: 20% faster
    assert not rules["power_of_2"].confirmed  # P vs P-8 and P+8: all multiples of 8
    assert profile.aligned_knee_batch_size % 8 == 0
    assert profile.steps == sum(count for _, count in fake.calls)
    # the warm-up: one step to create the optimizer state, then 1 + 2 steps per size
    assert fake.calls[:3] == [(2, 1), (2, 1), (2, 2)]
    assert all(p.windows == 5 for p in profile.points)  # the budget was never reached


def test_profile_throughput_without_an_alignment_effect():
    profile = profile_throughput(
        tiny_task(n=1024), device="cpu", max_batch_size=1000, timer=FakeDevice(aligned_gain=1.0)
    )
    assert not any(f.confirmed for f in profile.alignment)
    assert profile.aligned_knee_batch_size == profile.knee_batch_size


def test_profile_throughput_drops_sizes_past_the_time_budget():
    profile = profile_throughput(
        tiny_task(n=1024), device="cpu", max_batch_size=1000, time_budget=0.02,
        check_alignment=False, timer=FakeDevice(),
    )  # fmt: skip
    assert profile.points[-1].batch_size < 1000
    assert any("would take more than the 0.02s budget" in w for w in profile.warnings)


def test_profile_throughput_real_steps_leave_no_trace():
    task = tiny_task(n=256)
    profile_throughput(task, device="cpu", time_budget=0.3)  # warm lazy initialisation
    rng = torch.get_rng_state()
    before = live_tensor_bytes()
    profile = profile_throughput(task, device="cpu", time_budget=0.3, windows=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert live_tensor_bytes() == before
    assert [p.batch_size for p in profile.points][0] == 2
    assert all(p.samples_per_s > 0 and p.windows == 3 for p in profile.points)
    assert profile.steps > 0
    assert batchlab.ThroughputProfile.from_json(profile.to_json()) == profile


def test_profile_throughput_explicit_sizes_and_bad_input():
    task = tiny_task(n=64)
    profile = profile_throughput(
        task, batch_sizes=[4, 16], device="cpu", time_budget=0.2, check_alignment=False
    )
    assert [p.batch_size for p in profile.points] == [4, 16]
    with pytest.raises(ConfigError, match=r"at most the training set size \(64\), got 65"):
        profile_throughput(task, batch_sizes=[65], device="cpu")
    with pytest.raises(ConfigError, match="time budget: expected a positive number"):
        profile_throughput(task, device="cpu", time_budget=0)


class OomAbove100(FakeDevice):
    """Runs out of memory above B=100."""

    def run(self, batch_size: int, count: int) -> float:
        if batch_size > 100:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 MiB")
        return super().run(batch_size, count)


def test_profile_throughput_stops_at_an_oom():
    fake = OomAbove100()
    profile = profile_throughput(tiny_task(n=1024), device="cpu", check_alignment=False, timer=fake)
    assert profile.points[-1].batch_size == 64
    assert any("B=128 ran out of memory" in w for w in profile.warnings)
    assert max(b for b, _ in fake.calls) == 64  # nothing at or above the OOM was timed


class SlowsDownAfterWarmUp(FakeDevice):
    """Warm-up (1 + 2 calls for each of the 6 sizes) is fast; every later step is 10x
    slower, as when another process starts on a busy machine."""

    def step_seconds(self, batch_size: int) -> float:
        return (1e-4 if len(self.calls) <= 13 else 1e-3) * batch_size


def test_time_budget_holds_when_steps_slow_down_after_warm_up():
    fake = SlowsDownAfterWarmUp()
    profile = profile_throughput(tiny_task(n=64), device="cpu", time_budget=2.0, timer=fake)
    # 2 s budget: the windows re-size after the first round, and rounds stop at the deadline
    assert fake.now < 2.0 * 1.5
    assert all(p.windows >= 3 for p in profile.points)
    assert [p.batch_size for p in profile.points] == [2, 4, 8, 16, 32, 64]
    first_window = fake.calls[13][1]
    assert profile.points[0].steps_per_window < first_window  # B=2's first window, re-sized
