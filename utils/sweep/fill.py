"""Placeholders in sweep files: ``{NAME}`` in a row's strings is replaced by a variable (the file's ``vars``, the
environment or ``--set``), a grid axis's label, ``{variant}`` or ``{name}`` (the row's resolved name).

Names take a value's *label* (``[0,3,6]`` -> ``036``, as run.sh's ``tr -d ,`` wrote them); override values take it
as written and are then read as the command line reads a value (JSON where it parses), so ``"{SHIFT}"`` with
SHIFT ``[3,4,8]`` is the list [3, 4, 8].
"""
from __future__ import annotations

import json
import re
from typing import Any, Mapping

from utils.config.reading import parse_value

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class SweepError(ValueError):
    """A sweep file or option that cannot be run as it is; the message names the row (or option) and the fix."""


def label(value: Any) -> str:
    """A value as it appears in a row name: JSON without brackets, commas, quotes or spaces."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return re.sub(r"[\[\]\",\s]", "", text)


def has_placeholder(text: Any) -> bool:
    return isinstance(text, str) and PLACEHOLDER.search(text) is not None


def fill(text: str, values: Mapping[str, str], where: str) -> str:
    """``text`` with each {NAME} replaced from ``values``; SweepError naming ``where`` for an unknown NAME."""
    def one(m: re.Match) -> str:
        if m.group(1) not in values:
            raise SweepError(f"{where}: unknown placeholder {{{m.group(1)}}}; known: "
                             f"{', '.join(sorted(values)) or 'none'} (declare variables under \"vars\")")
        return values[m.group(1)]
    return PLACEHOLDER.sub(one, text)


def fill_value(value: Any, values: Mapping[str, str], where: str) -> Any:
    """An override value with its placeholders filled: a string that had one is read as JSON where it parses
    (as main.py reads ``--key value``); lists and objects are filled item by item."""
    if isinstance(value, str):
        return parse_value(fill(value, values, where)) if has_placeholder(value) else value
    if isinstance(value, list):
        return [fill_value(v, values, where) for v in value]
    if isinstance(value, dict):
        return {k: fill_value(v, values, where) for k, v in value.items()}
    return value


def words(value: Any, values: Mapping[str, str], where: str) -> list:
    """A list given as a list, or as a string of whitespace-separated values ("{SEEDS}" -> "1993 1994" -> [1993,
    1994]): how environment lists such as NEEDS or DRIFTS become grid axes."""
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        return [parse_value(w) for w in fill(value, values, where).split()]
    raise SweepError(f"{where}: expected a list or a string of space-separated values, got {json.dumps(value)}")


def flag(value: Any, values: Mapping[str, str], where: str) -> bool:
    """A yes/no field (``fork``, ``enabled``): a boolean, or a string that fills to 1/0/true/false/yes/no."""
    if isinstance(value, bool):
        return value
    text = fill(value, values, where).strip().lower() if isinstance(value, str) else value
    if text in ("1", "true", "yes", 1):
        return True
    if text in ("0", "false", "no", "", 0):
        return False
    raise SweepError(f"{where}: {json.dumps(value)} is not a yes/no value (true, false, 1, 0)")
