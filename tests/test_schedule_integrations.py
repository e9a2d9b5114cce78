"""A `BatchSchedule` in Lightning and the Hugging Face Trainer: the right step, the right lr,
exact epochs, and one-line errors.

Each expectation below is worked out by hand from the schedule and the framework's rule (an
accumulation window closes when the epoch's micro-batch count is a multiple of it), not by
running batchlab's own lookup.
"""

from __future__ import annotations

import collections
import importlib.util
import json

import pytest
import torch
from conftest import quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from batchlab.adaptive import ResizableBatchSampler
from batchlab.core.schedule import BatchSchedule, SchedulePhase
from batchlab.errors import ConfigError

needs_lightning = pytest.mark.skipif(
    importlib.util.find_spec("lightning") is None, reason="lightning is not installed"
)
needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None
    or importlib.util.find_spec("accelerate") is None,
    reason="transformers is not installed",
)


def _schedule(unit: str, *phases: tuple[int, int, int, float]) -> BatchSchedule:
    """Phases as (start, batch, micro-batch, lr)."""
    return BatchSchedule(
        tuple(SchedulePhase(s, b, m, -(-b // m), lr) for s, b, m, lr in phases), unit=unit
    )


# --- Lightning ---------------------------------------------------------------------------


def _lightning_module(log: dict):
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        """Records what each micro-batch and each optimizer step really trained with."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layer = torch.nn.Linear(1, 1)
            self.micro: list[int] = []  # sizes of the current step's micro-batches

        def training_step(self, batch, batch_idx):
            log["seen"][self.current_epoch] += batch[1].tolist()
            self.micro.append(len(batch[1]))
            return (self.layer(batch[0]) - 1).pow(2).mean()

        def on_before_optimizer_step(self, optimizer):
            lrs = [g["lr"] for g in optimizer.param_groups]
            accumulation = self.trainer.accumulate_grad_batches
            log["steps"].append((self.trainer.global_step + 1, self.micro, lrs, accumulation))
            self.micro = []

        def validation_step(self, batch, batch_idx):
            pass

        def on_validation_epoch_end(self):
            log["vals"].append(self.current_epoch)

        def configure_optimizers(self):
            # two groups at different lrs: each keeps its ratio to the phase's lr
            return torch.optim.SGD(
                [{"params": [self.layer.weight]}, {"params": [self.layer.bias], "lr": 0.5e-3}],
                lr=1e-3,
            )

    return Module()


def _fit_lightning(n: int, schedule: BatchSchedule, epochs: int) -> tuple[dict, object]:
    from batchlab.integrations.lightning import ScheduledBatchSize
    from batchlab.integrations.schedule import ScheduleSampler

    data = TensorDataset(torch.linspace(-1, 1, n).unsqueeze(1), torch.arange(n))
    sampler = ScheduleSampler(data, schedule, seed=0)
    log: dict = {"seen": collections.defaultdict(list), "steps": [], "vals": []}
    callback = ScheduledBatchSize(sampler)
    quiet_trainer([callback], epochs=epochs).fit(
        _lightning_module(log), DataLoader(data, batch_sampler=sampler), DataLoader(data, 50)
    )
    return log, sampler


@needs_lightning
def test_lightning_applies_each_phase_at_the_first_step_lightning_allows():
    # 150 examples, 3 epochs. Phase 1 (20 = 10 x 2) starts after 3 steps, but the epoch's
    # batch count is then 3, not a multiple of 2: it waits one step. Phase 2 (30 = 10 x 3)
    # starts after 6 steps; the count is 4 + 2 x 2 = 8 then, 10 after step 7: it starts at
    # step 9 (count 12). Epoch 0: 4 x 10 + 4 x 20 + 30 = 150. Phase 3 (40 = 20 x 2) starts
    # after 12 steps, in epoch 1 at count 3 x 3 = 9 (counted from the epoch's start): it
    # waits for step 14 (count 12), whose 40 meets the epoch's end with 30 left: [20, 10].
    schedule = _schedule(
        "step", (0, 10, 10, 0.01), (3, 20, 10, 0.02), (6, 30, 10, 0.03), (12, 40, 20, 0.04)
    )
    log, sampler = _fit_lightning(150, schedule, epochs=3)
    expected = (
        [(s, [10], 0.01, 1) for s in range(1, 5)]
        + [(s, [10, 10], 0.02, 2) for s in range(5, 9)]
        + [(s, [10, 10, 10], 0.03, 3) for s in range(9, 14)]
        + [(14, [20, 10], 0.04, 2)]
        + [(s, [20, 20], 0.04, 2) for s in range(15, 18)]
        + [(18, [20, 10], 0.04, 2)]
    )
    got = [(s, micro, round(lrs[0], 12), k) for s, micro, lrs, k in log["steps"]]
    assert got == expected
    assert all(lrs[1] == pytest.approx(lrs[0] / 2) for *_, lrs, _ in log["steps"])  # ratio kept
    for epoch in range(3):  # exact epochs across the phase changes
        assert sorted(log["seen"][epoch]) == list(range(150)), epoch
    assert log["vals"] == [0, 1, 2]  # validation at each epoch's end
    assert sampler.phases_run == [
        {"phase": 0, "step": 1, "examples": 0},
        {"phase": 1, "step": 5, "examples": 40},
        {"phase": 2, "step": 9, "examples": 120},
        {"phase": 3, "step": 14, "examples": 270},
    ]


@needs_lightning
def test_lightning_schedule_in_examples_with_short_epoch_ends():
    # 100 examples. Phase 1 (40 = 20 x 2) from 50 examples seen: after two steps of 30 (60
    # seen, 2 batches: aligned). Epoch 0: 30, 30, 40; then each epoch 40, 40 and a short 20
    # (one micro-batch of the two, the epoch's end: Lightning steps on it).
    schedule = _schedule("examples", (0, 30, 30, 0.1), (50, 40, 20, 0.2))
    log, _ = _fit_lightning(100, schedule, epochs=3)
    got = [(micro, round(lrs[0], 12)) for _, micro, lrs, _ in log["steps"]]
    tail = [([20, 20], 0.2), ([20, 20], 0.2), ([20], 0.2)]
    assert got == [([30], 0.1), ([30], 0.1), ([20, 20], 0.2)] + tail + tail
    for epoch in range(3):
        assert sorted(log["seen"][epoch]) == list(range(100)), epoch


@needs_lightning
def test_lightning_refuses_what_cannot_follow_a_schedule(tmp_path):
    from batchlab.integrations.lightning import ScheduledBatchSize
    from batchlab.integrations.schedule import ScheduleSampler

    data = TensorDataset(torch.zeros(40, 1), torch.arange(40))
    with pytest.raises(ConfigError) as err:
        ScheduledBatchSize(ResizableBatchSampler(data, 8))
    assert "expected the DataLoader's ScheduleSampler, got ResizableBatchSampler" in str(err.value)

    schedule = _schedule("step", (0, 8, 8, 0.1))
    sampler = ScheduleSampler(data, schedule)
    trainer = quiet_trainer([ScheduledBatchSize(sampler)], epochs=1, accumulate_grad_batches=2)
    with pytest.raises(ConfigError) as err:
        trainer.fit(
            _lightning_module(collections.defaultdict(list)),
            DataLoader(data, batch_sampler=sampler),
        )
    assert err.value.param == "accumulate_grad_batches"
    assert "expected 1 with a schedule" in str(err.value) and "got 2" in str(err.value)

    trainer = quiet_trainer([ScheduledBatchSize(ScheduleSampler(data, schedule))], epochs=1)
    with pytest.raises(ConfigError) as err:  # a loader that does not draw from the sampler
        trainer.fit(_lightning_module(collections.defaultdict(list)), DataLoader(data, 8))
    assert "got a batch it did not hand out" in str(err.value)


def test_a_bad_schedule_is_one_line_with_the_fix(tmp_path):
    from batchlab.integrations.schedule import ScheduleSampler

    data = TensorDataset(torch.zeros(40, 1))
    with pytest.raises(ConfigError) as err:
        ScheduleSampler(data, _schedule("step", (0, 8, 8, 0.1), (5, 64, 32, 0.2)))
    assert str(err.value) == (
        "`schedule`: phase batch 64 is larger than the training set (40 examples); use at most 40"
    )
    with pytest.raises(ConfigError) as err:
        ScheduleSampler(data, {"phases": []})
    assert "expected a BatchSchedule or the path of its JSON" in str(err.value)
    assert "got dict" in str(err.value) and err.value.param == "schedule"

    bad = tmp_path / "plan.json"
    good = _schedule("step", (0, 8, 8, 0.1), (5, 16, 8, 0.2)).to_dict()
    good["phases"][1]["accumulation_steps"] = 1  # 16 = 8 x 2, not 8 x 1
    bad.write_text(json.dumps(good))
    with pytest.raises(ConfigError) as err:
        ScheduleSampler(data, bad)
    message = str(err.value)
    assert "\n" not in message and err.value.param == "schedule"
    assert "phase 2: expected `accumulation_steps`" in message and "got 1" in message
    assert "batchlab plan" in message  # the fix
    with pytest.raises(ConfigError, match="does not exist"):
        ScheduleSampler(data, tmp_path / "missing.json")


# --- Hugging Face Trainer ----------------------------------------------------------------


def _hf_train(tmp_path, schedule, n: int, epochs: int, **overrides) -> tuple[list, object]:
    """Train a 1-weight model with a `ScheduledAccumulation`; return per optimizer step
    (step, indices of each micro-batch, lr, accumulation) and the callback."""
    from torch import nn
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from batchlab.integrations.transformers import ScheduledAccumulation

    calls: list[list[int]] = []
    steps: list[tuple] = []

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(1, 1)

        def forward(self, x, labels, idx):
            calls.append(idx.tolist())
            return {"loss": nn.functional.mse_loss(self.net(x).squeeze(-1), labels)}

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            lr = optimizer.param_groups[0]["lr"]
            steps.append((state.global_step + 1, list(calls), round(lr, 12),
                          args.gradient_accumulation_steps))  # fmt: skip
            calls.clear()

    data = [
        {"x": torch.tensor([i / n]), "labels": torch.tensor(1.0), "idx": torch.tensor(i)}
        for i in range(n)
    ]
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=1,
        num_train_epochs=epochs, learning_rate=0.5, lr_scheduler_type="constant",
        report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    settings.update(overrides)
    callback = ScheduledAccumulation(schedule)
    trainer = Trainer(Model(), TrainingArguments(**settings), train_dataset=data,
                      callbacks=[callback, Record()])  # fmt: skip
    trainer.train()
    return steps, callback


@needs_transformers
def test_hf_applies_each_phase_through_accumulation_where_the_trainer_allows(tmp_path, caplog):
    # 40 examples in micro-batches of 4: 10 a epoch. Phase 1 (8 = 4 x 2) starts after 3
    # steps; the epoch's micro-batch count is 3 then: it waits a step (count 4). Phase 2 (12
    # = 4 x 3) starts after 6 steps, at count 8, then 10 = the epoch's end: it starts with
    # epoch 1 (steps 8-11: 3, 3, 3 and the epoch's last 1 micro-batch), as in epoch 2.
    schedule = _schedule("step", (0, 4, 4, 0.1), (3, 8, 4, 0.2), (6, 12, 4, 0.3))
    with caplog.at_level("INFO", logger="batchlab"):
        steps, callback = _hf_train(tmp_path, schedule, n=40, epochs=3)
    got = [(s, len(micro), lr, k) for s, micro, lr, k in steps]
    epoch = [(s, 3, 0.3, 3) for s in (0, 1, 2)] + [(3, 1, 0.3, 3)]
    assert got == (
        [(s, 1, 0.1, 1) for s in range(1, 5)]
        + [(s, 2, 0.2, 2) for s in range(5, 8)]
        + [(s + 8, m, lr, k) for s, m, lr, k in epoch]
        + [(s + 12, m, lr, k) for s, m, lr, k in epoch]
    )
    for e, (first, last) in enumerate([(0, 7), (7, 11), (11, 15)]):  # exact epochs
        seen = [i for _, micro, _, _ in steps[first:last] for batch in micro for i in batch]
        assert sorted(seen) == list(range(40)), e
    assert callback.applied == [
        {"phase": 0, "step": 1, "examples": 0, "accumulation": 1},
        {"phase": 1, "step": 5, "examples": 16, "accumulation": 2},
        {"phase": 2, "step": 8, "examples": 40, "accumulation": 3},
    ]
    said = [r.getMessage() for r in caplog.records if "batchlab schedule" in r.getMessage()]
    assert len(said) == 1 and "4 x 2 (of 8)" in said[0]  # the one-time line of the limits


@needs_transformers
def test_hf_refuses_a_start_accumulation_above_a_phases(tmp_path):
    schedule = _schedule("step", (0, 4, 4, 0.1), (3, 8, 4, 0.2))
    with pytest.raises(ConfigError) as err:
        _hf_train(tmp_path, schedule, n=16, epochs=1, gradient_accumulation_steps=2)
    message = str(err.value)
    assert err.value.param == "gradient_accumulation_steps" and "\n" not in message
    assert "expected at most the smallest phase's accumulation, 1" in message
    assert "got 2; set it to 1, the first phase's" in message


@needs_transformers
def test_hf_refuses_a_dataset_without_a_length_in_one_line():
    from types import SimpleNamespace

    from torch.utils.data import IterableDataset

    from batchlab.integrations.transformers import ScheduledAccumulation

    class Stream(IterableDataset):
        def __iter__(self):
            yield from range(4)

    args = SimpleNamespace(train_batch_size=4, world_size=1, gradient_accumulation_steps=1)
    callback = ScheduledAccumulation(_schedule("step", (0, 4, 4, 0.1), (3, 8, 4, 0.2)))
    with pytest.raises(ConfigError) as err:
        callback.on_train_begin(
            args, None, None, train_dataloader=SimpleNamespace(dataset=Stream())
        )
    assert "\n" not in str(err.value) and "got Stream; use a map-style dataset" in str(err.value)


def test_a_resumed_sampler_continues_where_it_stopped():
    from batchlab.integrations.schedule import ScheduleSampler

    schedule = _schedule("examples", (0, 6, 3, 0.1), (20, 12, 4, 0.2))
    run = ScheduleSampler(50, schedule, seed=3, align_accumulation=True)
    for _ in range(5):
        run.next_step()
    resumed = ScheduleSampler(50, schedule, seed=3, align_accumulation=True)
    resumed.load_state_dict(run.state_dict())
    for _ in range(12):  # across the phase change and two epoch ends
        (a, micro_a), (b, micro_b) = run.next_step(), resumed.next_step()
        assert micro_a == micro_b
        assert (a.step, a.lr, a.accumulation_steps) == (b.step, b.lr, b.accumulation_steps)
