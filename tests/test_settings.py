"""settings.py on its own (issue 19: it was only reached through recipes): the types, bounds and
choices a field declares, the conversions, the one-line messages, unused fields."""

from __future__ import annotations

import dataclasses

import pytest

from opt_deus_cli.errors import UsageError
from opt_deus_cli.settings import (
    SettingError,
    check_keys,
    check_settings,
    closest,
    parse_settings,
    setting,
    settings_dict,
)


@dataclasses.dataclass(frozen=True)
class Knobs:
    count: int = setting(2, minimum=1)
    rate: float = setting(0.5, above=0.0)
    share: float = setting(0.25, minimum=0.0, maximum=1.0)
    kind: str = setting("fast", choices=("fast", "exact"))
    width: int | None = setting(None, minimum=8)
    verbose: bool = setting(False)

    def __post_init__(self):
        check_settings(self)

    def unused(self) -> dict[str, str]:
        return {"rate": "kind exact has no rate"} if self.kind == "exact" else {}


def test_defaults_and_conversions():
    knobs = Knobs()
    assert (knobs.count, knobs.rate, knobs.kind, knobs.width, knobs.verbose) == (2, 0.5, "fast", None, False)
    converted = Knobs(rate=3, share=1)  # a YAML int is a float where a float is declared
    assert converted.rate == 3.0 and isinstance(converted.rate, float) and isinstance(converted.share, float)
    assert Knobs(width=8).width == 8 and Knobs(verbose=True).verbose is True


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("count", 0, "count must be a whole number >= 1, got 0"),
        ("count", 2.0, "count must be a whole number >= 1, got 2.0"),
        ("count", True, "count must be a whole number >= 1, got True"),  # a bool is not a number here
        ("rate", 0.0, "rate must be a positive number, got 0.0"),
        ("rate", float("nan"), "rate must be a positive number, got nan"),
        ("rate", 10**400, "rate must be a positive number, got 1"),  # too large for a float
        ("share", 1.5, "share must be a number in [0, 1], got 1.5"),
        ("kind", "slow", "kind must be one of fast, exact, got 'slow'"),
        ("width", 4, "width must be a whole number >= 8 or null, got 4"),
        ("verbose", "yes", "verbose must be true or false, got 'yes'"),
        ("count", None, "count must be a whole number >= 1, got None"),
    ],
)
def test_bad_values_name_the_field_and_what_it_must_be(field, value, message):
    with pytest.raises(SettingError) as caught:
        Knobs(**{field: value})
    assert str(caught.value).startswith(message) and caught.value.field == field
    assert isinstance(caught.value, UsageError)


def test_parse_settings_reads_a_recipe_block():
    assert parse_settings(Knobs, None, "recipe r", "knobs") == Knobs()
    assert parse_settings(Knobs, {"count": 3, "rate": 1}, "recipe r", "knobs") == Knobs(count=3, rate=1.0)
    for data, message in [
        ([1, 2], "recipe r: knobs must be a mapping (count, rate, share, kind, width, verbose)"),
        ({"cuont": 3}, "recipe r: knobs: unknown key 'cuont' (did you mean 'count'?)"),
        ({"count": -1}, "recipe r: knobs.count must be a whole number >= 1, got -1"),
        ({"kind": "exact", "rate": 0.1}, "recipe r: knobs.rate is not used: kind exact has no rate; remove it"),
    ]:
        with pytest.raises(UsageError) as caught:
            parse_settings(Knobs, data, "recipe r", "knobs")
        assert str(caught.value) == message and "\n" not in str(caught.value)
    # an older manifest recorded unused fields: reading it back is allowed
    assert parse_settings(Knobs, {"kind": "exact", "rate": 0.1}, "m", "knobs", allow_unused=True).rate == 0.1


def test_settings_dict_records_the_fields_in_use():
    assert settings_dict(Knobs()) == {
        "count": 2,
        "rate": 0.5,
        "share": 0.25,
        "kind": "fast",
        "width": None,
        "verbose": False,
    }
    assert "rate" not in settings_dict(Knobs(kind="exact"))


def test_unknown_keys_get_the_closest_or_the_list():
    assert closest("solvr", ["solver", "cost"]) == " (did you mean 'solver'?)"
    assert closest("zzz", ["solver", "cost"]) == " (allowed: cost, solver)"
    check_keys("where", {"cost": 1}, {"cost", "solver"})
    with pytest.raises(UsageError, match=r"^where: unknown key 'sovler' \(did you mean 'solver'\?\)$"):
        check_keys("where", {"sovler": 1}, {"cost", "solver"})
