"""Moved to utils/data/prepare_split.py (``python -m utils.data.prepare_split``); this name still runs it."""
import sys

from utils.data.prepare_split import main

if __name__ == "__main__":
    print("note: utils.prepare_split is now utils.data.prepare_split; running it", file=sys.stderr)
    sys.exit(main())
