"""HSM mechanism profiles (hsm_config/profiles.py) and the README table that documents them."""

from __future__ import annotations

from pathlib import Path

import pytest

from hsm_config.profiles import (
    CKM_VENDOR_DEFINED,
    IV_SOURCES,
    PROFILES,
    WRAP_MECHANISMS,
    mechanism_name,
    mechanism_number,
    profile,
)

README = Path(__file__).resolve().parents[2] / "hsm_config" / "README.md"


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profile_values_are_valid(name: str) -> None:
    p = PROFILES[name]
    assert p.name == name
    number = mechanism_number(p.wrap_mechanism)
    assert mechanism_name(number) == p.wrap_mechanism  # the form recorded per KEK
    assert p.gcm_iv in IV_SOURCES
    assert p.source
    assert profile(name) is p


@pytest.mark.parametrize("name", sorted(WRAP_MECHANISMS))
def test_standard_names_round_trip(name: str) -> None:
    assert mechanism_name(mechanism_number(name)) == name


@pytest.mark.parametrize("text", ["0x80000171", "0x8000216f", "0xffffffff", "0x80000000"])
def test_vendor_hex_round_trips(text: str) -> None:
    number = mechanism_number(text)
    assert number >= CKM_VENDOR_DEFINED
    assert mechanism_name(number) == text
    assert mechanism_number(mechanism_name(number)) == number


def test_vendor_hex_is_case_insensitive() -> None:
    assert mechanism_number("0X8000216F") == 0x8000216F


@pytest.mark.parametrize("bad", ["CKM_FOO", "0x10", "0x1ffffffff", "", "0x", "0xzz", "8457"])
def test_invalid_mechanisms_raise(bad: str) -> None:
    with pytest.raises(ValueError, match="unknown wrap mechanism"):
        mechanism_number(bad)


def test_unknown_profile_names_the_known_ones() -> None:
    with pytest.raises(ValueError) as excinfo:
        profile("nope")
    message = str(excinfo.value)
    assert "nope" in message
    for name in PROFILES:
        assert name in message


def _readme_profile_table() -> dict[str, dict[str, str]]:
    """The rows of the README table whose header starts with ``profile``, keyed by profile."""
    lines = README.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if _cells(line)[:1] == ["profile"]]
    assert len(starts) == 1, "README needs exactly one table starting with a 'profile' column"
    header = _cells(lines[starts[0]])
    rows: dict[str, dict[str, str]] = {}
    for line in lines[starts[0] + 2 :]:
        if not line.startswith("|"):
            break
        cells = _cells(line)
        assert len(cells) == len(header), line
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def _cells(line: str) -> list[str]:
    if not line.startswith("|"):
        return []
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _code(cell: str) -> str:
    """The first `code span` of a cell (the mechanism), or the cell itself."""
    if "`" in cell:
        return cell.split("`")[1]
    return cell


def test_readme_table_lists_every_profile_with_its_values() -> None:
    rows = _readme_profile_table()
    assert set(rows) == set(PROFILES)
    for name, p in PROFILES.items():
        row = rows[name]
        assert mechanism_number(_code(row["wrap mechanism"])) == mechanism_number(
            p.wrap_mechanism
        ), name
        assert row["wrap format"] == p.wrap_format, name
        assert row["GCM IV source"] == p.gcm_iv, name
        assert row["unwrap template"] == ("yes" if p.unwrap_template else "no"), name
        assert row["tested here"] == ("yes" if p.tested else "no"), name
