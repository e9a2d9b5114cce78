"""The reference run behind a plan's absolute time prediction, read and checked.

A plan predicts seconds to target as `reference seconds / predicted speedup`, and the
speedup is relative to the task's reference batch B0. So the reference run must be a run of
*this* task (same name, same training-set size), at B0, towards the *same* target, and it
must have reached it. A run of another task or target gives a confident wrong number, so
each mismatch is refused with one line naming the field and both values.
"""

from __future__ import annotations

from pathlib import Path

from batchlab.errors import ConfigError
from batchlab.history import History
from batchlab.results import missing_fields, read_json_object, type_problems
from batchlab.target import parse_target
from batchlab.task import Task

_REMAKE = "pass the History JSON that `batchlab train --target ... --json` wrote"


def load_reference_run(path: str | Path) -> History:
    """Read a saved `History`; one `ConfigError` for a file that is not one."""
    data = read_json_object(path, "reference run", _REMAKE, param="reference_run")
    missing = missing_fields(History, data)
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ConfigError(
            f"reference run {str(path)!r} is not a training History (it lacks {shown}); " + _REMAKE,
            param="reference_run",
        )
    try:
        history = History.from_dict(data)
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        problems = [str(exc)]
    else:
        problems = type_problems(history)
    if problems:
        raise ConfigError(
            f"reference run {str(path)!r} does not match this version's History "
            f"({'; '.join(problems)}); {_REMAKE}",
            param="reference_run",
        )
    return history


def reference_seconds_to_target(
    reference_run: History | str | Path, task: Task, target: str | None
) -> float:
    """Seconds to target of a reference run of `task` at its batch size towards `target`."""
    history = (
        reference_run if isinstance(reference_run, History) else load_reference_run(reference_run)
    )
    given = isinstance(reference_run, History)
    where = "the reference run" if given else f"reference run {str(reference_run)!r}"
    mismatches = [
        f"{name} {theirs!r}, this plan's is {ours!r}"
        for name, theirs, ours in (
            ("task", history.task, task.name),
            ("training-set size", history.num_train, task.num_train),
            ("effective batch size", history.effective_batch_size, task.batch_size),
        )
        if theirs != ours
    ]
    if target is not None and _target_key(history.target) != _target_key(target):
        mismatches.append(f"target {history.target!r}, this plan's is {target!r}")
    if mismatches:
        raise ConfigError(
            f"{where} is not this plan's reference: its {mismatches[0]}; pass a run of the "
            "same task at its reference batch size towards the same target",
            param="reference_run",
        )
    if history.seconds_to_target is None:
        raise ConfigError(
            f"{where} never reached its target ({history.target}); pass as "
            "`reference_run` a run that did (train with a `target`, save its History)",
            param="reference_run",
        )
    return history.seconds_to_target


def _target_key(text: str | None) -> tuple | None:
    """`val_acc>=0.9` and `val_acc >= 0.90` are one target; an unparsable one is itself."""
    try:
        target = parse_target(text)
    except ConfigError:
        return ("unparsed", text)
    return None if target is None else (target.metric, target.op, target.value)
