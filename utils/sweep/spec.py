"""A sweep file (exps/sweeps/*.json) read into the runs it plans, every one resolved and checked before any starts.

A row is a config, a protocol, overrides and seeds, with an optional parent row and fork task; a ``grid`` (config
key -> values) and ``variants`` (label -> a partial row) expand one entry into several rows. Each row x seed is a
``Run`` with a stable id (``<row name>_<seed>``) that names its own log_dir, where the planner finds its run folder
again. Anything wrong (an unknown field or config key, a missing parent, a cycle, two runs with one id) is a
SweepError naming the row (exit 2). The format: docs/sweeps.md.
"""
from __future__ import annotations

import copy
import difflib
import itertools
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from utils.sweep.fill import SweepError, fill, fill_value, flag, label, words

FILE_FIELDS = {"description", "vars", "seeds", "fork", "defaults", "variant_sets", "slurm", "rows"}
ROW_FIELDS = {"name", "config", "protocol", "overrides", "seeds", "parent", "fork_task", "grid", "variants",
              "seed_in_name", "enabled"}
DEFAULT_FIELDS = {"config", "protocol", "overrides", "seed_in_name"}
PATCH_FIELDS = ROW_FIELDS - {"name", "grid", "variants"}
RUN_ID = re.compile(r"[A-Za-z0-9._+=-]+")


@dataclass(frozen=True)
class Run:
    """One main.py run of a sweep: a row at one seed (seed None: the config's own)."""
    id: str                      # its folder LOG_DIR/<id>/ and console log LOG_DIR/<id>.out
    row: str                     # the row's name (the id without the seed)
    config: str
    protocol: Optional[str]
    overrides: dict = field(hash=False)
    seed: Optional[int] = None
    parent: Optional[str] = None  # the parent's run id: this run forks it at fork_task
    fork_task: Optional[int] = None


@dataclass
class Sweep:
    """A resolved sweep: its runs in the order they are started, and what every run and executor shares."""
    path: Path
    description: str
    runs: list[Run]
    slurm: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # overrides from the command line, given to every new run

    @property
    def name(self) -> str:
        return self.path.stem

    def by_id(self) -> dict[str, Run]:
        return {r.id: r for r in self.runs}


def load_file(path: Path) -> dict:
    """The sweep file as a JSON object; SweepError naming it when it is missing or not one."""
    if not path.is_file():
        raise SweepError(f"sweep file '{path}' does not exist; sweeps: {', '.join(sorted(available()))}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SweepError(f"sweep file '{path}' is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("rows"), list):
        raise SweepError(f"sweep file '{path}' must be a JSON object with a list \"rows\"")
    unknown(set(raw) - FILE_FIELDS, f"sweep file '{path}'", FILE_FIELDS)
    return raw


def available(folder: Path = Path("exps/sweeps")) -> list[str]:
    """The sweeps shipped in exps/sweeps (run.sh's modes)."""
    return [p.stem for p in folder.glob("*.json")] if folder.is_dir() else []


def unknown(keys: set, where: str, allowed: set) -> None:
    if keys:
        raise SweepError(f"{where}: unknown field(s) {sorted(keys)}; allowed: {sorted(allowed)}")


def variables(raw: dict, env: Optional[Mapping[str, str]], sets: Mapping[str, str]) -> dict[str, str]:
    """The file's vars, each replaced by the environment's value where ``env`` has it, then by ``--set``."""
    declared = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (raw.get("vars") or {}).items()}
    out = dict(declared)
    for name in declared:
        if env is not None and name in env:
            out[name] = env[name]
    for name, value in sets.items():
        if name not in declared:
            raise SweepError(f"--set {name}: the sweep declares no variable {name}; its vars: "
                             f"{', '.join(sorted(declared)) or 'none'}")
        out[name] = value
    return out


def seed_list(value: Any, values: Mapping[str, str], where: str) -> Optional[list[int]]:
    """Seeds as a list of ints (None: the config's own seed)."""
    if value is None:
        return None
    seeds = words(value, values, where)
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SweepError(f"{where}: seeds must be integers, got {json.dumps(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{where}: seeds {seeds} list a seed twice")
    return seeds


def merge(base: dict, patch: dict) -> dict:
    """A row laid over another: overrides merged key by key, every other field replaced."""
    out = copy.deepcopy(base)
    for k, v in patch.items():
        out[k] = dict(out.get(k) or {}, **v) if k == "overrides" else copy.deepcopy(v)
    return out


def axes(entry: dict, raw: dict, values: Mapping[str, str], where: str) -> list[list[tuple[str, str, Any]]]:
    """The entry's axes: the variants (label -> partial row), then each grid key (values, or label -> value)."""
    out = []
    variants = entry.get("variants")
    if isinstance(variants, str):
        variants = fill(variants, values, where)  # "{PROTOCOL}": the set named by a variable
        sets = raw.get("variant_sets") or {}
        if variants not in sets:
            raise SweepError(f"{where}: variants '{variants}' is not in \"variant_sets\" ({', '.join(sets) or 'none'})")
        variants = sets[variants]
    if variants is not None:
        if not isinstance(variants, dict) or not all(isinstance(p, dict) for p in variants.values()):
            raise SweepError(f"{where}: variants must map a label to a partial row (an object)")
        for lab, patch in variants.items():
            unknown(set(patch) - PATCH_FIELDS, f"{where} variant '{lab}'", PATCH_FIELDS)
        out.append([("variant", lab, patch) for lab, patch in variants.items()])
    if not isinstance(entry.get("grid") or {}, dict):
        raise SweepError(f"{where}: grid must map a config key to its values (a list, or label -> value)")
    for key, vals in (entry.get("grid") or {}).items():
        pairs = vals.items() if isinstance(vals, dict) else [(label(v), v) for v in words(vals, values, where)]
        out.append([(key, str(lab), v) for lab, v in pairs])
    return out


def expand(raw: dict, values: dict[str, str], file_seeds: Optional[list[int]]) -> list[tuple[int, dict]]:
    """Every row of the file, its grid and variants expanded and its strings filled: (entry index, row)."""
    defaults = raw.get("defaults") or {}
    unknown(set(defaults) - DEFAULT_FIELDS, "\"defaults\"", DEFAULT_FIELDS)
    rows = []
    for i, entry in enumerate(raw["rows"]):
        where = f"rows[{i}] ('{entry.get('name', '?')}')" if isinstance(entry, dict) else f"rows[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise SweepError(f"{where}: a row is an object with a \"name\"")
        unknown(set(entry) - ROW_FIELDS, where, ROW_FIELDS)
        own = {k: v for k, v in entry.items() if k not in ("grid", "variants")}
        for combo in itertools.product(*axes(entry, raw, values, where)):
            row = merge(defaults, {})
            labels = dict(values)
            for key, lab, v in combo:
                labels[key] = lab
                if key == "variant":
                    row = merge(row, v)
            row = merge(row, own)
            for key, lab, v in combo:
                if key != "variant":
                    row = merge(row, {"overrides": {key: v}})
            rows.append((i, resolve_row(row, values, labels, file_seeds, where)))
    return rows


def resolve_row(row: dict, values: dict[str, str], labels: dict[str, str], file_seeds: Optional[list[int]],
                where: str) -> dict:
    """One expanded row with its placeholders filled: names take labels, values take the variables as written."""
    if not flag(row.get("enabled", True), values, where):
        return {}
    named = {k: label(v) for k, v in labels.items()}
    name = fill(row["name"], named, where)
    where = f"row '{name}'"
    raw_values = {**labels, **values, "name": name}
    if not isinstance(row.get("config"), str):
        raise SweepError(f"{where}: no \"config\" (a JSON config file, e.g. exps/sdlora_c100.json)")
    overrides = row.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise SweepError(f"{where}: \"overrides\" must be an object of config keys")
    out = {"name": name, "config": fill(row["config"], raw_values, where),
           "protocol": fill(row["protocol"], raw_values, where) if row.get("protocol") else None,
           "overrides": {k: fill_value(v, raw_values, f"{where} override '{k}'") for k, v in overrides.items()},
           "seeds": seed_list(row["seeds"], values, where) if "seeds" in row else file_seeds,
           "seed_in_name": flag(row.get("seed_in_name", True), values, where),
           "parent": fill(row["parent"], named, where) if row.get("parent") else None,
           "fork_task": row.get("fork_task")}
    if out["parent"] is None and out["fork_task"] is not None:
        raise SweepError(f"{where}: fork_task {out['fork_task']} without a parent row")
    if out["parent"] is not None and (not isinstance(out["fork_task"], int) or isinstance(out["fork_task"], bool)
                                      or out["fork_task"] < 1):
        raise SweepError(f"{where}: parent '{out['parent']}' needs fork_task, the task (1 or more) its run is "
                         f"forked at, got {json.dumps(out['fork_task'])}")
    if out["seeds"] is not None and "seed" in out["overrides"]:
        raise SweepError(f"{where}: seed is given both as seeds {out['seeds']} and as an override; give one")
    return out


def runs_of(rows: list[tuple[int, dict]], fork: bool) -> list[Run]:
    """The runs (row x seed), seed by seed in the file's row order, each parent found at the same seed."""
    ids: dict[tuple[str, Optional[int]], str] = {}
    planned = []
    for i, row in rows:
        for seed in row["seeds"] if row["seeds"] is not None else [None]:
            rid = row["name"] if seed is None or not row["seed_in_name"] else f"{row['name']}_{seed}"
            if not RUN_ID.fullmatch(rid):
                raise SweepError(f"row '{row['name']}': run name '{rid}' must be letters, digits and ._+=- only "
                                 "(it names a folder)")
            if rid in ids.values():
                raise SweepError(f"row '{row['name']}': a second run named '{rid}' (row names x seeds must be "
                                 "unique; seed_in_name false takes one seed)")
            ids[(row["name"], seed)] = rid
            planned.append((seed, i, row, rid))
    order = {s: n for n, s in enumerate(dict.fromkeys(s for s, *_ in planned if s is not None))}
    planned.sort(key=lambda p: (order.get(p[0], len(order)), p[1]))
    runs = []
    for seed, _, row, rid in planned:
        parent = None
        if row["parent"] is not None:
            parent = ids.get((row["parent"], seed))
            if parent is None:
                near = difflib.get_close_matches(row["parent"], sorted({n for n, _ in ids}), n=3)
                raise SweepError(f"row '{row['name']}': parent '{row['parent']}' is not a row of this sweep at seed "
                                 f"{seed}{'; did you mean ' + ', '.join(near) + '?' if near else ''}")
        runs.append(Run(rid, row["name"], row["config"], row["protocol"], row["overrides"], seed,
                        parent if fork else None, row["fork_task"] if fork and parent else None))
    check_cycles(runs)
    return runs


def check_cycles(runs: list[Run]) -> None:
    """A run may not be its own ancestor."""
    parent = {r.id: r.parent for r in runs}
    for r in runs:
        seen, at = [r.id], r.parent
        while at is not None:
            if at in seen:
                raise SweepError(f"row '{r.row}': its parents form a cycle ({' -> '.join(seen + [at])})")
            seen.append(at)
            at = parent.get(at)


def check_configs(runs: list[Run], extra: dict) -> None:
    """Each run's config as main.py will build it (file, protocol, overrides, seed, the command line's extra
    overrides): an unknown key, a bad value or a missing file stops the sweep here, naming the row. The schema
    needs every method (and so torch: 400 MB a process); a process without them checks in a child, so that the
    sweep's driver, which waits beside its runs, never holds them."""
    if "torch" in sys.modules:
        check_configs_here(runs, extra)
    else:
        check_configs_in_child(runs, extra)


def check_configs_in_child(runs: list[Run], extra: dict) -> None:
    """``check_configs`` in a child Python (``check_stdin``): its SweepError raised here."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    payload = json.dumps({"runs": [asdict(r) for r in runs], "extra": extra})
    done = subprocess.run([sys.executable, "-c", "from utils.sweep.spec import check_stdin; check_stdin()"],
                          input=payload, capture_output=True, text=True, env=env)
    if done.returncode == 2:
        raise SweepError(done.stdout.strip())
    if done.returncode != 0:
        raise SweepError(f"checking the rows' configs failed in its child process: {done.stderr.strip()[-2000:]}")


def check_stdin() -> None:
    """The child of ``check_configs_in_child``: runs and extra overrides as JSON on stdin; a SweepError's message
    on stdout with exit status 2."""
    given = json.load(sys.stdin)
    try:
        check_configs_here([Run(**r) for r in given["runs"]], given["extra"])
    except SweepError as e:
        print(e)
        sys.exit(2)


def check_configs_here(runs: list[Run], extra: dict) -> None:
    """``check_configs`` in this process."""
    import models  # noqa: F401  (every method registers its keys: the schema reads them)
    from utils.config import ConfigError, load_config
    seen: dict[str, None] = {}
    for run in runs:
        over = dict(run.overrides, **extra)
        if run.protocol:
            over["protocol"] = run.protocol
        if run.seed is not None:
            over["seed"] = run.seed
        key = json.dumps([run.config, over], sort_keys=True, default=str)
        if key in seen:
            continue
        try:
            load_config(run.config, over)
        except ConfigError as e:
            raise SweepError(f"row '{run.row}' (run {run.id}): {e}") from None
        seen[key] = None


def read_sweep(path: str | Path, *, sets: Optional[Mapping[str, str]] = None, env: Optional[Mapping[str, str]] = None,
               seeds: Optional[list[int]] = None, fork: Optional[bool] = None, extra: Optional[dict] = None,
               check: bool = True) -> Sweep:
    """The sweep file at ``path`` resolved into its runs and checked; ``sets`` / ``env`` replace its variables,
    ``seeds`` its default seeds, ``fork`` its "fork" (False: rows with a parent run from scratch)."""
    path = Path(path)
    raw = load_file(path)
    values = variables(raw, env, sets or {})
    file_seeds = seeds if seeds is not None else seed_list(raw.get("seeds"), values, "\"seeds\"")
    forking = fork if fork is not None else flag(raw.get("fork", True), values, "\"fork\"")
    rows = [(i, row) for i, row in expand(raw, values, file_seeds) if row]
    runs = runs_of(rows, forking)
    slurm = raw.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise SweepError(f"sweep file '{path}': \"slurm\" must be an object of SLURM parameters")
    sweep = Sweep(path, str(raw.get("description", "")), runs, dict(slurm), dict(extra or {}))
    if check:
        check_configs(runs, sweep.extra)
    return sweep


def environment() -> Mapping[str, str]:
    """The process environment, for ``--env`` (run.sh's variables: SEEDS, PROTOCOL, SHARED, NEEDS, ...)."""
    return os.environ
