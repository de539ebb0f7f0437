"""Exercise checkers: each compares the learner's function with the reference on fresh inputs.

Every exercise is one ``ExerciseSpec`` in ``EXERCISES``, registered in its chapter's module
(``ch03`` holds chapter 03's specs, cases and named mistakes); a notebook calls its checker as
``checks.check_<function>(fn)``. ``engine`` compares and names mistakes, ``guard`` protects
the grading, ``fixtures`` gives the inputs several chapters share.

A failed check is a ``CheckFailed`` whose one-paragraph message says what was expected, what
came back, the likely mistake and a hint, never a traceback. Where it surfaces depends on who
runs the chapter:

- in a kernel a Jupyter server started (JupyterLab, Notebook, Binder: a learner working), the
  check prints its ✗ message and returns, so Run All reaches the end of the chapter; the
  chapter's later cells go on without the learner's function;
- everywhere else (nbval, nbclient, ``python -m utils.grade``, the tests, a script), it raises
  and its cell fails.

``CIRCUITS_STRICT_CHECKS=1`` forces the second behaviour, ``=0`` the first.
"""

from utils.checks import guard
from utils.checks.engine import (EXERCISES, STRICT_ENV, Attempt, CheckFailed, ExerciseSpec, Mistake,
                                 mistakes_catalogue, strict)
from utils.checks.guard import UNTRUSTED
from utils.checks import ch00, ch01, ch02, ch03, ch04, ch05, ch06, ch07, ch08, ch09, ch10  # noqa: E402  (registers the specs)

CHAPTER_MODULES = (ch00, ch01, ch02, ch03, ch04, ch05, ch06, ch07, ch08, ch09, ch10)
# every checker as checks.check_<function>, the name the notebooks call
globals().update({spec.check.__name__: spec.check for spec in EXERCISES.values()})

guard.take_snapshot()
