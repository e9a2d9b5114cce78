"""Issue 14, item 7: no confident answer from bad data.

A plan built on a truncated or noisy ladder, on a noise phase whose loss did not fall, or
on timings under contention says so, or refuses.
"""

from __future__ import annotations

from test_plan_model import measurements

from batchlab.measure.probe import ProbeResult
from batchlab.planner import build_plan


def fake_probe(*warnings: str) -> ProbeResult:
    """A probe result with the given warnings; only its warnings matter to these tests."""
    return ProbeResult(
        task="synthetic", device="cpu", world_size=1, max_batch_size=512, knee_batch_size=512,
        knee_fraction=0.9, aligned_knee_batch_size=512, peak_samples_per_s=1e4, memory=None,
        throughput=(), alignment=(), accumulation=None, probe_steps=0, throughput_steps=0,
        predicted_only=False, local_max_batch_size=512, seconds=0.0, warnings=tuple(warnings),
    )  # fmt: skip


def test_plan_passes_on_every_probe_warning():
    probe = fake_probe(
        "throughput measured up to B=64: timing B=128 and above would take more than the 1s budget",
        "timing is noisy: at B=64 the windows range over 21032% of the median",
    )
    plan = build_plan(measurements(), b_simple=200.0, probe=probe)
    messages = [w.message for w in plan.warnings if w.code == "probe"]
    assert messages == list(probe.warnings)
    assert [w["message"] for w in plan.to_dict()["warnings"] if w["code"] == "probe"] == messages


def test_plan_without_probe_warnings_adds_none():
    plan = build_plan(measurements(), b_simple=200.0, probe=fake_probe())
    assert not [w for w in plan.warnings if w.code == "probe"]
