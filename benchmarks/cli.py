"""The benchmark scripts' entry point: bad input (a run folder, config, data or weights file that cannot be read)
ends in one ``error:`` line and exit 2, as main.py's does, never a traceback."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(main: Callable[[], Optional[int]]) -> int:
    """``main()``'s exit code; exit 2 with one line for the errors main.py reports as bad input."""
    from main import INPUT_ERRORS
    try:
        return main() or 0
    except INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        print(f"error: '{e.filename}': {e.strerror}; give an existing file or folder", file=sys.stderr)
    except json.JSONDecodeError as e:
        print(f"error: a JSON file does not read ({e}); restore it or give another", file=sys.stderr)
    return 2
