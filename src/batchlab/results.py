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

from batchlab.errors import ConfigError

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
        if not isinstance(value, dict):
            raise TypeError(f"expected a JSON object, got {type(value).__name__}")
        vt = args[1] if args else Any
        return {k: _from_jsonable(vt, v) for k, v in value.items()}
    if hint is float and isinstance(value, int):
        return float(value)
    return value


def _build(cls: type, data: dict) -> Any:
    if not isinstance(data, dict):
        raise TypeError(f"expected a JSON object for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            try:
                kwargs[f.name] = _from_jsonable(hints[f.name], data[f.name])
            except FieldError as exc:
                raise FieldError(f"{f.name}.{exc.path}", exc.problem) from None
            except (TypeError, ValueError, KeyError, AttributeError) as exc:
                raise FieldError(f.name, str(exc)) from None
    return cls(**kwargs)


class FieldError(TypeError):
    """A field of a result file that cannot be rebuilt; `path` is its dotted name."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


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


# -- reading result files that a user hands us ------------------------------------------


def read_json_object(
    path: str | Path, what: str, remake: str, param: str | None = None
) -> dict[str, Any]:
    """The JSON object in `path`, or one `ConfigError` saying what is wrong with the file.

    `what` names the file in messages ("plan file"); `remake` says how to get a good one; `param` is
    passed on to the error (the parameter that named the file).
    Covers the ways a hand-passed file goes wrong: missing, a directory, empty, binary,
    cut off mid-write, or a JSON value that is not an object.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            f"{what} {str(path)!r} is a directory, expected a JSON file; {remake}", param=param
        )
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist; {remake}", param=param)
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ConfigError(
            f"{what} {str(path)!r} is not text (binary data); {remake}", param=param
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{what} {str(path)!r} cannot be read ({exc.strerror})", param=param
        ) from None
    if not text.strip():
        raise ConfigError(f"{what} {str(path)!r} is empty; {remake}", param=param)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{what} {str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno}); "
            f"was it cut off while being written? {remake}",
            param=param,
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{what} {str(path)!r} holds a JSON {type(data).__name__}, expected an object; {remake}",
            param=param,
        )
    return data


def missing_fields(cls: type, data: dict[str, Any]) -> list[str]:
    """The fields of dataclass `cls` that have no default and are absent from `data`."""
    return [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in data
    ]


def type_problems(result: Any, limit: int = 3) -> list[str]:
    """Fields of a rebuilt result whose values do not have their annotated types (at most
    `limit`, and at most 3).

    `from_dict` trusts the file: a string where a number belongs comes back as a string and
    fails much later, far from the file. This walks the whole result against its type hints
    and names each bad field by its path (`spec.batch_size: expected int, got str`). A JSON
    null is accepted for a float, as `to_dict` writes non-finite floats as null.
    """
    problems: list[str] = []
    _check_value(type(result), result, type(result).__name__, problems)
    return problems[:limit]


def _check_value(hint: Any, value: Any, where: str, problems: list[str]) -> None:
    if hint is Any or len(problems) >= 3:
        return
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        arms = [a for a in args if a is not type(None)]
        for arm in arms:  # accepted when one arm has no problem
            trial: list[str] = []
            _check_value(arm, value, where, trial)
            if not trial:
                return
        if len(arms) == 1:
            _check_value(arms[0], value, where, problems)
        else:
            problems.append(f"{where}: expected {hint}, got {type(value).__name__}")
        return
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            problems.append(f"{where}: expected an object, got {type(value).__name__}")
            return
        hints = typing.get_type_hints(hint)
        for f in dataclasses.fields(hint):
            _check_value(hints[f.name], getattr(value, f.name), f"{where}.{f.name}", problems)
        return
    if origin in (tuple, list, dict):
        _check_container(origin, args, value, where, problems)
        return
    if not _scalar_ok(hint, value):
        name = getattr(hint, "__name__", str(hint))
        problems.append(f"{where}: expected {name}, got {type(value).__name__} {value!r:.40}")


def _check_container(origin: type, args: tuple, value: Any, where: str, problems: list) -> None:
    if not isinstance(value, origin):
        problems.append(f"{where}: expected a {origin.__name__}, got {type(value).__name__}")
    elif origin is dict:
        for key, item in value.items():
            _check_value(args[1] if args else Any, item, f"{where}[{key!r}]", problems)
    elif origin is tuple and args and args[-1] is not Ellipsis:
        if len(args) != len(value):
            problems.append(f"{where}: expected {len(args)} items, got {len(value)}")
        for i, (arm, item) in enumerate(zip(args, value, strict=False)):
            _check_value(arm, item, f"{where}[{i}]", problems)
    else:
        for i, item in enumerate(value):
            _check_value(args[0] if args else Any, item, f"{where}[{i}]", problems)


def _scalar_ok(hint: Any, value: Any) -> bool:
    if hint is float:  # an int is a float in JSON; null stands for a non-finite float
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a hint this walker does not model (a TypeVar, a Protocol): trusted
