"""`python -m utils.grade`: the command; the code is utils/tooling/grade.py."""

from utils.tooling.grade import main

if __name__ == "__main__":
    raise SystemExit(main())
