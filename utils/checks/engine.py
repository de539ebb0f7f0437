"""The checking engine: exercise specs, one attempt at a check, comparison, diagnosis, messages.

An exercise is one ``ExerciseSpec`` in ``EXERCISES``, registered by ``exercise(...)`` in its
chapter's module. A check cell calls ``spec.check(fn)``; that makes an ``Attempt`` (the spec,
the label, the notebook's namespace) and passes it explicitly to everything the check calls.

The learner's function always runs first, on copies of the inputs; the expected answer is
computed afterwards, on fresh copies of the same inputs, so while the learner's code runs no
object it can reach holds the answer (tests/exercises/test_checks.py tries to find it).
"""

from __future__ import annotations

import inspect
import math
import os
import sys
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import Tensor

from utils.checks import guard

STRICT_ENV = "CIRCUITS_STRICT_CHECKS"


def strict() -> bool:
    """True when a failed check raises (fails its cell); False when it prints its ✗ message and returns."""
    flag = os.environ.get(STRICT_ENV, "").strip()
    if flag:
        return flag != "0"
    return "JPY_SESSION_NAME" not in os.environ  # jupyter_server sets it for every kernel it starts


class CheckFailed(Exception):
    """An exercise check failed; the message is for the learner."""

    def _render_traceback_(self) -> list[str]:  # IPython shows this instead of a traceback
        return [f"\x1b[31m✗ {self.args[0]}\x1b[0m"]


@dataclass(frozen=True)
class Mistake:
    """A likely wrong answer to an exercise, recognised by what it returns.

    `gives` takes the exercise function's arguments and returns what the mistake computes,
    built from the reference and its pieces (an argument, a smaller function, a change to the
    inputs or the output), never a private copy of it. When a learner's result matches it (and
    not the answer), the message says "this looks like <looks_like>: <advice>". Neither names
    the solution's code.
    """

    looks_like: str  # "W_K without the transpose"
    advice: str  # what to reconsider: "a key token's score is a row of ..., not ..."
    gives: Callable


Case = tuple[str, tuple]  # (where, for the message: "on the addition model", the function's arguments)


@dataclass(frozen=True)
class ExerciseSpec:
    """Everything about one exercise: the one record its checker, label, heading and mistakes come from."""

    number: str  # "3.2"
    title: str  # "the full OV circuit": the notebook's heading is "### Exercise 3.2 — the full OV circuit"
    function: str  # the learner's function the checker takes: "full_ov_circuit"
    references: tuple[Callable, ...]  # the functions in utils that compute the answer (a learner may not call them)
    check: Callable  # check_<function>(fn): what a chapter's check cell calls
    hint: str = ""  # the idea to reconsider when the result is wrong (never the solution's code)
    mistakes: tuple[Mistake, ...] = ()
    cases: Callable[[], list[Case]] | None = None  # fresh inputs, drawn anew at every check
    atol: float = 1e-5
    rtol: float = 1e-4
    kind: str = "analysis"  # "analysis" (a measurement, a hook, an ablation) or "implementation"
    replacement: Callable | None = None  # what stands in for a failed attempt, if not references[0] as it is
    parts: tuple[str, ...] = ()  # names of the parts of a tuple result, for the messages ("the scores", ...)

    @property
    def stand_in(self) -> Callable:
        """The course's function the chapter goes on with when the learner's fails its check."""
        return self.replacement or self.references[0]

    @property
    def label(self) -> str:
        return f"Exercise {self.number} ({self.function})"


@dataclass(frozen=True)
class Attempt:
    """One run of one exercise's check: what every function the check calls is told explicitly.

    ``str(attempt)`` is the label the messages start with ("Exercise 3.2 (full_ov_circuit) on
    the addition model"); `namespace` and `names` are the notebook's globals and the names in
    them bound to the course's code when the check started (the guard compares them after).
    """

    spec: ExerciseSpec
    where: str = ""
    namespace: dict = field(default_factory=dict, compare=False, repr=False)
    names: dict = field(default_factory=dict, compare=False, repr=False)
    advice: str = ""  # a hint for this part of the check only, instead of the exercise's
    noticed: set = field(default_factory=set, compare=False, repr=False)  # causes seen while the learner's code ran

    def __str__(self) -> str:
        return f"{self.spec.label} {self.where}".rstrip()

    def at(self, where: str, advice: str = "") -> Attempt:
        """The same attempt, its messages saying where: ``attempt.at("on the addition model")``."""
        return replace(self, where=f"{self.where} {where}".strip(), advice=advice or self.advice)

    @property
    def hint(self) -> str:
        return self.advice or self.spec.hint


EXERCISES: dict[str, ExerciseSpec] = {}


def exercise(number: str, title: str, *references: Callable, hint: str = "", mistakes: tuple[Mistake, ...] = (),
             cases: Callable[[], list[Case]] | None = None, atol: float = 1e-5, rtol: float = 1e-4,
             kind: str = "analysis", function: str | None = None, replacement: Callable | None = None,
             parts: tuple[str, ...] = ()) -> Callable:
    """Register the checker of exercise `number` and return it.

    Used as a decorator on ``check_<function>(fn, attempt)`` (a body of its own), or, given
    `cases` and `function`, called directly: the checker then compares the learner's function
    with ``references[0]`` on every case, within `atol`/`rtol`, naming any of `mistakes` the
    result matches. Either way the checker verifies that nothing it relies on was replaced,
    raises or prints a failure as ``strict()`` says, and rejects a learner's function that
    calls one of `references`.

    The checker returns the function the rest of the chapter uses, so a check cell reads
    ``fn = checks.check_fn(fn)``: the learner's own `fn` when it passed; when it failed (and
    the check did not raise), `replacement`, or ``references[0]`` when that takes the same
    arguments and gives the same kind of result.
    """

    def register(body: Callable) -> Callable:
        spec_function = function or body.__name__.removeprefix("check_")
        verify = guard.verify_untouched  # held here, so that rebinding the guard's name cannot switch it off

        def check(fn: Callable) -> Callable:
            spec = EXERCISES[number]
            namespace = sys._getframe(1).f_globals  # the notebook's: its names for the course's code are guarded too
            attempt = Attempt(spec, namespace=namespace, names=guard.course_names(namespace))
            try:
                verify(attempt, "before this check ran")
                if fn is spec.stand_in:
                    raise CheckFailed(f"{attempt}: {spec.function} is the course's own function, which an earlier "
                                      "failed check put in place of yours. Run the cell that defines your "
                                      f"{spec.function}, then this check again.")
                body(fn, attempt)
            except CheckFailed as failure:
                if _names_the_scores_hook(fn):  # an edit made in place there is dropped without a warning
                    attempt.noticed.add(SCORES_TRAP)
                if attempt.noticed and not any(cause in failure.args[0] for cause in attempt.noticed):
                    failure = CheckFailed(f"{attempt}: {'; '.join(sorted(attempt.noticed))}. (What the check saw: "
                                          f"{failure.args[0].removeprefix(f'{attempt}: ')})")
                if strict():
                    raise failure.with_traceback(None) from None
                print(f"\x1b[31m✗ {failure.args[0]}\x1b[0m")
                print(f"  The chapter goes on with the course's own {spec.function} in place of yours; come back to "
                      "this exercise when you are ready.")
                return spec.stand_in
            return fn

        check.__name__ = check.__qualname__ = f"check_{spec_function}"
        check.__doc__ = f"Check exercise {number} ({title}): call with your {spec_function} function."
        EXERCISES[number] = ExerciseSpec(number, title, spec_function, references, check, hint, tuple(mistakes),
                                         cases, atol, rtol, kind, replacement, tuple(parts))
        return check

    if cases is not None:
        if function is None or not references:
            raise ValueError(f"exercise {number}: a checker built from cases needs function= and a reference")
        return register(compare_on_cases)
    return register


def copies(args: tuple) -> tuple:
    """The arguments with every tensor (also inside lists, tuples and dicts) cloned."""
    def copy(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.clone()
        if isinstance(value, (list, tuple)):
            return type(value)(map(copy, value))
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        return value
    return tuple(map(copy, args))


def compare_on_cases(fn: Callable, attempt: Attempt) -> None:
    """The checker of an exercise given by its cases: the learner's result against the reference on each."""
    for where, args in attempt.spec.cases():
        check_case(fn, attempt.at(where), args)
    passed(attempt)


def check_case(fn: Callable, attempt: Attempt, args: tuple, reference: Callable | None = None, **tolerance) -> None:
    """Call the learner's function on copies of `args`, then the reference on fresh copies, and compare.

    The reference runs only after the learner's function has returned, so the expected result
    does not exist anywhere while the learner's code runs.
    """
    spec = attempt.spec
    got = call_learner(fn, attempt, *copies(args))
    with torch.no_grad():
        expected = (reference or spec.references[0])(*copies(args))
    compare(got, expected, attempt, args, atol=tolerance.get("atol", spec.atol), rtol=tolerance.get("rtol", spec.rtol))


# TransformerLens 4 bridges compute attention inside the wrapped module: an edit returned from a hook on
# hook_attn_scores is dropped, and this UserWarning is the only sign (../shared/TRANSFORMER_LENS_4.md)
SCORES_EDIT_DROPPED = "hook_attn_scores returned a modified tensor"
SCORES_TRAP = ("your hook edits hook_attn_scores, and TransformerLens 4 models drop edits made there (a UserWarning "
               "is the only sign): the model ran as if your hook did nothing. Edit the attention pattern "
               "(hook_pattern), or the queries and keys, instead")


def _names_the_scores_hook(fn: Callable) -> bool:
    """True when the learner's function's source names the attention-scores hook point."""
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):  # no source to read (a builtin, a lambda typed at a prompt)
        return False
    return "attn_scores" in source


def call_learner(fn: Callable, attempt: Attempt, *args: Any, **kwargs: Any) -> Any:
    """Call the learner's function, turning 'not implemented', crashes and calls of the answer into CheckFailed.

    A hook edit that TransformerLens dropped (see SCORES_TRAP) is noted on the attempt, and a failure
    message then starts with it.
    """
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            called, result = guard.run_watched(fn, attempt, *args, **kwargs)
        for warning in seen:
            if SCORES_EDIT_DROPPED in str(warning.message):
                attempt.noticed.add(SCORES_TRAP)
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    except NotImplementedError:
        raise CheckFailed(f"{attempt}: not implemented yet. Fill in the function in the cell above, "
                          f"run that cell, then run this check again.") from None
    except CheckFailed:
        raise
    except Exception as err:  # the learner's code crashed: say where, briefly
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise CheckFailed(f"{attempt}: your function raised {type(err).__name__}: {first_line}"
                          + (f" Hint: {attempt.hint}" if attempt.hint else "")) from None
    if called:
        raise CheckFailed(f"{attempt}: your function calls {called[0]}, the course's own answer to this exercise, "
                          "so the check learns nothing about your code. Hint: write the computation yourself; the "
                          "exercise's hint lists the pieces.")
    return result


def compare(got: Any, expected: Any, attempt: Attempt, inputs: tuple | None = None,
            atol: float = 1e-5, rtol: float = 1e-4, what: str = "result") -> None:
    """Compare a result of any kind the course's exercises return: tensor, number, tuple or dict of them.

    Given the `inputs` the learner's function was called with, a wrong result that matches one
    of the exercise's mistakes is named in the message.
    """
    if isinstance(expected, Tensor):
        compare_tensors(got, expected, attempt, atol=atol, rtol=rtol, what=what, inputs=inputs)
    elif isinstance(expected, (float, int)) and not isinstance(expected, bool):
        compare_float(got, float(expected), attempt, _noun(what), atol=atol, inputs=inputs)
    elif isinstance(expected, (tuple, dict)):
        try:
            _compare_parts(got, expected, attempt, atol, rtol, what)
        except CheckFailed as failure:
            named = diagnosis(got, attempt, inputs, atol, rtol)
            if not named:
                raise
            problem = failure.args[0].split(". Hint: ")[0]
            raise CheckFailed(f"{problem}. {named}") from None
    else:
        raise TypeError(f"compare: no rule for a {type(expected).__name__} result")


def _compare_parts(got: Any, expected: tuple | dict, attempt: Attempt, atol: float, rtol: float, what: str) -> None:
    if isinstance(expected, tuple):
        if not isinstance(got, tuple) or len(got) != len(expected):
            shown = f"a tuple of {len(got)}" if isinstance(got, tuple) else type(got).__name__
            raise CheckFailed(f"{attempt}: expected a tuple of {len(expected)} results, got {shown}. "
                              f"Hint: {attempt.hint}")
        names = attempt.spec.parts if what == "result" and len(attempt.spec.parts) == len(expected) else ()
        for i, (g, e) in enumerate(zip(got, expected)):
            part = names[i] if names else f"the {_ORDINALS[i] if i < len(_ORDINALS) else f'#{i + 1}'} of the {len(expected)} results"
            compare(g, e, attempt, None, atol, rtol, part if what == "result" else f"{part} in {_noun(what)}")
        return
    if not isinstance(got, dict) or list(got) != list(expected):
        if not isinstance(got, dict):
            shown = f"a {type(got).__name__}"
        elif set(got) == set(expected):
            shown = f"the same keys in another order, {list(got)}"
        else:
            shown = f"keys {list(got)}"
        raise CheckFailed(f"{attempt}: expected a dict with keys {list(expected)}, in this order; got {shown}. "
                          f"Hint: {attempt.hint}")
    for key in expected:
        compare(got[key], expected[key], attempt, None, atol, rtol,
                f"entry {key!r}" if what == "result" else f"entry {key!r} of {_noun(what)}")


def _noun(what: str) -> str:
    """'the result' for "result"; a part's name as it is ("entry 'x'", "the second of the 2 results")."""
    return "the result" if what == "result" else what


_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")


def matches(got: Any, wrong: Any, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    """True when `got` equals what a mistake gives, NaN where it has NaN (quietly False when they cannot be compared)."""
    if isinstance(got, Tensor) and isinstance(wrong, Tensor) and torch.isnan(wrong).any():
        return (got.shape == wrong.shape and got.dtype.is_floating_point
                and torch.allclose(got.detach().to(wrong.dtype), wrong, atol=atol, rtol=rtol, equal_nan=True))
    try:
        compare(got, wrong, _QUIET, None, atol=atol, rtol=rtol)
        return True
    except (CheckFailed, TypeError):
        return False


def diagnosis(got: Any, attempt: Attempt, inputs: tuple | None, atol: float, rtol: float) -> str:
    """"This looks like <mistake>: <advice>" for the exercise's first mistake `got` matches, else ""."""
    if inputs is None:
        return ""
    for mistake in attempt.spec.mistakes:
        try:
            with torch.no_grad():
                wrong = mistake.gives(*copies(inputs))
        except Exception:  # a mistake that cannot even run on these inputs is not the one made
            continue
        if matches(got, wrong, atol, rtol):
            return f"This looks like {mistake.looks_like}: {mistake.advice}"
    return ""


def fail(attempt: Attempt, problem: str, got: Any = None, inputs: tuple | None = None,
         atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Raise CheckFailed: the problem, then the named mistake if `got` matches one, else the hint."""
    named = diagnosis(got, attempt, inputs, atol, rtol)
    raise CheckFailed(f"{attempt}: {problem}. " + (named if named else f"Hint: {attempt.hint}"))


def passed(attempt: Attempt, detail: str = "") -> None:
    """The one line a passing check prints: "all checks passed.", and what it measured if it says."""
    print(f"✓ {attempt.spec.label}: all checks passed." + (f" {detail}" if detail else ""))


def compare_tensors(got: Any, expected: Tensor, attempt: Attempt, atol: float = 1e-5, rtol: float = 1e-4,
                    what: str = "result", inputs: tuple | None = None) -> None:
    """Raise CheckFailed unless `got` is a tensor matching `expected` in shape, dtype kind and values."""
    def wrong(problem: str) -> None:
        fail(attempt, problem, got, inputs, atol, rtol)

    what = _noun(what)

    if not isinstance(got, Tensor):
        wrong(f"expected {what} to be a torch.Tensor, got {type(got).__name__}")
    if type(got) not in (Tensor, torch.nn.Parameter):  # a subclass could answer every comparison as it likes
        raise CheckFailed(f"{attempt}: expected {what} to be a plain torch.Tensor, got a {type(got).__name__}. "
                          "Hint: return the result of torch operations, not a tensor subclass.")
    if tuple(got.shape) != tuple(expected.shape):
        wrong(f"expected {what} to have shape {tuple(expected.shape)}, got {tuple(got.shape)}")
    if (expected.dtype.is_floating_point != got.dtype.is_floating_point
            or (expected.dtype == torch.bool) != (got.dtype == torch.bool)):
        wrong(f"expected {what} to have dtype {expected.dtype}, got {got.dtype}")
    if got.dtype.is_floating_point and torch.isnan(got).any():
        wrong(f"{what} contains NaN ({int(torch.isnan(got).sum())} entries)")
    got_cmp, exp_cmp = got.detach().to(expected.dtype), expected.detach()
    if expected.dtype.is_floating_point:
        ok = torch.allclose(got_cmp, exp_cmp, atol=atol, rtol=rtol)
    else:
        ok = torch.equal(got_cmp, exp_cmp)
    if not ok:
        differ = ~torch.isclose(got_cmp.float(), exp_cmp.float(), atol=atol, rtol=rtol)
        idx = tuple(int(i) for i in differ.nonzero()[0])
        wrong(f"{'' if what == 'the result' else f'in {what}, '}{int(differ.sum())} of {differ.numel()} entries differ; at index {idx} "
              f"expected {exp_cmp[idx].item():.5g}, got {got_cmp[idx].item():.5g}")


def compare_float(got: Any, expected: float, attempt: Attempt, what: str, atol: float = 1e-4,
                  inputs: tuple | None = None) -> None:
    """Raise CheckFailed unless `got` is a finite number (or one-element tensor) within atol of `expected`."""
    original = got
    if isinstance(got, Tensor):
        raise CheckFailed(f"{attempt}: for {what} expected a Python float, got a tensor of shape {tuple(got.shape)}. "
                          "Hint: a one-element tensor becomes a number with .item(); the chapter prints and "
                          "compares it as one.")
    if isinstance(got, bool) or not isinstance(got, (float, int)):
        fail(attempt, f"expected a float, got {type(got).__name__}", original, inputs, atol, 0.0)
    got = float.__float__(got) if isinstance(got, float) else float(int.__int__(got))  # numpy floats, not subclass tricks
    if not math.isfinite(got) or abs(got - expected) > atol:
        fail(attempt, f"for {what} expected {expected:.4f}, got {got:.4f}", got, inputs, atol, 0.0)


def mistakes_catalogue() -> str:
    """The instructors' table of the mistakes each checker names, one row per exercise, from the specs."""
    rows = ["| exercise | kind | what the checker recognises and names |", "| --- | --- | --- |"]
    for spec in sorted(EXERCISES.values(), key=lambda s: tuple(map(int, s.number.split(".")))):
        if spec.mistakes:
            named = "; ".join(m.looks_like for m in spec.mistakes)
            rows.append(f"| {spec.number} {spec.title} | {spec.kind} | {named} |".replace("\n", " "))
    return "\n".join(rows) + "\n"


# matches() compares with a mistake's result: no exercise, no mistakes to name
_QUIET = Attempt(ExerciseSpec("0.0", "", "", (), lambda fn: None))
