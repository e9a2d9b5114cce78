"""Reading a plan file: one clear `ConfigError` for a missing, empty, cut-off or foreign file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from batchlab.errors import ConfigError


def read_json_object(path: Path) -> dict[str, Any]:
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


def check_plan_fields(data: dict[str, Any], path: str | Path, required: list[str]) -> None:
    """A whole plan has every field without a default; say which are missing and why."""
    if data.get("partial") and "interrupted_during" in data:
        raise ConfigError(
            f"plan file {str(path)!r} is a partial plan (interrupted during "
            f"{data['interrupted_during']}): it has no recommendation; run the plan to the end"
        )
    missing = [name for name in required if name not in data]
    if missing:
        raise ConfigError(
            f"plan file {str(path)!r} is not a plan: expected the JSON of a whole plan, but it "
            f"lacks {', '.join(missing)}; pass the JSON `batchlab plan` wrote"
        )
