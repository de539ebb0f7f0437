"""`python -m utils.bench`: the command; the code is utils/tooling/bench.py."""

from utils.tooling.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
