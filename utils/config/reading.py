"""Reading a config: the typed schema (schema.py, plus each method's own keys, methods.py), cross-checks
(checks.py), the protocol (protocols.py), command-line overrides, and the key listing.

A run's config is a JSON file plus ``--key value`` overrides. Unknown keys, ill-typed values,
values outside their choices and keys the chosen method does not use stop the run before any
work, with a message that names the key and the fix. The resolved config is saved with every run.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

from utils.config.checks import _cross_checks
from utils.config.methods import FIELDS, method_specs
from utils.config.protocols import apply_protocol
from utils.config.schema import DEFAULTS, LORA_METHODS, Config, ConfigError
from utils import json_file


#: Keys of the published configs that mean nothing here, with what to do instead.
RENAMED = {
    "filepath": 'use "log_dir": every run writes masks and beta logs into its own run folder',
    "convnet_type": 'use "backbone_type"',
    "tuned_epoch": 'use "epochs" (and "init_epoch" for task 0)',
    "lr": 'use "lrate"',
}


def _own_fields(name: str) -> dict:
    spec = method_specs().get(name)
    return {f.name: f for f in dataclasses.fields(spec.keys)} if spec and spec.keys else {}


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether a JSON value matches a schema type hint (ints are accepted where floats are)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if hint is list:
        return isinstance(value, list)
    if origin is list:
        (inner,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    raise TypeError(f"unsupported schema type {hint!r}")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


HINTS = typing.get_type_hints(Config)


def _owners(key: str) -> list[str]:
    """The methods that declare ``key`` among their own keys."""
    return [m for m in method_specs() if key in _own_fields(m)]


def _at_owner_default(key: str, value: Any) -> bool:
    """Another method's own key at that method's default does nothing here: accepted and dropped, as a shared
    key of another method is (the config.json of a run from before the key moved into its method lists it)."""
    return any(value == _own_fields(m)[key].default for m in _owners(key))


def _unknown_key_message(key: str, model_name: str) -> str:
    if key in RENAMED:
        return f"config key '{key}' is not used here: {RENAMED[key]}"
    owners = _owners(key)
    if owners:
        return (f"config key '{key}' belongs to model_name {', '.join(repr(m) for m in owners)} and is not used "
                f"by model_name '{model_name}'; remove it")
    near = difflib.get_close_matches(key, list(FIELDS) + sorted({k for m in method_specs() for k in _own_fields(m)}),
                                     n=1, cutoff=0.6)
    hint = f" Did you mean '{near[0]}'?" if near else " python main.py --keys lists every key."
    return f"unknown config key '{key}'.{hint}"


def _check_value(key: str, value: Any, f, hint) -> Optional[str]:
    if not _type_ok(value, hint):
        return f"config key '{key}' = {json.dumps(value)} should be {_describe(hint)}"
    problem = f.metadata["check"](value) if f.metadata["check"] else None
    return f"config key '{key}' = {json.dumps(value)} {problem}" if problem else None


def build_config(raw: dict) -> Config:
    """Check a dict of keys against the schema (the shared keys here, the method's own from its file) and
    return the resolved Config, or raise ConfigError."""
    specs = method_specs()
    name = raw.get("model_name", DEFAULTS.model_name)
    if name not in specs:
        raise ConfigError(f"config key 'model_name' = {json.dumps(name)} should be one of "
                          f"{', '.join(json.dumps(m) for m in sorted(specs))}")
    spec, own = specs[name], _own_fields(name)
    own_hints = typing.get_type_hints(spec.keys) if spec.keys else {}
    errors, shared, mine = [], {}, {}
    for key, value in raw.items():
        if key in FIELDS:
            problem = _check_value(key, value, FIELDS[key], HINTS[key])
            shared[key] = value
        elif key in own:
            problem = _check_value(key, value, own[key], own_hints[key])
            mine[key] = value
        elif _at_owner_default(key, value):
            problem = None
        else:
            problem = _unknown_key_message(key, name)
        if problem:
            errors.append(problem)
    if errors:
        raise ConfigError("\n".join(errors))
    cfg = Config(**shared, method_keys=spec.keys(**mine) if spec.keys else None)
    errors = [  # a method key set away from its default would silently do nothing: refuse it
        f"config key '{key}' is not used by model_name '{cfg.model_name}' (it belongs to "
        f"{', '.join(FIELDS[key].metadata['methods'])}); remove it"
        for key in shared
        if FIELDS[key].metadata["methods"] and cfg.model_name not in FIELDS[key].metadata["methods"]
        and key not in spec.uses and shared[key] != getattr(DEFAULTS, key)
    ]
    errors += _cross_checks(cfg, raw)
    if spec.check is not None:
        errors += spec.check(cfg, raw)
    if errors:
        raise ConfigError("\n".join(errors))
    return cfg


def parse_value(text: str) -> Any:
    """Command-line values are JSON where they parse (numbers, booleans, lists), plain strings otherwise."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(args: list[str]) -> dict:
    """``--key value`` and ``--key=value`` pairs into a dict; raises ConfigError on a stray token."""
    out, i = {}, 0
    while i < len(args):
        tok = args[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise ConfigError(f"unexpected argument '{tok}': overrides are written --key value")
        if "=" in tok:
            key, value = tok[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override '{tok}' has no value: write {tok} VALUE")
            key, value = tok[2:], args[i + 1]
            i += 2
        out[key.replace("-", "_")] = parse_value(value)
    return out


def load_config(path: Optional[str], overrides: Optional[dict] = None) -> Config:
    """Read a JSON config file (or none), lay the protocol over it (``protocol``: protocols.py), apply
    overrides (the command line wins), and check it."""
    raw: dict = {}
    if path is not None:
        raw = read_json_file(path, "config file", "give a JSON file of config keys (see exps/)")
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{path}' must hold a JSON object of keys")
    return build_config(apply_protocol(raw, overrides or {}))


def read_json_file(path: str, what: str, fix: str):
    """A JSON file the user names (a config, a protocol); ConfigError naming it when it is missing, a folder,
    unreadable, empty or not JSON."""
    if not Path(path).exists():
        raise ConfigError(f"{what} '{path}' does not exist; {fix}")
    try:
        return json_file.read_json_file(Path(path))
    except json_file.JsonFileError as e:
        raise ConfigError(f"{what} '{path}' {e.reason}; {fix}") from None


def describe_keys() -> str:
    """Every key with its default, its help line and (if not every method) the methods it belongs to;
    then each method's own keys, declared in its file."""
    lines = []
    for name, f in FIELDS.items():
        methods = f.metadata["methods"]
        scope = f" [{', '.join(methods)}]" if methods and methods != LORA_METHODS else ""
        lines.append(f"{name:24s} {json.dumps(getattr(DEFAULTS, name)):38s} {f.metadata['help']}{scope}")
    for method in sorted(method_specs()):
        for name, f in _own_fields(method).items():
            lines.append(f"{name:24s} {json.dumps(f.default):38s} {f.metadata['help']} [{method}]")
    return "\n".join(lines)


def check_device(cfg: Config, device_type: str) -> None:
    """amp and compile are CUDA features: refuse them elsewhere rather than silently run without."""
    if device_type != "cuda" and (cfg.amp or cfg.compile):
        raise ConfigError(f"config keys 'amp' and 'compile' need a CUDA device, but the run is on "
                          f"'{device_type}'; set them to false")
