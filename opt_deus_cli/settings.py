"""One parser for a method's settings: a recipe's YAML mapping -> a frozen dataclass.

A settings dataclass declares each field with `setting(default, ...)`: its type comes from the
annotation (int, float, str, or one of them `| None`), its bounds and choices from the field's
metadata. `check_settings` (called by the dataclass's __post_init__) and `parse_settings` (for a
recipe block) are the only code that validates a setting, so a method adds a setting by adding
a field. A dataclass may also say which of its fields its other choices make unused
(`unused() -> {field: why}`, e.g. the solver's settings under OpT-DeUS's reference mode): a recipe
that sets one is refused, since it would be recorded but change nothing, and the manifest records
only the fields in use. Imports no torch: parsing a recipe must stay cheap.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any

from .errors import UsageError


def setting(
    default: Any,
    *,
    choices: tuple = (),
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    doc: str = "",
) -> Any:
    """A settings field. minimum/maximum are inclusive bounds, `above` an exclusive lower bound."""
    return dataclasses.field(
        default=default,
        metadata={"choices": tuple(choices), "minimum": minimum, "maximum": maximum, "above": above, "doc": doc},
    )


class SettingError(UsageError):
    """A bad value; `field` names it so that callers can say where it came from."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def _kind(annotation) -> tuple[type, bool]:
    """(base type, may be None) of int / float / str / bool, optionally `| None`."""
    args = typing.get_args(annotation)
    if args:
        types = [a for a in args if a is not type(None)]
        return types[0], type(None) in args
    return annotation, False


def _describe(base: type, meta: dict, optional: bool) -> str:
    if meta["choices"]:
        text = f"one of {', '.join(map(str, meta['choices']))}"
    elif base is int:
        low = meta["minimum"]
        text = "a whole number" + (f" >= {low:g}" if low is not None else "")
    elif base is float:
        low, high, above = meta["minimum"], meta["maximum"], meta["above"]
        if above == 0 and high is None:
            text = "a positive number"
        elif low is not None and high is not None:
            text = f"a number in [{low:g}, {high:g}]"
        elif low is not None:
            text = f"a number >= {low:g}"
        else:
            text = "a finite number"
    elif base is bool:
        text = "true or false"
    else:
        text = "a string"
    return text + (" or null" if optional else "")


def _checked(value: Any, base: type, optional: bool, meta: dict) -> tuple[bool, Any]:
    """(ok, value converted to the field's type): a YAML int is accepted for a float."""
    if value is None:
        return optional, value
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            return False, value
    if base is bool:
        return isinstance(value, bool), value
    if isinstance(value, bool) or not isinstance(value, base):
        return False, value
    if meta["choices"]:
        return value in meta["choices"], value
    if base in (int, float):
        if base is float and not math.isfinite(value):
            return False, value
        low, high, above = meta["minimum"], meta["maximum"], meta["above"]
        ok = (low is None or value >= low) and (high is None or value <= high) and (above is None or value > above)
        return ok, value
    return True, value


def check_settings(obj: Any) -> None:
    """Validate (and convert, e.g. 1 -> 1.0 for a float) every field of a settings dataclass in
    place; raises SettingError naming the first bad field."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        base, optional = _kind(hints[f.name])
        value = getattr(obj, f.name)
        ok, converted = _checked(value, base, optional, f.metadata)
        if not ok:
            raise SettingError(f.name, f"must be {_describe(base, f.metadata, optional)}, got {value!r}")
        if converted is not value:
            object.__setattr__(obj, f.name, converted)


def closest(key: str, allowed) -> str:
    """' (did you mean ...?)' or ' (allowed: ...)' for an unknown key."""
    near = difflib.get_close_matches(key, sorted(allowed), n=1)
    return f" (did you mean {near[0]!r}?)" if near else f" (allowed: {', '.join(sorted(allowed))})"


def check_keys(where: str, given: dict, allowed) -> None:
    for key in given:
        if key not in allowed:
            raise UsageError(f"{where}: unknown key {key!r}{closest(str(key), allowed)}")


def unused_fields(obj: Any) -> dict[str, str]:
    """Field -> why it is unused, as the settings dataclass declares (none by default)."""
    unused = getattr(obj, "unused", None)
    return dict(unused()) if callable(unused) else {}


def parse_settings(cls: type, data: Any, where: str, key: str, allow_unused: bool = False):
    """The recipe block `key:` (a mapping, or null for the defaults) as a `cls` instance; errors
    read `<where>: <key>.<field> must be ..., got ...` on one line. A field the other choices make
    unused is refused too, unless allow_unused (reading an older manifest, which recorded them)."""
    if data is None:
        data = {}
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(data, dict):
        raise UsageError(f"{where}: {key} must be a mapping ({', '.join(names)})")
    check_keys(f"{where}: {key}", data, names)
    try:
        obj = cls(**data)
    except SettingError as e:
        raise UsageError(f"{where}: {key}.{e.field} {e.problem}") from None
    if not allow_unused:
        for name, why in unused_fields(obj).items():
            if name in data:
                raise UsageError(f"{where}: {key}.{name} is not used: {why}; remove it")
    return obj


def settings_dict(obj: Any) -> dict:
    """A settings dataclass as JSON types (for the manifest): the fields in use."""
    unused = unused_fields(obj)
    return {name: value for name, value in dataclasses.asdict(obj).items() if name not in unused}
