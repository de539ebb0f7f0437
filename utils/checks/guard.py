"""The guard of the grading: a check fails when the course's code it relies on was replaced.

When ``utils.checks`` is imported it takes a snapshot of everything the checks rely on (the
course's modules, the checkers, torch's and Python's functions, IPython's cell-running hooks).
Before a check starts and after the learner's function returns, the guard compares the live
objects with the snapshot; once anything differs, every later check in this kernel says it
cannot be trusted (the grader scores the rest of the chapter 0). While the learner's function
runs, a profiler notes calls of the exercise's references: a function that calls the answer
fails. The course's own stand-ins for a learner (the references and the spec's named mistakes,
which the tests pass to the checkers) are not watched.

This protects grading (``python -m utils.grade``), where a submission is run as it is.
"""

from __future__ import annotations

import builtins
import inspect
import math
import sys
import types
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from transformer_lens import FactoredMatrix

from utils import circuits, fourier, models, proofs, residual_paths, superposition, tasks, train

# every tampering message carries this phrase; the grader scores later exercises 0 after it
UNTRUSTED = "cannot be trusted"

_MISSING = object()
# (not all of builtins: ipykernel swaps `input` in and out around every cell)
_GUARDED_BUILTINS = {"abs", "all", "any", "bool", "callable", "dict", "float", "getattr", "hasattr", "int",
                     "isinstance", "issubclass", "len", "list", "max", "min", "range", "round", "set", "sorted", "str",
                     "sum", "tuple", "type", "zip", "Exception", "NotImplementedError"}
_STATE: dict[str, Any] = {"originals": {}, "untrusted": None, "modules": ()}


def _guarded_modules() -> tuple:
    checkers = tuple(module for name, module in sorted(sys.modules.items()) if name.startswith("utils.checks"))
    return checkers + (circuits, fourier, models, proofs, residual_paths, superposition, tasks, train, torch, torch.linalg, torch.fft, F, math, builtins)


def course_names(namespace: dict) -> dict[str, Any]:
    """The names in a notebook's namespace bound to the course's modules or checkers."""
    from utils.checks.engine import EXERCISES

    ours = set(map(id, _STATE["modules"])) | {id(spec.check) for spec in EXERCISES.values()}
    return {name: value for name, value in namespace.items() if id(value) in ours}


def _shell_hooks() -> dict[str, Any]:
    """IPython's hooks that decide how a cell runs and how its errors show (empty outside IPython)."""
    shell = getattr(builtins, "get_ipython", lambda: None)()
    if shell is None:
        return {}
    # a method as the instance or its class holds it (getattr would make a new bound method each time)
    found = {f"IPython.{name}": vars(shell).get(name, getattr(type(shell), name, None)) for name in
             ("run_cell", "run_cell_async", "run_ast_nodes", "run_code", "showtraceback", "_showtraceback",
              "transform_cell", "CustomTB", "set_custom_exc")}
    found["IPython.custom_exceptions"] = tuple(getattr(shell, "custom_exceptions", ()))
    for name in ("input_transformers_post", "input_transformers_cleanup", "ast_transformers"):
        found[f"IPython.{name}"] = tuple(map(id, getattr(shell, name, ())))
    return found


def _guarded_objects() -> dict[str, Any]:
    """Everything the checks rely on, by name: the course's modules, torch's and Python's functions."""
    from utils.checks.engine import EXERCISES, CheckFailed, ExerciseSpec

    found: dict[str, Any] = {}
    for module in _STATE["modules"]:
        found[f"sys.modules[{module.__name__!r}]"] = sys.modules.get(module.__name__)
        for name, value in vars(module).items():
            if name.startswith("__") or (module is builtins and name not in _GUARDED_BUILTINS):
                continue
            key = f"{module.__name__}.{name}"
            found[key] = value
            if isinstance(value, types.FunctionType):
                found[key + ".__code__"] = value.__code__
                found[key + ".__defaults__"] = value.__defaults__
                found[key + ".__kwdefaults__"] = value.__kwdefaults__
    for cls in (Tensor, torch._C.TensorBase, FactoredMatrix, CheckFailed, ExerciseSpec):
        found.update({f"{cls.__qualname__}.{name}": value for name, value in vars(cls).items()})
    for spec in EXERCISES.values():
        found[f"{spec.label} code"] = spec.check.__code__
        for i, cell in enumerate(spec.check.__closure__ or ()):
            found[f"{spec.label} closure {i}"] = cell.cell_contents
            if isinstance(cell.cell_contents, types.FunctionType):
                found[f"{spec.label} closure {i} code"] = cell.cell_contents.__code__
    found.update(_shell_hooks())
    return found


def take_snapshot() -> None:
    """Note the originals (once, when utils.checks has imported every chapter's checkers)."""
    _STATE["modules"] = _guarded_modules()
    _STATE["originals"] = _guarded_objects()


def untrusted() -> str | None:
    """Why this kernel's checks cannot be trusted, or None while nothing was replaced."""
    return _STATE["untrusted"]


def verify_untouched(attempt, when: str, also_changed: tuple[str, ...] = (), *,
                     _state: dict = _STATE, _objects: Callable = _guarded_objects) -> None:
    """Raise CheckFailed naming what was replaced since the course's code was imported.

    Besides the course's modules and torch's functions, it compares the notebook's own names
    for the course's modules and checkers (``checks`` in ``checks.check_...``) with what they
    were bound to when this check started. (It holds its helpers as defaults, and the checkers
    hold it, so rebinding the guard's own names cannot switch it off.)
    """
    from utils.checks.engine import CheckFailed

    if _state["untrusted"]:
        raise CheckFailed(f"{attempt}: {_state['untrusted']}")
    now = _objects()
    changed = [name for name, value in _state["originals"].items() if now.get(name, _MISSING) is not value
               and not (isinstance(value, tuple) and now.get(name) == value)]
    changed += [f"the notebook's {name!r}" for name, value in attempt.names.items()
                if attempt.namespace.get(name, _MISSING) is not value]
    changed += also_changed
    changed = list(dict.fromkeys(name.split(".__")[0] for name in changed))  # f, not f and f.__code__
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        _state["untrusted"] = (f"the course's code was changed {when} ({shown}), so the checks in this kernel "
                               f"{UNTRUSTED}. Restart the kernel and run the chapter again without changing the "
                               "course's code.")
        raise CheckFailed(f"{attempt}: {_state['untrusted']}")


def _stand_ins(spec) -> set:
    """The course's own functions a test may pass for a learner's: the references and the named mistakes."""
    return {getattr(inspect.unwrap(f), "__code__", None) for f in (*spec.references, *(m.gives for m in spec.mistakes))}


def run_watched(fn: Callable, attempt, *args: Any, _verify: Callable = verify_untouched,
                **kwargs: Any) -> tuple[list[str], Any]:
    """Run the learner's `fn`, noting calls of the exercise's references; then verify nothing was replaced.

    Returns (the references it called, its result). Exceptions from `fn` pass through.
    """
    spec = attempt.spec
    # a decorated reference (@torch.no_grad()) is watched by its own code, not the decorator's, which it shares
    watched = {inspect.unwrap(ref).__code__: f"{ref.__module__.removeprefix('utils.')}.{ref.__qualname__}"
               for ref in spec.references}
    if getattr(inspect.unwrap(fn), "__code__", None) in _stand_ins(spec):
        watched = {}
    called: list[str] = []

    def note_reference_calls(frame, event, arg):
        if event == "call" and frame.f_code in watched:
            called.append(watched[frame.f_code])

    previous = sys.getprofile()
    sys.setprofile(note_reference_calls)
    try:
        result = fn(*args, **kwargs)
    finally:
        watch_kept = sys.getprofile() is note_reference_calls
        sys.setprofile(previous)
        _verify(attempt, "while your function ran", () if watch_kept else ("the reference watch",))
    return called, result
