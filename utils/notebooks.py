"""`python -m utils.notebooks`: the command; the code is utils/tooling/notebooks.py."""

from utils.tooling.notebooks import main

if __name__ == "__main__":
    raise SystemExit(main())
