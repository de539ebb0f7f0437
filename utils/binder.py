"""`python -m utils.binder`: the command; the code is utils/tooling/binder.py."""

from utils.tooling.binder import main

if __name__ == "__main__":
    raise SystemExit(main())
