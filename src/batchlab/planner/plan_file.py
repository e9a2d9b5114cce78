"""Checking a plan file's fields: one clear `ConfigError` for a partial or foreign plan.

Reading the file itself (missing, empty, cut off, binary, not an object) is
`batchlab.results.read_json_object`; the types are checked by `results.type_problems`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batchlab.errors import ConfigError
from batchlab.results import missing_fields


def check_plan_fields(data: dict[str, Any], path: str | Path, plan_cls: type) -> None:
    """A whole plan has every field of `plan_cls` without a default; say which are missing."""
    if data.get("partial") and "interrupted_during" in data:
        raise ConfigError(
            f"plan file {str(path)!r} is a partial plan (interrupted during "
            f"{data['interrupted_during']}): it has no recommendation; run the plan to the end"
        )
    missing = missing_fields(plan_cls, data)
    if missing:
        raise ConfigError(
            f"plan file {str(path)!r} is not a plan: expected the JSON of a whole plan, but it "
            f"lacks {', '.join(missing)}; pass the JSON `batchlab plan` wrote"
        )
