"""JSON round trip for the frozen result dataclasses every measurement returns.

Results are plain data: numbers, strings, tuples, dicts and nested result dataclasses.
`to_dict()` turns them into JSON-ready values; `from_dict()` rebuilds them, using the
field type hints to turn lists back into tuples and dicts back into nested results.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T", bound="JsonResult")


def _to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        # JSON has no NaN/inf; null keeps files valid for every reader.
        return None
    return value


def _from_jsonable(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _from_jsonable(non_none[0], value)
        for candidate in non_none:  # first one that accepts the value
            try:
                return _from_jsonable(candidate, value)
            except (TypeError, ValueError, KeyError):
                continue
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_jsonable(args[0], v) for v in value)
        if args:
            return tuple(_from_jsonable(a, v) for a, v in zip(args, value, strict=True))
        return tuple(value)
    if origin is list:
        return [_from_jsonable(args[0], v) for v in value] if args else list(value)
    if origin is dict:
        vt = args[1] if args else Any
        return {k: _from_jsonable(vt, v) for k, v in value.items()}
    if hint is float and isinstance(value, int):
        return float(value)
    return value


def _build(cls: type, data: dict) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _from_jsonable(hints[f.name], data[f.name])
    return cls(**kwargs)


class JsonResult:
    """Mixin for frozen dataclasses: `to_dict`, `to_json`, `from_dict`, `from_json`, `save`, `load`."""

    def to_dict(self) -> dict[str, Any]:
        return _to_jsonable(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        return _build(cls, data)

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        return cls.from_json(Path(path).read_text())


def read_json_object(path: str | Path, what: str, fix: str) -> dict[str, Any]:
    """The JSON object in the file at `path`, or a ConfigError naming the file and the fault.

    `what` names the file's kind ("history file"); `fix` says how to make a good one. A
    missing, unreadable, empty, cut-off, binary or non-object file each get their own line.
    """
    from batchlab.errors import ConfigError

    path = Path(path)
    if not path.is_file():
        kind = "is a directory" if path.is_dir() else "does not exist"
        raise ConfigError(f"{what} {str(path)!r} {kind}; {fix}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {str(path)!r} is not a text file; {fix}") from None
    except OSError as exc:
        raise ConfigError(f"{what} {str(path)!r} cannot be read ({exc.strerror}); {fix}") from None
    if not text.strip():
        raise ConfigError(f"{what} {str(path)!r} is empty; {fix}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{what} {str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno}); "
            f"was it cut off while being written? {fix}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{what} {str(path)!r} holds a JSON {type(data).__name__}, expected an object; {fix}"
        )
    return data
