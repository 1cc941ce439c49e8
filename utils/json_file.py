"""Reading a JSON file a user or a run folder gives, with the reason it cannot be taken in words an error message
continues with (each caller names the file, its role and the fix in its own error type)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class JsonFileError(ValueError):
    """A JSON file that exists but cannot be taken; ``reason`` says why in words a message continues with."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def read_json_file(path: Path) -> Any:
    """An existing JSON file's value; JsonFileError when it is a folder, not text, empty or not JSON (the callers
    name the file, its role and the fix in their own error)."""
    path = Path(path)
    if path.is_dir():
        raise JsonFileError("is a folder, not a file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise JsonFileError(f"cannot be read as text ({getattr(e, 'strerror', None) or e})") from None
    if not text.strip():
        raise JsonFileError("is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise JsonFileError(f"is not valid JSON ({e})") from None
