"""python -m utils.sweep FILE [options]: see utils/sweep/cli.py."""
from utils.sweep.cli import main

if __name__ == "__main__":
    main()
