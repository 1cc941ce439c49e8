"""The import direction the README states: main.py -> models/ -> backbone/ -> utils/, never back up (utils/sweep/,
an entry point beside main.py, excepted); the old module path of the split tool still runs."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOOR = {"main": 3, "benchmarks": 3, "models": 2, "backbone": 1, "utils": 0}


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every module a file imports, wherever the import statement stands."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


#: Entry points that live in a room for their module path (python -m utils.sweep) but stand beside main.py: the
#: sweep checks every row's config against the whole schema, which the method files complete when imported.
ENTRY_POINTS = {"utils/sweep"}


@pytest.mark.parametrize("room", ["utils", "backbone", "models"])
def test_no_file_imports_a_room_above_its_own(room):
    for path in (ROOT / room).rglob("*.py"):
        if any(path.relative_to(ROOT).as_posix().startswith(e + "/") for e in ENTRY_POINTS):
            continue
        above = {p for p in imported_packages(path) if FLOOR.get(p, -1) > FLOOR[room]}
        assert not above, f"{path.relative_to(ROOT)} imports {above}, above {room}/"


def test_datasets_and_layouts_import_one_way():
    layouts = imported_packages(ROOT / "utils/data/layouts.py")
    assert "utils" in layouts and "utils.data.datasets" not in (ROOT / "utils/data/layouts.py").read_text()


def test_the_old_split_tool_path_still_runs():
    res = subprocess.run([sys.executable, "-m", "utils.prepare_split", "--help"], cwd=ROOT, capture_output=True,
                         text=True)
    assert res.returncode == 0 and "--src" in res.stdout and "utils.data.prepare_split" in res.stderr
