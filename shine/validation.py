"""Type and range checks of the library's configurable dataclasses, at construction.

The solvers, backward strategies and bi-level methods are frozen dataclasses built from
configuration files (``train.py`` instantiates them from ``configs/``) as well as from code. A
value of the wrong type (``max_iter="abc"``) or out of range (``tol=-1``) must fail where it
enters, naming the field and what it accepts, not later as an unrelated error deep inside a
solve. :func:`check_fields` does that from the field annotations plus a table of ranges::

    @dataclass(frozen=True)
    class Solver:
        max_iter: int = 30
        tol: float = 1e-6

        def __post_init__(self) -> None:
            check_fields(self, minimum={"max_iter": 0, "tol": 0.0})

Checked annotations: ``int`` (not ``bool``), ``float`` (an ``int`` is accepted), ``bool``,
``str``, ``Literal[...]``, ``X | None`` and unions of these; other annotations (tensors,
strategy objects, protocols) are left to the class.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin

_SIMPLE = (int, float, bool, str)


def _accepts(annotation: Any, value: Any) -> bool | None:
    """Whether ``value`` fits ``annotation``; ``None`` when the annotation is not checked."""
    origin = get_origin(annotation)
    if annotation is type(None):
        return value is None
    if origin is Literal:
        return value in get_args(annotation)
    if origin in (Union, types.UnionType):
        verdicts = [_accepts(a, value) for a in get_args(annotation)]
        if any(v is True for v in verdicts):
            return True
        if any(v is None for v in verdicts):
            return None  # an unchecked member (e.g. a tensor) may accept it
        return False
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return None


def _is_choice(annotation: Any) -> bool:
    """Whether ``annotation`` is a ``Literal`` (optionally ``| None``): a choice of values."""
    if get_origin(annotation) is Literal:
        return True
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        return bool(members) and all(get_origin(a) is Literal for a in members)
    return False


def _describe(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(annotation))
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def check_fields(
    obj: Any,
    *,
    minimum: Mapping[str, float] | None = None,
    positive: tuple[str, ...] = (),
) -> None:
    """Check the annotated types of ``obj``'s dataclass fields and the given ranges.

    Args:
        obj: a dataclass instance (called from its ``__post_init__``).
        minimum: ``{field: lowest valid value}`` (inclusive); ``None`` values are skipped.
        positive: fields that must be ``> 0``.

    ``nan`` fails every range check.

    Raises:
        TypeError: ``Class.field must be <type>, got <value> (<type>)``.
        ValueError: a ``Literal`` field outside its choices (``must be one of ...``), or
            ``Class.field must be >= <minimum>`` (or ``> 0``), ``got <value>``.
    """
    cls = type(obj)
    hints = typing.get_type_hints(cls)
    name = cls.__name__
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        annotation = hints.get(f.name, Any)
        verdict = _accepts(annotation, value)
        if verdict is False and _is_choice(annotation):
            raise ValueError(f"{name}.{f.name} must be {_describe(annotation)}, got {value!r}")
        if verdict is False:
            raise TypeError(
                f"{name}.{f.name} must be {_describe(hints[f.name])}, got {value!r} "
                f"({type(value).__name__})"
            )
    for key, low in (minimum or {}).items():
        value = getattr(obj, key)
        if isinstance(value, int | float) and not value >= low:  # nan fails too
            raise ValueError(f"{name}.{key} must be >= {low}, got {value}")
    for key in positive:
        value = getattr(obj, key)
        if isinstance(value, int | float) and not value > 0:
            raise ValueError(f"{name}.{key} must be > 0, got {value}")


__all__ = ["check_fields"]
