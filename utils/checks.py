"""Exercise checkers: each compares the learner's function with the reference on fresh inputs.

Every checker is registered in ``EXERCISES`` (one ``ExerciseSpec`` per exercise): its number,
the learner's function it takes, and the functions in utils that compute the answer.

A failed check is a ``CheckFailed`` whose one-paragraph message says what was expected, what
came back, the likely mistake and a hint, never a traceback. Where it surfaces depends on who
runs the chapter:

- in a kernel a Jupyter server started (JupyterLab, Notebook, Binder: a learner working), the
  check prints its ✗ message and returns, so Run All reaches the end of the chapter; the
  chapter's later cells use the references in utils, never the learner's functions;
- everywhere else (nbval, nbclient, ``python -m utils.grade``, the tests, a script), it raises
  and its cell fails.

``CIRCUITS_STRICT_CHECKS=1`` forces the second behaviour, ``=0`` the first.

Checkers also guard the grading: a learner's function that calls its exercise's reference
fails, and a checker that finds itself, its comparison functions or the references replaced
(before it starts, or while the learner's function ran) fails the exercise and says so.
"""

from __future__ import annotations

import builtins
import functools
import math
import os
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from transformer_lens import FactoredMatrix

from utils import circuits, fourier, models, proofs, tasks, train
from utils.tasks import IGNORE

STRICT_ENV = "CIRCUITS_STRICT_CHECKS"
# every tampering message carries this phrase; the grader scores later exercises 0 after it
UNTRUSTED = "cannot be trusted"


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

    `gives` takes the exercise function's arguments and returns what the mistake computes; when
    a learner's result matches it (and not the answer), the message says "this looks like
    <looks_like>: <advice>". Neither names the solution's code.
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

    @property
    def label(self) -> str:
        return f"Exercise {self.number} ({self.function})"


EXERCISES: dict[str, ExerciseSpec] = {}
_STATE: dict[str, Any] = {"references": (), "namespace": {}, "caller": {}, "untrusted": None, "spec": None}


def exercise(number: str, title: str, *references: Callable, hint: str = "", mistakes: tuple[Mistake, ...] = (),
             cases: Callable[[], list[Case]] | None = None, atol: float = 1e-5, rtol: float = 1e-4,
             kind: str = "analysis", function: str | None = None) -> Callable:
    """Register the checker of exercise `number` and return it.

    Used as a decorator on ``check_<function>(fn, ex)`` (a body of its own; `ex` is the label),
    or, given `cases` and `function`, called directly: the checker then compares the learner's
    function with ``references[0]`` on every case, within `atol`/`rtol`, naming any of
    `mistakes` the result matches. Either way the checker verifies that nothing it relies on was
    replaced, raises or prints a failure as ``strict()`` says, and makes ``call_learner`` reject
    calls of `references` from the learner's function.
    """

    def register(body: Callable) -> Callable:
        spec_function = function or body.__name__.removeprefix("check_")
        label = f"Exercise {number} ({spec_function})"

        @functools.wraps(body)
        def check(fn: Callable) -> None:
            caller = sys._getframe(1).f_globals
            try:
                if _STATE["untrusted"]:
                    raise CheckFailed(f"{label}: {_STATE['untrusted']}")
                _STATE.update(references=references, namespace=caller, caller=_course_names(caller),
                              spec=EXERCISES[number])
                _verify_untouched(label, "before this check ran")
                body(fn, label)
            except CheckFailed as failure:
                if strict():
                    raise failure.with_traceback(None) from None
                print(f"\x1b[31m✗ {failure.args[0]}\x1b[0m")
                print("  (the chapter goes on without it: later cells use the course's own code; come back to this "
                      "exercise when you are ready)")

        check.__name__ = check.__qualname__ = f"check_{spec_function}"
        EXERCISES[number] = ExerciseSpec(number, title, spec_function, references, check, hint, tuple(mistakes),
                                         cases, atol, rtol, kind)
        return check

    if cases is not None:
        if function is None or not references:
            raise ValueError(f"exercise {number}: a checker built from cases needs function= and a reference")
        return register(_compare_on_cases)
    return register


def _copies(args: tuple) -> tuple:
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


def _compare_on_cases(fn: Callable, ex: str) -> None:
    """The checker of an exercise given by its cases: the learner's result against the reference on each."""
    spec = _STATE["spec"]
    for where, args in spec.cases():
        with torch.no_grad():
            expected = spec.references[0](*_copies(args))  # first: the learner may change its inputs
        got = call_learner(fn, ex, *_copies(args), hint=spec.hint)
        compare(got, expected, f"{ex} {where}".rstrip(), spec.hint, args, atol=spec.atol, rtol=spec.rtol)
    passed(ex)


def compare(got: Any, expected: Any, exercise: str, hint: str, inputs: tuple | None = None,
            atol: float = 1e-5, rtol: float = 1e-4, what: str = "result") -> None:
    """Compare a result of any kind the course's exercises return: tensor, number, tuple or dict of them."""
    if isinstance(expected, Tensor):
        compare_tensors(got, expected, exercise, hint, atol=atol, rtol=rtol, what=what, inputs=inputs)
    elif isinstance(expected, (float, int)) and not isinstance(expected, bool):
        compare_float(got, float(expected), exercise, hint, f"the {what}", atol=atol, inputs=inputs)
    elif isinstance(expected, (tuple, dict)):
        try:
            _compare_parts(got, expected, exercise, hint, atol, rtol, what)
        except CheckFailed as failure:
            named = diagnosis(got, inputs, atol, rtol)
            if not named:
                raise
            problem = failure.args[0].split(". Hint: ")[0]
            raise CheckFailed(f"{problem}. {named}") from None
    else:
        raise TypeError(f"compare: no rule for a {type(expected).__name__} result")


def _compare_parts(got: Any, expected: tuple | dict, exercise: str, hint: str, atol: float, rtol: float,
                   what: str) -> None:
    if isinstance(expected, tuple):
        if not isinstance(got, tuple) or len(got) != len(expected):
            shown = f"a tuple of {len(got)}" if isinstance(got, tuple) else type(got).__name__
            raise CheckFailed(f"{exercise}: expected a tuple of {len(expected)} results, got {shown}. Hint: {hint}")
        for i, (g, e) in enumerate(zip(got, expected)):
            compare(g, e, exercise, hint, None, atol, rtol, f"{what} {i}")
        return
    if not isinstance(got, dict) or list(got) != list(expected):
        shown = sorted(got) if isinstance(got, dict) else type(got).__name__
        raise CheckFailed(f"{exercise}: expected a dict with keys {list(expected)}, got {shown}. Hint: {hint}")
    for key in expected:
        compare(got[key], expected[key], exercise, hint, None, atol, rtol, f"entry {key!r}")


def _matches(got: Any, wrong: Any, atol: float, rtol: float) -> bool:
    """True when `got` equals what a mistake gives (quietly False when the two cannot be compared)."""
    try:
        compare(got, wrong, "", "", None, atol=atol, rtol=rtol)
        return True
    except (CheckFailed, TypeError):
        return False


def diagnosis(got: Any, inputs: tuple | None, atol: float, rtol: float) -> str:
    """"This looks like <mistake>: <advice>" for the current exercise's first mistake `got` matches, else ""."""
    spec = _STATE.get("spec")
    if spec is None or inputs is None:
        return ""
    for mistake in spec.mistakes:
        try:
            with torch.no_grad():
                wrong = mistake.gives(*_copies(inputs))
        except Exception:  # a mistake that cannot even run on these inputs is not the one made
            continue
        if _matches(got, wrong, atol, rtol):
            return f"This looks like {mistake.looks_like}: {mistake.advice}"
    return ""


def _fail(exercise: str, problem: str, hint: str, got: Any = None, inputs: tuple | None = None,
          atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Raise CheckFailed: the problem, then the named mistake if `got` matches one, else the hint."""
    named = diagnosis(got, inputs, atol, rtol)
    raise CheckFailed(f"{exercise}: {problem}. " + (named if named else f"Hint: {hint}"))


def passed(exercise: str) -> None:
    print(f"✓ {exercise}: all checks passed.")


def mistakes_catalogue() -> str:
    """The instructors' table of the mistakes each checker names, one row per exercise, from the specs."""
    rows = ["| exercise | kind | what the checker recognises and names |", "| --- | --- | --- |"]
    for spec in sorted(EXERCISES.values(), key=lambda s: tuple(map(int, s.number.split(".")))):
        if spec.mistakes:
            named = "; ".join(m.looks_like for m in spec.mistakes)
            rows.append(f"| {spec.number} {spec.title} | {spec.kind} | {named} |".replace("\n", " "))
    return "\n".join(rows) + "\n"


# ------------------------------------------------------------------ guarding the checks
def _course_names(namespace: dict) -> dict[str, Any]:
    """The names in a notebook's namespace bound to the course's modules or checkers."""
    ours = set(map(id, _GUARDED_MODULES)) | {id(spec.check) for spec in EXERCISES.values()}
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
    found: dict[str, Any] = {}
    for module in _GUARDED_MODULES:
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


def _verify_untouched(exercise: str, when: str, also_changed: tuple[str, ...] = ()) -> None:
    """Raise CheckFailed naming what was replaced since the course's code was imported.

    Besides the course's modules and torch's functions, it compares the notebook's own names
    for the course's modules and checkers (``checks`` in ``checks.check_...``) with what they
    were bound to when this check started.
    """
    now = _guarded_objects()
    changed = [name for name, value in _ORIGINALS.items() if now.get(name, _MISSING) is not value
               and not (isinstance(value, tuple) and now.get(name) == value)]
    namespace = _STATE["namespace"]
    changed += [f"the notebook's {name!r}" for name, value in _STATE["caller"].items()
                if namespace.get(name, _MISSING) is not value]
    changed += also_changed
    changed = list(dict.fromkeys(name.split(".__")[0] for name in changed))  # f, not f and f.__code__
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        _STATE["untrusted"] = (f"the course's code was changed {when} ({shown}), so the checks in this kernel "
                               f"{UNTRUSTED}. Restart the kernel and run the chapter again without changing the "
                               "course's code.")
        raise CheckFailed(f"{exercise}: {_STATE['untrusted']}")


def call_learner(fn: Callable, exercise: str, *args: Any, hint: str = "", **kwargs: Any) -> Any:
    """Call the learner's function, turning 'not implemented', crashes and calls of the answer into CheckFailed.

    While the function runs, a profiler notes every call of the exercise's references (unless
    `fn` is one of them: the course's tests pass the references themselves); afterwards the
    course's code is verified untouched.
    """
    watched = {ref.__code__: f"{ref.__module__.removeprefix('utils.')}.{ref.__qualname__}"
               for ref in _STATE["references"]}
    if getattr(fn, "__code__", None) in watched:
        watched = {}
    called: list[str] = []

    def note_reference_calls(frame, event, arg):
        if event == "call" and frame.f_code in watched:
            called.append(watched[frame.f_code])

    previous = sys.getprofile()
    sys.setprofile(note_reference_calls)
    try:
        result = fn(*args, **kwargs)
    except NotImplementedError:
        raise CheckFailed(f"{exercise}: not implemented yet. Fill in the function in the cell above, "
                          f"run that cell, then run this check again.") from None
    except CheckFailed:
        raise
    except Exception as err:  # the learner's code crashed: say where, briefly
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise CheckFailed(f"{exercise}: your function raised {type(err).__name__}: {first_line}"
                          + (f" Hint: {hint}" if hint else "")) from None
    finally:
        watch_kept = sys.getprofile() is note_reference_calls
        sys.setprofile(previous)
        _verify_untouched(exercise, "while your function ran", () if watch_kept else ("the reference watch",))
    if called:
        raise CheckFailed(f"{exercise}: your function calls {called[0]}, the course's own answer to this exercise, "
                          "so the check learns nothing about your code. Hint: write the computation yourself; the "
                          "exercise's hint lists the pieces.")
    return result


def compare_tensors(got: Any, expected: Tensor, exercise: str, hint: str, atol: float = 1e-5, rtol: float = 1e-4,
                    what: str = "result", inputs: tuple | None = None) -> None:
    """Raise CheckFailed unless `got` is a tensor matching `expected` in shape, dtype kind and values.

    Given the `inputs` the learner's function was called with, a wrong result that matches one of
    the current exercise's mistakes is named in the message.
    """
    def fail(problem: str) -> None:
        _fail(exercise, problem, hint, got, inputs, atol, rtol)

    if not isinstance(got, Tensor):
        fail(f"expected the {what} to be a torch.Tensor, got {type(got).__name__}")
    if type(got) not in (Tensor, torch.nn.Parameter):  # a subclass could answer every comparison as it likes
        raise CheckFailed(f"{exercise}: expected the {what} to be a plain torch.Tensor, got a {type(got).__name__}. "
                          "Hint: return the result of torch operations, not a tensor subclass.")
    if tuple(got.shape) != tuple(expected.shape):
        fail(f"expected the {what} to have shape {tuple(expected.shape)}, got {tuple(got.shape)}")
    if expected.dtype.is_floating_point != got.dtype.is_floating_point or (expected.dtype == torch.bool) != (got.dtype == torch.bool):
        fail(f"expected the {what} to have dtype {expected.dtype}, got {got.dtype}")
    if got.dtype.is_floating_point and torch.isnan(got).any():
        fail(f"the {what} contains NaN ({int(torch.isnan(got).sum())} entries)")
    got_cmp, exp_cmp = got.detach().to(expected.dtype), expected.detach()
    if expected.dtype.is_floating_point:
        ok = torch.allclose(got_cmp, exp_cmp, atol=atol, rtol=rtol)
    else:
        ok = torch.equal(got_cmp, exp_cmp)
    if not ok:
        wrong = ~torch.isclose(got_cmp.float(), exp_cmp.float(), atol=atol, rtol=rtol)
        idx = tuple(int(i) for i in wrong.nonzero()[0])
        fail(f"{int(wrong.sum())} of {wrong.numel()} entries differ; at index {idx} "
             f"expected {exp_cmp[idx].item():.5g}, got {got_cmp[idx].item():.5g}")


def compare_float(got: Any, expected: float, exercise: str, hint: str, what: str, atol: float = 1e-4,
                  inputs: tuple | None = None) -> None:
    """Raise CheckFailed unless `got` is a finite number (or one-element tensor) within atol of `expected`."""
    original = got
    if type(got) in (Tensor, torch.nn.Parameter) and got.numel() == 1:
        got = got.item()
    if isinstance(got, bool) or not isinstance(got, (float, int)):
        _fail(exercise, f"expected a float, got {type(got).__name__}", hint, original, inputs, atol, 0.0)
    got = float.__float__(got) if isinstance(got, float) else float(int.__int__(got))  # numpy floats, not subclass tricks
    if not math.isfinite(got) or abs(got - expected) > atol:
        _fail(exercise, f"for {what} expected {expected:.4f}, got {got:.4f}", hint, got, inputs, atol, 0.0)


def _random_models() -> list:
    """Freshly initialised max_of_list (attention only) and addition (with MLP) models with non-zero biases."""
    out = []
    for name in ("max_of_list", "addition"):
        seed = int(torch.randint(0, 10_000, ()))
        state = models.build_model(name, seed=seed).state_dict()
        for key in state:
            if key.endswith("bias") and key != "unembed.bias":
                state[key] = 0.1 * torch.randn_like(state[key])
        out.append((name, models.model_from_state(dict(models.spec(name).config, seed=seed), state)))
    return out


def _fresh_model(name: str):
    """A freshly initialised model for task `name` with a random seed (biases zero)."""
    return models.build_model(name, seed=int(torch.randint(0, 10_000, ())))


def _noised(model, config: dict, scale: float = 0.05):
    """A copy of `model` with Gaussian noise (`scale` times each weight's std) added to every weight."""
    state = {key: w + scale * (w.std() if w.numel() > 1 else 1.0) * torch.randn_like(w)
             for key, w in model.state_dict().items()}
    return models.model_from_state(config, state)


def _noisy_max_of_list(scale: float = 0.1):
    """The shipped max_of_list checkpoint with noise (`scale` times each weight's spread) on every weight."""
    return _noised(models.load_model("max_of_list"), dict(models.spec("max_of_list").config), scale)


def _random_causal_pattern(batch: int, heads: int, n: int) -> Tensor:
    """A random attention pattern [batch, head, query, key]: rows sum to 1, no weight on later keys."""
    future = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    return torch.randn(batch, heads, n, n).masked_fill(future, -torch.inf).softmax(-1)


# ------------------------------------------------------------------ chapter 00: tour
def _component_sum(model, cache, pos_embed: bool = True, mlp: bool = True, layers: int | None = None) -> Tensor:
    resid = cache["hook_embed"] + (cache["hook_pos_embed"] if pos_embed else 0)
    for layer in range(model.cfg.n_layers if layers is None else layers):
        resid = resid + cache[f"blocks.{layer}.hook_attn_out"]
        if mlp and not model.cfg.attn_only:
            resid = resid + cache[f"blocks.{layer}.hook_mlp_out"]
    return resid


def _cached_runs() -> list[Case]:
    """A fresh attention-only model and a fresh model with an MLP (non-zero biases), each with a cache of random tokens."""
    out = []
    for name, model in _random_models():
        _, cache = model.run_with_cache(torch.randint(0, model.cfg.d_vocab, (4, model.cfg.n_ctx)))
        out.append((f"on a fresh {name} model", (model, cache)))
    return out


check_residual_from_components = exercise(
    "0.1", "the residual stream is a sum", circuits.residual_from_components, function="residual_from_components",
    kind="analysis", cases=_cached_runs, atol=1e-4,
    hint="the stream starts as the token embedding plus the positional embedding, and every attention layer and "
         "every MLP adds its output to it; nothing else touches it.",
    mistakes=(
        Mistake("the sum without the positional embedding",
                "the stream starts as the token embedding plus the positional embedding of its position.",
                lambda model, cache: _component_sum(model, cache, pos_embed=False)),
        Mistake("the sum without the MLP outputs",
                "in a model with MLPs, each MLP adds its output to the stream too (the check uses the addition model).",
                lambda model, cache: _component_sum(model, cache, mlp=False)),
        Mistake("the stream before the last layer (resid_pre)",
                "the last layer's outputs belong in the final stream as well.",
                lambda model, cache: _component_sum(model, cache, layers=model.cfg.n_layers - 1)),
    ))


def _scaled_scores(q: Tensor, k: Tensor, scale: bool = True) -> Tensor:
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k)
    return scores / math.sqrt(q.shape[-1]) if scale else scores


def _masked(scores: Tensor) -> Tensor:
    n = scores.shape[-1]
    return scores.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), -torch.inf)


def _queries_and_keys() -> list[Case]:
    return [(f"on random q, k of shape {shape}", (torch.randn(*shape), torch.randn(*shape)))
            for shape in [(3, 6, 1, 32), (2, 5, 3, 8)]]


check_attention_pattern = exercise(
    "0.2", "an attention pattern from queries and keys", circuits.attention_pattern, function="attention_pattern",
    kind="implementation", cases=_queries_and_keys, atol=1e-5,
    hint="score every (query, key) pair by a dot product over d_head, scale it, hide the keys after the query, "
         "and normalise each query's row over the keys.",
    mistakes=(
        Mistake("the scores without the 1/sqrt(d_head) scale",
                "the head divides every query-key dot product by the square root of d_head before the softmax.",
                lambda q, k: _masked(_scaled_scores(q, k, scale=False)).softmax(-1)),
        Mistake("a pattern without the causal mask",
                "a query may not look at keys after it: those must get weight exactly 0.",
                lambda q, k: _scaled_scores(q, k).softmax(-1)),
        Mistake("a softmax over the query axis",
                "each query's weights over the keys must sum to 1, so normalise along the key axis.",
                lambda q, k: _masked(_scaled_scores(q, k)).softmax(-2)),
    ))


def _max_of_list_runs(two_layers: bool = False) -> list[Case]:
    """The shipped max_of_list model with noise on its weights (and, with `two_layers`, a two-layer model whose
    blocks are both noisy copies of the trained one), each with 2,000 fresh random lists."""
    trained, config = models.load_model("max_of_list"), models.spec("max_of_list").config
    noised = _noised(trained, config)
    lists = torch.randint(0, trained.cfg.d_vocab, (2000, trained.cfg.n_ctx))
    cases = [("on the shipped max_of_list model with noise on its weights", (noised, lists))]
    if two_layers:
        state = dict(noised.state_dict())
        state.update({key.replace("blocks.0.", "blocks.1."): w + 0.02 * torch.randn_like(w)
                      for key, w in trained.state_dict().items() if key.startswith("blocks.0.")})
        deeper = models.model_from_state(dict(config, n_layers=2), state)
        cases.append(("on a two-layer model made of two noisy copies of the trained block", (deeper, lists)))
    return cases


def _last_row(model, lists: Tensor) -> Tensor:
    _, cache = model.run_with_cache(lists, names_filter="blocks.0.attn.hook_pattern")
    return cache["blocks.0.attn.hook_pattern"][:, 0, -1, :]


def _share(hits: Tensor) -> float:
    return hits.float().mean().item()


check_fraction_attending_to_max = exercise(
    "0.3", "how often does the head attend to the maximum?", circuits.fraction_attending_to_max,
    function="fraction_attending_to_max", kind="analysis", cases=lambda: _max_of_list_runs(), atol=1e-6,
    hint="read the last query's row of the pattern from a cache, find the key position it weights most, and ask "
         "whether the token sitting there equals the list's maximum; return the share of lists as a float.",
    mistakes=(
        Mistake("the argmax over the query axis",
                "a row of the pattern is one query; its entries are the keys it looks at, so pick among the keys.",
                lambda model, lists: _share(lists[:, -1] == lists.max(-1).values)),
        Mistake("the attended position compared with the maximum",
                "the argmax gives a position; the question is about the token at that position.",
                lambda model, lists: _share(_last_row(model, lists).argmax(-1) == lists.max(-1).values)),
        Mistake("the first position's row instead of the last",
                "the first position sees only itself; the last one sees the whole list.",
                lambda model, lists: _share(lists[:, 0] == lists.max(-1).values)),
    ))


def _accuracy_with_pattern(model, lists: Tensor, hook: Callable, last_only: bool = True) -> float:
    logits = model.run_with_hooks(lists, fwd_hooks=[("blocks.0.attn.hook_pattern", hook)])
    if last_only:
        return _share(logits[:, -1].argmax(-1) == lists.max(-1).values)
    return _share(logits[:, 1:].argmax(-1) == lists.cummax(-1).values[:, 1:])


def _visible_uniform(pattern: Tensor, hook=None) -> Tensor:
    n = pattern.shape[-1]
    weights = torch.ones(n, n).tril()
    return (weights / weights.sum(-1, keepdim=True)).expand_as(pattern)


check_uniform_attention_accuracy = exercise(
    "0.4", "ablate the attention pattern", circuits.uniform_attention_accuracy, circuits.uniform_causal_pattern,
    function="uniform_attention_accuracy", kind="analysis", cases=lambda: _max_of_list_runs(two_layers=True),
    atol=1e-6,
    hint="hook layer 0's attention pattern and return a replacement in which every query weighs the positions it "
         "can see equally; then score the last position's prediction against each list's maximum.",
    mistakes=(
        Mistake("uniform attention over all positions, future ones included",
                "a query may only see keys at or before it: the future ones must keep weight 0 (in a one-layer "
                "model only the earlier rows change, which the second model of the check reads).",
                lambda model, lists: _accuracy_with_pattern(model, lists, lambda p, hook: torch.full_like(p, 1 / p.shape[-1]))),
        Mistake("the accuracy over every position instead of the last",
                "the question is the last position, which has seen the whole list.",
                lambda model, lists: _accuracy_with_pattern(model, lists, _visible_uniform, last_only=False)),
        Mistake("a hook that does not return the new pattern",
                "the forward pass uses what the hook returns; a hook that returns nothing leaves the pattern as it was.",
                lambda model, lists: _accuracy_with_pattern(model, lists, lambda p, hook: None)),
    ))


def _rotated(state: dict, R: Tensor, first: Callable = lambda w, R: R.T @ w, skip: tuple[str, ...] = ()) -> dict:
    out = {}
    for key, w in state.items():
        if key in skip or key.endswith(tuple("." + s for s in skip)):
            out[key] = w.clone()
        elif key.endswith(models._D_MODEL_FIRST):
            out[key] = first(w, R)
        elif key.endswith(models._D_MODEL_LAST) or key.endswith(models._STREAM_BIASES):
            out[key] = w @ R
        else:
            out[key] = w.clone()
    return out


_ROTATE_MISTAKES = (
    Mistake("R where R.T belongs on the weights whose first axis is d_model",
            "those weights write x into the stream, and the stream's new coordinates are x times R, so they need the "
            "transpose that undoes it on their other side.",
            lambda state, R: _rotated(state, R, first=lambda w, R: R @ w)),
    Mistake("the stream biases left unrotated",
            "attn.o.bias and mlp.out.bias are added to the stream, so they are residual vectors and rotate like one.",
            lambda state, R: _rotated(state, R, skip=models._STREAM_BIASES)),
    Mistake("the embeddings left unrotated",
            "the embeddings write the stream's first vector (they are not readers), and that vector must come out "
            "rotated too.",
            lambda state, R: _rotated(state, R, skip=("embed.weight", "pos_embed.weight"))),
)


@exercise("0.5", "rotate the residual stream", models.rotate_residual_stream, kind="implementation",
          hint="every weight whose last axis is d_model is multiplied by R on that side, every weight whose first "
               "axis is d_model by R.T on that side, the stream biases rotate like residual vectors, the rest is "
               "copied.", mistakes=_ROTATE_MISTAKES)
def check_rotate_residual_stream(fn: Callable, ex: str) -> None:
    for name, model in _random_models():
        state = {k: v.clone() for k, v in model.state_dict().items()}
        R = torch.linalg.qr(torch.randn(model.cfg.d_model, model.cfg.d_model))[0]
        got = call_learner(fn, ex, {k: v.clone() for k, v in state.items()}, R,
                           hint="loop over state.items() and build a new dict; use W @ R, R.T @ W or b @ R.")
        if not isinstance(got, dict) or set(got) != set(state):
            got_keys = sorted(got) if isinstance(got, dict) else type(got).__name__
            raise CheckFailed(f"{ex}: expected a dict with the same keys as the state dict ({len(state)} keys), "
                              f"got {got_keys}. Hint: return a new entry for every key, rotated or copied.")
        expected = models.rotate_residual_stream(state, R)
        for key in state:
            if key.endswith(models._D_MODEL_FIRST):
                hint = f"{key} writes to the stream (d_model is its first axis): use R.T @ W."
            elif key.endswith(models._STREAM_BIASES):
                hint = f"{key} is added to the stream, so it rotates like a residual vector: b @ R."
            elif key.endswith(models._D_MODEL_LAST):
                hint = f"{key} has d_model as its last axis: use W @ R."
            else:
                hint = f"{key} does not touch the residual stream: copy it unchanged."
            if _matches(got[key], expected[key], 1e-5, 1e-4):
                continue
            named = diagnosis({k: got[k] for k in state}, (state, R), 1e-5, 1e-4)
            if named:
                raise CheckFailed(f"{ex} on the {name} model: entry {key!r} is not what the rotation gives. {named}")
            compare_tensors(got[key], expected[key], f"{ex} on the {name} model", hint, atol=1e-5, what=f"entry {key!r}")
    passed(ex)


# ------------------------------------------------------------------ chapter 01: training
def _max_of_list_token_cases() -> list[Case]:
    """Random lists of lengths 2, 4 and 6, 16 of each."""
    return [(f"on lists of length {n}", (torch.randint(0, tasks.MAX_OF_LIST_VOCAB, (16, n)),)) for n in (2, 4, 6)]


def _running_max_before(tokens: Tensor) -> Tensor:
    targets = torch.full_like(tokens, IGNORE)
    targets[:, 1:] = tokens.cummax(-1).values[:, :-1]
    return targets


def _whole_list_max(tokens: Tensor) -> Tensor:
    targets = tokens.max(-1, keepdim=True).values.expand_as(tokens).clone()
    targets[:, 0] = IGNORE
    return targets


check_max_of_list_targets = exercise(
    "1.1", "running maximum targets", tasks.max_of_list_targets, function="max_of_list_targets",
    kind="implementation", cases=_max_of_list_token_cases,
    hint="the target at position i is the largest token among positions 0..i (a running maximum, which torch "
         "computes in one call), and position 0 has no target: it gets IGNORE (-1).",
    mistakes=(
        Mistake("the maximum of the whole list at every position",
                "position i only sees tokens 0..i (attention is causal), so its target is the maximum so far.",
                _whole_list_max),
        Mistake("the maximum of the tokens before position i, without token i itself",
                "the list at position i is tokens[0..i], the token at i included.", _running_max_before),
        Mistake("a target at position 0",
                "a list of one token is not a task; position 0 gets IGNORE.", lambda tokens: tokens.cummax(-1).values),
    ))


def _fibonacci_check_inputs(max_value: int, length: int) -> Tensor:
    """Fibonacci inputs for checking, [n, length]: targets equal to max_value, rows that end early, random rows.

    Padding is random tokens, not FIBONACCI_PAD, so a function that reads the padding shows it.
    """
    tokens, targets = tasks.fibonacci_sequences(length, max_value)
    valid = tasks.fibonacci_valid_positions(tokens)
    tokens = torch.where(valid, tokens, torch.randint(0, max_value + 1, tokens.shape))
    edge = (targets == max_value).any(-1)
    short = ~valid.all(-1)
    pick = [torch.nonzero(rows).squeeze(-1) for rows in (edge, short, torch.ones_like(edge))]
    chosen = torch.cat([p[torch.randperm(len(p))[:n]] for p, n in zip(pick, (4, 20, 40)) if len(p)])
    return tokens[chosen]


def _fibonacci_next_and_in_sequence(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(x[i-1] + x[i] at every position i >= 1, 0 at position 0; whether position i is still in the sequence)."""
    nxt = torch.zeros_like(tokens)
    nxt[:, 1:] = tokens[:, :-1] + tokens[:, 1:]
    rule = torch.ones_like(tokens, dtype=torch.bool)
    rule[:, 2:] = tokens[:, 2:] == tokens[:, :-2] + tokens[:, 1:-1]
    return nxt, rule.long().cumprod(1).bool()


def _fib_mistake(tokens: Tensor, max_value: int, bound: bool = True, padding: bool = False,
                 position_0: bool = False) -> Tensor:
    nxt, in_sequence = _fibonacci_next_and_in_sequence(tokens)
    keep = (in_sequence | padding) & ((nxt <= max_value) | (not bound))
    targets = torch.where(keep, nxt, IGNORE)
    if not position_0:
        targets[:, 0] = IGNORE
    return targets


@exercise("1.2", "Fibonacci targets, for sequences of any length", tasks.fibonacci_targets,
          tasks.fibonacci_valid_positions, kind="implementation",
          hint="the target at position i >= 1 is the sum of the tokens at i - 1 and i. It is IGNORE at position 0, "
               "where that sum exceeds max_value, and on padding: every position from the first one that breaks "
               "the Fibonacci rule onwards.",
          mistakes=(
              Mistake("targets on the padding after the sequence ends",
                      "once a token is not the sum of the two before it, that position and every later one are "
                      "padding and get IGNORE, whatever their tokens sum to.",
                      lambda tokens, max_value: _fib_mistake(tokens, max_value, padding=True)),
              Mistake("targets above max_value",
                      "a next element above max_value is not a token the model could output: it gets IGNORE.",
                      lambda tokens, max_value: _fib_mistake(tokens, max_value, bound=False)),
              Mistake("a target at position 0",
                      "position 0 has seen one number, not two, so there is nothing to add: it gets IGNORE.",
                      lambda tokens, max_value: _fib_mistake(tokens, max_value, position_0=True)),
          ))
def check_fibonacci_targets(fn: Callable, ex: str) -> None:
    hint = EXERCISES["1.2"].hint
    top, n = tasks.ADDITION_MAX, tasks.FIBONACCI_LENGTH
    for max_value, length in ((top, n), (int(torch.randint(20, 60, ())), n), (top, 3), (top, 2)):
        tokens = _fibonacci_check_inputs(max_value, length)
        where = f"{ex} with max_value={max_value} on sequences of {length} tokens"
        got = call_learner(fn, ex, tokens.clone(), max_value, hint=hint)
        expected = tasks.fibonacci_targets(tokens, max_value)
        compare_tensors(got, expected, where, hint, inputs=(tokens, max_value))
    passed(ex)


def _cross_entropy(logits: Tensor, targets: Tensor, every_position: bool = False) -> Tensor:
    per_position = F.cross_entropy(logits.flatten(0, 1), targets.flatten().clamp(min=0), reduction="none")
    keep = (targets.flatten() != IGNORE).float()
    return (per_position * keep).mean() if every_position else (per_position * keep).sum() / keep.sum()


def _step_piling_up_gradients(model, optimizer, tokens: Tensor, targets: Tensor) -> float:
    loss = _cross_entropy(model(tokens), targets)
    loss.backward()
    optimizer.step()
    return loss.item()


def _step_mean_over_every_position(model, optimizer, tokens: Tensor, targets: Tensor) -> float:
    optimizer.zero_grad()
    loss = _cross_entropy(model(tokens), targets, every_position=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def _step_loss_after_update(model, optimizer, tokens: Tensor, targets: Tensor) -> float:
    optimizer.zero_grad()
    _cross_entropy(model(tokens), targets).backward()
    optimizer.step()
    with torch.no_grad():
        return _cross_entropy(model(tokens), targets).item()


def _train_steps(step: Callable, seed: int, batches: list, learner: str = "") -> tuple[list, list[Tensor]]:
    """Run `step` on a fresh max_of_list model of `seed` over `batches`; (what each step returned, final weights)."""
    model = models.build_model("max_of_list", seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    returned = []
    for tokens, targets in batches:
        args = (model, optimizer, tokens.clone(), targets.clone())
        returned.append(call_learner(step, learner, *args, hint=EXERCISES["1.3"].hint) if learner else step(*args))
    return returned, [p.detach().clone() for p in params]


def _same_run(a: tuple[list, list[Tensor]], b: tuple[list, list[Tensor]]) -> bool:
    try:
        return (all(abs(float(torch.as_tensor(x).detach()) - float(y)) < 1e-4 for x, y in zip(a[0], b[0]))
                and all(torch.allclose(p, q, atol=1e-5) for p, q in zip(a[1], b[1])))
    except (TypeError, ValueError, RuntimeError):
        return False


@exercise("1.3", "one training step", train.train_step, train.loss_fn, kind="implementation",
          hint="compute the logits, then the cross-entropy averaged over the positions that have a target (F.cross_"
               "entropy skips a label you name with ignore_index); clear the gradients of the last step, "
               "backpropagate, let the optimizer update, and return the loss as a Python number.",
          mistakes=(
              Mistake("gradients that pile up across steps",
                      "backward adds to the gradients already stored, so each step must clear them first.",
                      _step_piling_up_gradients),
              Mistake("a mean over every position, IGNORE included",
                      "positions without a target must not count, neither in the sum nor in the number you divide by.",
                      _step_mean_over_every_position),
              Mistake("the loss measured after the update",
                      "return the loss the gradient came from, computed before the optimizer changed the weights.",
                      _step_loss_after_update),
          ))
def check_train_step(fn: Callable, ex: str) -> None:
    seed = int(torch.randint(0, 10_000, ()))
    batches = []
    for _ in range(3):
        tokens, targets = tasks.max_of_list_batch(32)
        targets[torch.rand(targets.shape) < 0.2] = IGNORE  # more positions without a target than position 0
        batches.append((tokens, targets))
    expected = _train_steps(train.train_step, seed, batches)
    got = _train_steps(fn, seed, batches, learner=ex)
    named = next((m for m in EXERCISES["1.3"].mistakes if _same_run(got, _train_steps(m.gives, seed, batches))), None)
    if named and not _same_run(got, expected):
        raise CheckFailed(f"{ex}: your steps do not train the model as the reference does. "
                          f"This looks like {named.looks_like}: {named.advice}")
    hint = EXERCISES["1.3"].hint
    for step, (loss, expected_loss) in enumerate(zip(got[0], expected[0])):
        if isinstance(loss, Tensor):
            raise CheckFailed(f"{ex}: expected the loss as a Python float, got a Tensor. Hint: return the loss's value "
                              "as a Python number (a tensor keeps the whole graph alive).")
        if not isinstance(loss, float):
            raise CheckFailed(f"{ex}: expected the loss as a Python float, got {type(loss).__name__}. Hint: {hint}")
        if not math.isfinite(loss) or abs(loss - expected_loss) > 1e-4:
            raise CheckFailed(f"{ex}: at step {step + 1} expected loss {expected_loss:.5f}, got {loss:.5f}. Hint: {hint}")
    for p, q in zip(got[1], expected[1]):
        if not torch.allclose(p, q, atol=1e-5):
            raise CheckFailed(f"{ex}: after {len(batches)} steps the weights differ from the reference. Hint: {hint}")
    passed(ex)


def _loss_curve_cases() -> list[Case]:
    """Noisy decaying loss curves that cross the threshold and bounce back, some losses exactly at it."""
    cases = []
    for threshold, end in ((0.01, 1e-3), (0.05, 1e-3), (0.01, 0.02)):
        n = int(torch.randint(200, 400, ()))
        log_loss = torch.linspace(math.log(3.0), math.log(end), n) + 0.7 * torch.randn(n)
        losses = log_loss.exp().tolist()
        below = [loss < threshold for loss in losses]
        if True in below:
            first = below.index(True)
            if first > 0:
                losses[first - 1] = threshold  # not below: a learner who writes <= finds it one step early
            last_above = max(i for i, b in enumerate(below) if not b)
            if last_above > first:
                losses[last_above] = threshold
        cases.append((f"on a loss curve of {n} steps with threshold {threshold}", (losses, threshold)))
    return cases


def _steps_below_mistake(losses: list[float], threshold: float, strict: bool = True, shift: int = 0,
                         settled: bool = True) -> tuple[int, int]:
    below = [(loss < threshold) if strict else (loss <= threshold) for loss in losses]
    first = below.index(True) + shift if True in below else -1
    if not settled:
        return first, first
    stay = len(below)
    while stay > 0 and below[stay - 1]:
        stay -= 1
    return first, (stay + shift if stay < len(below) else -1)


check_steps_below = exercise(
    "1.4", "how many steps until the loss is small?", train.steps_below, function="steps_below",
    kind="analysis", cases=_loss_curve_cases,
    hint="walk the list of losses, whose first entry is step 0; a loss counts as below the threshold only when it "
         "is strictly smaller; the step from which it stays below is the one after the last loss that is not "
         "below; return -1 for a curve that never gets (or never stays) there.",
    mistakes=(
        Mistake("steps counted from 1",
                "the first loss in the list is the loss of step 0.",
                lambda losses, threshold: _steps_below_mistake(losses, threshold, shift=1)),
        Mistake("'at or below' instead of 'below'",
                "a loss exactly equal to the threshold is not below it.",
                lambda losses, threshold: _steps_below_mistake(losses, threshold, strict=False)),
        Mistake("the first step below, given for both",
                "a noisy loss curve dips below the threshold and comes back up; the second figure is the step "
                "after which it never comes back.",
                lambda losses, threshold: _steps_below_mistake(losses, threshold, settled=False)),
    ))


def _two_model_cases() -> list[Case]:
    shipped, noisy = models.load_model("max_of_list"), _noisy_max_of_list(0.4)
    fresh = _fresh_model("max_of_list")
    return [("on the shipped max_of_list model and a copy with noise in its weights",
             (shipped, noisy, torch.randint(0, tasks.MAX_OF_LIST_VOCAB, (2000, 6)))),
            ("on the noisy copy and a freshly initialised model, every list of length 2",
             (noisy, fresh, tasks.all_lists(2)))]


check_agreement_by_position = exercise(
    "1.5", "do two models compute the same function?", models.agreement_by_position,
    function="agreement_by_position", kind="analysis", cases=_two_model_cases,
    hint="take each model's predicted token (the largest logit) at every position of every list, compare the two "
         "models' predictions, and average over the lists, keeping one figure per position.",
    mistakes=(
        Mistake("the first model's accuracy against the running maximum",
                "the question is whether the two models agree with each other, right or wrong, not whether one of "
                "them is right.",
                lambda a, b, tokens: (a(tokens).argmax(-1) == tokens.cummax(-1).values).float().mean(0)),
        Mistake("a mean over the positions instead of over the lists",
                "one figure per position: average over the batch axis (the lists), not the position axis.",
                lambda a, b, tokens: (a(tokens).argmax(-1) == b(tokens).argmax(-1)).float().mean(1)),
        Mistake("the agreement at the last position only",
                "return a figure for every position; the last one is only the longest list.",
                lambda a, b, tokens: (a(tokens).argmax(-1) == b(tokens).argmax(-1)).float().mean(0)[-1]),
    ))


def _sum_prediction_cases() -> list[Case]:
    """Every pair of a max_sum in a random order, and predictions right with a probability that depends on the pair."""
    cases = []
    for max_sum in (tasks.ADDITION_MAX, int(torch.randint(8, 30, ()))):
        tokens, _ = tasks.addition_pairs(max_sum)
        tokens = tokens[torch.randperm(len(tokens))]
        sums = tokens.sum(-1)
        p_right = torch.rand(max_sum + 1)[sums] * torch.rand(max_sum + 1)[tokens[:, 0]]
        wrong = (sums + torch.randint(1, max_sum + 1, sums.shape)) % (max_sum + 1)
        predicted = torch.where(torch.rand(len(sums)) < p_right, sums, wrong)
        cases.append((f"on the {len(tokens):,} pairs with a + b <= {max_sum} and random predictions",
                      (predicted, tokens, max_sum)))
    return cases


def _per_group(right: Tensor, groups: Tensor, n: int, share: bool = True, total: int = 0) -> Tensor:
    counts = torch.zeros(n).index_add_(0, groups, right.float())
    return counts / (total or 1) if not share else counts / torch.bincount(groups, minlength=n)


check_accuracy_by_sum = exercise(
    "1.6", "which sums does the model learn first?", models.accuracy_by_sum, function="accuracy_by_sum",
    kind="analysis", cases=_sum_prediction_cases,
    hint="a pair is right when the prediction equals a + b; group the pairs by their sum (0..max_sum), and for "
         "each sum divide the number of right pairs by the number of pairs with that sum.",
    mistakes=(
        Mistake("the accuracy per first operand a, not per sum",
                "the groups are the values of a + b, the answer the model has to output.",
                lambda predicted, tokens, max_sum: _per_group(predicted == tokens.sum(-1), tokens[:, 0], max_sum + 1)),
        Mistake("the number of right pairs per sum, not the share",
                "sum s has s + 1 pairs, so counts favour large sums: divide by each sum's number of pairs.",
                lambda predicted, tokens, max_sum: _per_group(predicted == tokens.sum(-1), tokens.sum(-1),
                                                              max_sum + 1, share=False)),
        Mistake("each sum's right pairs as a share of all pairs",
                "divide by the number of pairs with that sum, not by every pair.",
                lambda predicted, tokens, max_sum: _per_group(predicted == tokens.sum(-1), tokens.sum(-1),
                                                              max_sum + 1, share=False, total=len(tokens))),
    ))


# ------------------------------------------------------------------ chapter 02: zero-layer models
def _bigram_model() -> list[Case]:
    """A freshly initialised bigram model with a non-zero unembedding bias."""
    model = _fresh_model("bigram")
    with torch.no_grad():
        model.b_U.copy_(0.5 * torch.randn_like(model.b_U))
    return [("on a freshly initialised bigram model", (model,))]


check_bigram_log_table = exercise(
    "2.1", "the model's transition table", models.bigram_table, function="bigram_log_table",
    kind="implementation", cases=_bigram_model, atol=1e-4,
    hint="with no layers the logits at a position come from that position's token alone, through the embedding and "
         "the unembedding (with its bias); each row (a current token) becomes log-probabilities over the next token.",
    mistakes=(
        Mistake("the table without the unembedding bias b_U",
                "the unembedding adds its bias to every row's logits before the softmax.",
                lambda model: torch.log_softmax(model.W_E @ model.W_U, dim=-1)),
        Mistake("a softmax over the current token (the first axis)",
                "each row is one current token, and its probabilities over the next token must sum to 1.",
                lambda model: torch.log_softmax(model.W_E @ model.W_U + model.b_U, dim=0)),
        Mistake("probabilities instead of log-probabilities",
                "the table holds log P(next | current), so its entries are negative.",
                lambda model: torch.softmax(model.W_E @ model.W_U + model.b_U, dim=-1)),
    ))


def _chains() -> list[Case]:
    """A random 8-state chain against a random table, and a 16-state chain against a table close to it."""
    out = []
    for vocab, noise in ((8, 1.0), (16, 0.1)):
        transitions = tasks.bigram_transition_matrix(vocab, seed=int(torch.randint(0, 10_000, ())))
        log_model = torch.log_softmax(transitions.log() + noise * torch.randn(vocab, vocab), dim=-1)
        out.append((f"on a random {vocab}-state chain", (log_model, transitions,
                                                         tasks.stationary_distribution(transitions))))
    return out


check_kl_to_chain = exercise(
    "2.2", "how far from the truth?", models.kl_to_chain, function="kl_to_chain",
    kind="analysis", cases=_chains, atol=1e-5,
    hint="the KL of one row compares the true next-state distribution with the model's, weighted by the true "
         "probabilities; the chain's KL per step weights each row by how often the chain is in that state.",
    mistakes=(
        Mistake("every state weighted equally",
                "a state the chain rarely visits should count less: weight each row by the stationary distribution.",
                lambda log_model, transitions, pi: (transitions * (transitions.log() - log_model)).sum(-1).mean()),
        Mistake("the KL the other way round, KL(model || true chain)",
                "the expectation is over the true chain's transitions, so the true probabilities weight the log ratio.",
                lambda log_model, transitions, pi: pi @ (log_model.exp() * (log_model - transitions.log())).sum(-1)),
        Mistake("one KL per state, not their weighted sum",
                "the answer is one number in nats per step: combine the rows with the stationary distribution.",
                lambda log_model, transitions, pi: (transitions * (transitions.log() - log_model)).sum(-1)),
    ))


def _max_of_list_with_logit_bias(layer_biases: bool = False):
    """A freshly initialised max_of_list model with a non-zero unembedding bias (and attention biases)."""
    model = _fresh_model("max_of_list")
    with torch.no_grad():
        model.b_U.copy_(0.5 * torch.randn_like(model.b_U))
        if layer_biases:
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.copy_(0.1 * torch.randn_like(p))
    return model


def _max_lists() -> list[Case]:
    """A fresh max_of_list model on random lists of length 6 and of length 4."""
    model = _max_of_list_with_logit_bias()
    return [(f"on a fresh max_of_list model, lists of length {n}", (model, torch.randint(0, 64, (50, n))))
            for n in (6, 4)]


def _last_direct(model, tokens: Tensor, position: int | None = None, pos: bool = True, bias: bool = True) -> Tensor:
    """The direct path at one position, written out plainly (with the pieces a mistake drops)."""
    i = tokens.shape[-1] - 1 if position is None else position
    resid = model.W_E[tokens[:, i]] + (model.W_pos[i] if pos else 0)
    return resid @ model.W_U + (model.b_U if bias else 0)


check_direct_path_logits = exercise(
    "2.3", "what the direct path adds to each logit", circuits.direct_path_logits, function="direct_path_logits",
    kind="analysis", cases=_max_lists, atol=1e-4,
    hint="the direct path carries what the embeddings put in the residual stream at the last position (the token and "
         "the position both write there) straight to the unembedding, bias included.",
    mistakes=(
        Mistake("the token's embedding without W_pos",
                "the residual stream at a position starts as the token's embedding plus the position's.",
                lambda model, tokens: _last_direct(model, tokens, pos=False)),
        Mistake("the first position instead of the last",
                "the model answers at the last position of each list: read its token and its position.",
                lambda model, tokens: _last_direct(model, tokens, position=0)),
        Mistake("the logits without the unembedding bias b_U",
                "no head writes the bias, so count it with the direct path: then the terms add up to the logits.",
                lambda model, tokens: _last_direct(model, tokens, bias=False)),
        Mistake("the last position of the context, not of the list",
                "on a list shorter than n_ctx the last position is the list's own last index.",
                lambda model, tokens: (model.W_E[tokens[:, -1]] + model.W_pos[-1]) @ model.W_U + model.b_U),
    ))


def _boost_lists() -> list[Case]:
    model = _max_of_list_with_logit_bias()
    return [("on a fresh max_of_list model, 300 lists of length 6", (model, torch.randint(0, 64, (300, 6))))]


def _boosts(model, tokens: Tensor, direct: Tensor | None = None, head: Tensor | None = None,
            over_lists: bool = False) -> tuple[float, float]:
    """(direct, head) boosts to the correct logit, written out plainly, with the pieces a mistake swaps."""
    _, cache = model.run_with_cache(tokens)
    direct = _last_direct(model, tokens) if direct is None else direct
    head = cache["attn_out", 0][:, -1] @ model.W_U if head is None else head
    answer = tokens.max(-1).values

    def boost(x: Tensor) -> float:
        baseline = x.mean(0)[answer] if over_lists else x.mean(-1)
        return (x[torch.arange(len(x)), answer] - baseline).mean().item()
    return boost(direct), boost(head)


check_logit_boosts = exercise(
    "2.4", "who pushes the right answer up?", circuits.logit_boosts, function="logit_boosts",
    kind="analysis", cases=_boost_lists, atol=1e-3,
    hint="split the logits at the last position into the direct path and the head's output (read from the cache and "
         "unembedded); for each, a list's boost is its logit for the list's maximum minus its mean logit over the "
         "vocabulary; average the boosts over the lists.",
    mistakes=(
        Mistake("the direct path without W_pos",
                "the position's embedding is in the residual stream too, and reaches the unembedding directly.",
                lambda model, tokens: _boosts(model, tokens, direct=_last_direct(model, tokens, pos=False))),
        Mistake("the direct path at the first position",
                "both terms must be read where the model answers, at the last position.",
                lambda model, tokens: _boosts(model, tokens, direct=_last_direct(model, tokens, position=0))),
        Mistake("the direct path without b_U",
                "count the unembedding bias with the direct path, so that the two terms add up to the logits.",
                lambda model, tokens: _boosts(model, tokens, direct=_last_direct(model, tokens, bias=False))),
        Mistake("the mean logit over the lists instead of over the vocabulary",
                "a boost compares the correct logit with the other logits of the same list.",
                lambda model, tokens: _boosts(model, tokens, over_lists=True)),
        Mistake("the head's term taken from the whole logits",
                "the logits already contain the direct path; the head's own term is its output times W_U.",
                lambda model, tokens: _boosts(model, tokens, head=model(tokens)[:, -1])),
    ))


def _ablation_lists() -> list[Case]:
    model = _max_of_list_with_logit_bias(layer_biases=True)
    return [("on a fresh max_of_list model, 200 lists of length 6", (model, torch.randint(0, 64, (200, 6))))]


def _ablated(model, tokens: Tensor, replace: Callable) -> Tensor:
    """Head's output plus `replace(embeddings)` at the last position, unembedded, [batch, vocab]."""
    _, cache = model.run_with_cache(tokens)
    return (cache["attn_out", 0][:, -1] + replace(cache["resid_pre", 0])) @ model.W_U + model.b_U


def _ablated_upstream(model, tokens: Tensor) -> Tensor:
    def mean_embeddings(resid: Tensor, hook) -> Tensor:
        return resid.mean(0, keepdim=True).expand_as(resid)
    return model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", mean_embeddings)])[:, -1]


check_logits_without_direct_path = exercise(
    "2.5", "the model without its direct path", circuits.logits_without_direct_path,
    function="logits_without_direct_path", kind="analysis", cases=_ablation_lists, atol=1e-4,
    hint="the unembedding sees the embeddings plus the head's output; keep the head's output as it is and put the "
         "embeddings' average over the batch (position by position) in place of each list's own embeddings, only on "
         "the way to the unembedding.",
    mistakes=(
        Mistake("the direct path zeroed instead of replaced by its mean",
                "zeroing also removes the average push every list gets; a mean ablation keeps it and removes only "
                "what depends on the list.",
                lambda model, tokens: _ablated(model, tokens, lambda e: 0 * e[:, -1])),
        Mistake("the embeddings ablated where the head reads them too",
                "the head must still see each list's real tokens; change the embeddings only on their direct way "
                "to the unembedding, after the head has read them.",
                _ablated_upstream),
        Mistake("the mean over the positions instead of over the lists",
                "average each position's embeddings over the lists of the batch, not a list's embeddings over "
                "its positions.",
                lambda model, tokens: _ablated(model, tokens, lambda e: e.mean(1))),
    ))


# ------------------------------------------------------------------ chapter 03: QK and OV circuits


def _max_of_list_model() -> list[Case]:
    """One freshly initialised max_of_list model: the only input of the exercises on its circuits."""
    return [("on a freshly initialised max_of_list model", (_fresh_model("max_of_list"),))]


def _token_qk(model, scale: bool = True) -> Tensor:
    scores = model.W_E @ model.W_Q[0, 0] @ model.W_K[0, 0].T @ model.W_E.T
    return scores / model.cfg.d_head ** 0.5 if scale else scores


check_token_qk_circuit = exercise(
    "3.1", "the token-only QK circuit", circuits.full_qk_tokens, function="token_qk_circuit",
    kind="implementation", cases=_max_of_list_model, atol=1e-4,
    hint="a query token is read by W_Q and a key token by W_K, each after its embedding; the head scales their "
         "dot product before the softmax.",
    mistakes=(
        Mistake("the map transposed (rows are key tokens)",
                "row q must hold the scores query token q gives every key token, so the query's side comes first.",
                lambda model: _token_qk(model).T),
        Mistake("the score without the head's 1/sqrt(d_head) scale",
                "the head divides every query-key dot product by the square root of d_head before the softmax.",
                lambda model: _token_qk(model, scale=False)),
        Mistake("W_Q and W_K without the embedding",
                "the map is from tokens to tokens, so each side starts from the token embedding.",
                lambda model: model.W_Q[0, 0] @ model.W_K[0, 0].T / model.cfg.d_head ** 0.5),
    ))


@exercise("3.2", "the full OV circuit", circuits.full_ov, kind="implementation",
          hint="follow an attended token through the head: its embedding, then the value and output weights, then "
               "the unembedding; rows are attended tokens, columns output logits, and the result is a plain tensor.",
          mistakes=(
              Mistake("the map transposed (rows are output logits)",
                      "row a must be what attending to token a adds to every logit, so the embedding comes first.",
                      lambda model: (model.W_E @ model.W_V[0, 0] @ model.W_O[0, 0] @ model.W_U).T),
              Mistake("the unembedding on the wrong side",
                      "the residual stream is read out into logits at the end of the product, not at its start.",
                      lambda model: model.W_U.T @ model.W_V[0, 0] @ model.W_O[0, 0] @ model.W_E.T),
              Mistake("W_O before W_V",
                      "the head first reads a value from the attended position, then writes it back with the output "
                      "weights: W_V acts before W_O.",
                      lambda model: model.W_E @ model.W_O[0, 0] @ model.W_V[0, 0] @ model.W_U),
              Mistake("the circuit without W_O",
                      "the value vectors live in the head's own space; the output weights write them to the "
                      "residual stream before W_U can read them.",
                      lambda model: model.W_E @ model.W_V[0, 0] @ model.W_U),
          ))
def check_full_ov_circuit(fn: Callable, ex: str) -> None:
    spec = _STATE["spec"]
    model = _fresh_model("max_of_list")
    with torch.no_grad():
        expected = circuits.full_ov(model).AB
        got = call_learner(fn, ex, model, hint=spec.hint)
        compare_tensors(got, expected, ex, spec.hint, atol=1e-4, inputs=(model,))
    passed(ex)


def _copying_cases() -> list[Case]:
    # in this order each named mistake is first caught on a case where it gives its own value
    matrices = [("the identity", torch.eye(6)), ("a rotation by 90°", torch.tensor([[0.0, -1.0], [1.0, 0.0]])),
                ("minus the identity", -torch.eye(6)), ("a random 10 x 10 matrix", torch.randn(10, 10)),
                ("a random matrix plus 3 I", torch.randn(10, 10) + 3 * torch.eye(10))]
    return [(f"on {where}", (matrix,)) for where, matrix in matrices]


check_copying_score = exercise(
    "3.3", "the eigenvalue copying score", circuits.copying_score, function="copying_score",
    kind="implementation", cases=_copying_cases, atol=1e-4,
    hint="eigenvalues of a real matrix come in complex pairs: add them all up (the sum is real, it is the trace), "
         "divide by the total of their sizes, and return a Python float.",
    mistakes=(
        Mistake("the size of the sum of the eigenvalues, not its real value",
                "a head that flips every logit must score -1: keep the sign of the sum, and take sizes only in "
                "the denominator.",
                lambda m: (torch.linalg.eigvals(m).sum().abs() / torch.linalg.eigvals(m).abs().sum()).item()),
        Mistake("singular values in place of eigenvalues",
                "singular values are never negative, so they cannot tell copying from flipping or rotating; the "
                "score needs the eigenvalues, which keep direction.",
                lambda m: (torch.linalg.svdvals(m).sum() / torch.linalg.svdvals(m).sum()).item()),
        Mistake("the trace over the Frobenius norm",
                "the numerator is right (the trace is the sum of the eigenvalues), but the denominator is the sum "
                "of the eigenvalues' sizes, not a norm of the entries.",
                lambda m: (m.trace() / m.norm()).item()),
    ))


def _ordering_cases() -> list[Case]:
    maps = [("an increasing map", torch.arange(5.0).repeat(3, 1)), ("a decreasing map", -torch.arange(5.0).repeat(3, 1)),
            ("a random 7 x 9 map", torch.randn(7, 9)), ("a map with ties", torch.tensor([[0.0, 1.0, 1.0], [2.0, 0.0, 3.0]])),
            ("the token-only QK map of a fresh model", _token_qk(_fresh_model("max_of_list")).detach())]
    return [(f"on {where}", (scores,)) for where, scores in maps]


def _pairs_share(scores: Tensor, wins: Tensor, diagonal: int = 1) -> float:
    n = scores.shape[-1]
    return wins[:, torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=diagonal)].float().mean().item()


check_fraction_ordered = exercise(
    "3.4", "is a larger key always preferred?", circuits.fraction_ordered, function="fraction_ordered",
    cases=_ordering_cases, atol=1e-6,
    hint="compare every pair of columns b < c within each row, count the pairs where the later column scores "
         "strictly more, and divide by the number of comparisons (rows times pairs).",
    mistakes=(
        Mistake("ties counted as ordered",
                "a key that only matches a smaller key's score is not preferred to it: count strict wins only.",
                lambda s: _pairs_share(s, s[:, None, :] >= s[:, :, None])),
        Mistake("each key compared with itself too",
                "a key never beats itself, so the pairs b = c only dilute the share: take b < c.",
                lambda s: _pairs_share(s, s[:, None, :] > s[:, :, None], diagonal=0)),
        Mistake("the map read by columns",
                "rows are query tokens and the comparisons run along a row, between key tokens.",
                lambda s: _pairs_share(s.T, s.T[:, None, :] > s.T[:, :, None])),
        Mistake("neighbouring keys only",
                "the question is about every pair b < c, not only c = b + 1: a row can rise step by step and "
                "still rank far-apart keys wrongly, and the other way round.",
                lambda s: (s[:, 1:] > s[:, :-1]).float().mean().item()),
    ))


def _agreement_cases() -> list[Case]:
    fresh = _fresh_model("max_of_list")
    with torch.no_grad():
        fresh.W_Q.mul_(8.0)  # a sharper pattern than at initialisation, so the model's choice is not a coin toss
    lists = [torch.randint(0, 64, (600, 6)), torch.randint(0, 64, (600, 6)), torch.randint(0, 16, (600, 5))]
    return [("on a freshly initialised model", (fresh, lists[0])),
            ("on the shipped checkpoint with noise on its weights", (_noisy_max_of_list(), lists[1])),
            ("on the noisy checkpoint, lists of 5 tokens below 16", (_noisy_max_of_list(0.3), lists[2]))]


def _last_row_choice(model, lists: Tensor) -> Tensor:
    _, cache = model.run_with_cache(lists, names_filter="blocks.0.attn.hook_pattern")
    return cache["pattern", 0][:, 0, -1].argmax(-1)


def _token_choice(model, lists: Tensor, query: Tensor, transposed: bool = False) -> Tensor:
    qk = _token_qk(model)
    return (qk.T if transposed else qk)[query, lists].argmax(-1)


def _same_token(lists: Tensor, i: Tensor, j: Tensor) -> float:
    return (lists.gather(1, i[:, None]) == lists.gather(1, j[:, None])).float().mean().item()


check_token_only_agreement = exercise(
    "3.5", "the token-only choice against the model's", circuits.token_only_agreement,
    function="token_only_agreement", cases=_agreement_cases, atol=1e-6,
    hint="two choices per list: the key whose token the token-only map scores highest for the last position's "
         "token, and the key the model's own attention pattern weighs most from the last position; count the "
         "lists on which both hold the same token.",
    mistakes=(
        Mistake("the first position taken as the query",
                "the model predicts the maximum at the last position, so the query token is the list's last one.",
                lambda model, lists: _same_token(lists, _token_choice(model, lists, lists[:, :1]),
                                                 _last_row_choice(model, lists))),
        Mistake("the token-only map read with query and key swapped",
                "rows of the map are query tokens, columns key tokens: index the row by the query.",
                lambda model, lists: _same_token(lists, _token_choice(model, lists, lists[:, -1:], transposed=True),
                                                 _last_row_choice(model, lists))),
        Mistake("the token-only choice compared with the list's maximum",
                "the question is whether the map explains the model's choice (its attention pattern), not whether "
                "it solves the task.",
                lambda model, lists: (lists.gather(1, _token_choice(model, lists, lists[:, -1:])[:, None])[:, 0]
                                      == lists.max(-1).values).float().mean().item()),
        Mistake("positions compared instead of tokens",
                "the token-only map cannot tell two copies of a token apart; when a list repeats a token, either "
                "copy is the same key token.",
                lambda model, lists: (_token_choice(model, lists, lists[:, -1:])
                                      == _last_row_choice(model, lists)).float().mean().item()),
    ))


def _mix_cases() -> list[Case]:
    model = _noisy_max_of_list()
    a, b = torch.randint(0, 64, (64, 6)), torch.randint(0, 64, (64, 6))
    fresh = _fresh_model("max_of_list")
    with torch.no_grad():
        fresh.W_pos.mul_(20.0)  # a fresh W_pos is tiny: scale it so that it shows
        fresh.W_Q.mul_(8.0)
    c, d = torch.randint(0, 64, (64, 6)), torch.randint(0, 64, (64, 6))
    return [("on a noisy checkpoint with alpha = 0.3, beta = 0.7", (model, a, b, 0.3, 0.7)),
            ("on a noisy checkpoint with alpha = 2, beta = -0.5", (model, a, b, 2.0, -0.5)),
            ("on a fresh model with alpha = 1.5, beta = 0.5", (fresh, c, d, 1.5, 0.5))]


def _mix_logits(model, a, b, alpha, beta, freeze: tuple = ("mix", "a", "b"), scale_pos: bool = False):
    """(logits of the mix, of a, of b), each with a's pattern frozen where `freeze` says so."""
    _, cache = model.run_with_cache(a, names_filter="blocks.0.attn.hook_pattern")
    frozen = [("blocks.0.attn.hook_pattern", lambda pattern, hook: cache["pattern", 0])]
    mix = alpha * model.W_E[a] + beta * model.W_E[b]
    hooks = [("hook_embed", lambda embed, hook: mix)]
    if scale_pos:
        hooks.append(("hook_pos_embed", lambda pos, hook: (alpha + beta) * pos))
    mixed = model.run_with_hooks(a, fwd_hooks=hooks + (frozen if "mix" in freeze else []))
    logits_a = model.run_with_hooks(a, fwd_hooks=frozen if "a" in freeze else [])
    logits_b = model.run_with_hooks(b, fwd_hooks=frozen if "b" in freeze else [])
    return mixed, alpha * logits_a + beta * logits_b


def _mix_gap(*args, reduce: str = "max", **kwargs) -> float:
    mixed, combined = _mix_logits(*args, **kwargs)
    gap = (mixed - combined).abs()
    return (gap.max() if reduce == "max" else gap.mean()).item()


check_frozen_mix_gap = exercise(
    "3.6", "affine, not linear", circuits.frozen_mix_gap, function="frozen_mix_gap", cases=_mix_cases, atol=1e-3,
    hint="three runs, all with the attention pattern of a held fixed: one on the mixed token embeddings (replace "
         "what the embedding hook gives), one on a, one on b; return the largest absolute difference between the "
         "first and the same mix of the other two.",
    mistakes=(
        Mistake("the mixed input run with its own attention pattern",
                "the claim is about the model with its pattern frozen: the run on the mix must use a's pattern too.",
                lambda *args: _mix_gap(*args, freeze=("a", "b"))),
        Mistake("b's logits taken with b's own pattern",
                "all three runs share one frozen pattern (a's); with b's own the comparison mixes two different "
                "linear maps.",
                lambda *args: _mix_gap(*args, freeze=("mix", "a"))),
        Mistake("the whole residual stream mixed (W_pos scaled by alpha + beta as well)",
                "the test is about the token embeddings: the positional embedding stays as the model adds it, "
                "once, whatever the coefficients.",
                lambda *args: _mix_gap(*args, scale_pos=True)),
        Mistake("the mean deviation, not the largest",
                "a test of an identity looks for the worst entry: take the largest absolute difference over the "
                "batch, the positions and the logits.",
                lambda *args: _mix_gap(*args, reduce="mean")),
    ))


# ------------------------------------------------------------------ chapter 04: positions in QK
def _positional_cases() -> list[Case]:
    noisy, fresh = _noisy_max_of_list(), _fresh_model("max_of_list")
    return [("on a noisy checkpoint at query position 5, key position 2", (noisy, 5, 2)),
            ("on a noisy checkpoint at query position 4, key position 0", (noisy, 4, 0)),
            ("on a fresh model at query position 3, key position 3", (fresh, 3, 3))]


def _pos_qk(model, q: int, k: int, key_side: int | None = None, scale: bool = True) -> Tensor:
    queries = (model.W_E + model.W_pos[q]) @ model.W_Q[0, 0]
    keys = (model.W_E + model.W_pos[k if key_side is None else key_side]) @ model.W_K[0, 0]
    return queries @ keys.T / (model.cfg.d_head ** 0.5 if scale else 1.0)


check_positional_qk_circuit = exercise(
    "4.1", "the position-aware QK circuit", circuits.full_qk_positional, function="positional_qk_circuit",
    kind="implementation", cases=_positional_cases, atol=1e-4,
    hint="the residual stream at a position is the token's embedding plus that position's embedding; the query side "
         "uses the query's position, the key side the key's, and the head scales the dot product.",
    mistakes=(
        Mistake("the token-only map (the positional embeddings left out)",
                "each side of the score starts from the residual stream at its own position, token plus position.",
                lambda model, q, k: _token_qk(model)),
        Mistake("the query's position added on the key side too",
                "the key sits at key_pos, so its residual stream carries the key position's embedding.",
                lambda model, q, k: _pos_qk(model, q, k, key_side=q)),
        Mistake("the score without the head's 1/sqrt(d_head) scale",
                "the head divides every query-key dot product by the square root of d_head before the softmax.",
                lambda model, q, k: _pos_qk(model, q, k, scale=False)),
        Mistake("the two positions swapped",
                "rows are query tokens at query_pos, columns key tokens at key_pos.",
                lambda model, q, k: _pos_qk(model, k, q)),
    ))


def _terms(model, q: int, k: int, scale: bool = True, query_means: str = "query", key_means: str = "key",
           centre_tokens: bool = True, centre: bool = True, key_pos_on_query: bool = False) -> dict[str, Tensor]:
    """The nine QK terms as a learner might build them, with one slip or none.

    `query_means` / `key_means` name the positions a side's positional mean runs over ("query": 1 .. n_ctx - 1,
    "key" or "all": every position); without `centre` the embeddings are split as stored (no shared part).
    """
    s = model.cfg.d_head ** 0.5 if scale else 1.0
    n = model.cfg.d_vocab

    def parts(pos: int, means: str) -> dict[str, Tensor]:
        if not centre:
            zero = torch.zeros_like(model.W_E)
            return {"const": zero, "token": model.W_E, "pos": model.W_pos[pos].expand(n, -1)}
        mean_pos = (model.W_pos[1:] if means == "query" else model.W_pos).mean(0)
        mean_token = model.W_E.mean(0) if centre_tokens else torch.zeros_like(mean_pos)
        return {"const": (mean_token + mean_pos).expand(n, -1), "token": model.W_E - mean_token,
                "pos": (model.W_pos[pos] - mean_pos).expand(n, -1)}

    queries = {a: v @ model.W_Q[0, 0] for a, v in parts(k if key_pos_on_query else q, query_means).items()}
    keys = {b: v @ model.W_K[0, 0] for b, v in parts(k, key_means).items()}
    return {f"{a}·{b}": (queries[a] @ keys[b].T / s).clone() for a in queries for b in keys}


check_qk_terms = exercise(
    "4.2", "the nine terms of the score", circuits.qk_score_terms, function="qk_terms",
    kind="implementation", cases=_positional_cases, atol=1e-4,
    hint="each side of the score is a shared part (the mean token embedding plus the mean positional embedding over "
         "the positions that side can hold) plus the token's and the position's differences from those means; "
         "multiply the sum out into nine products, scale each as the head does, and spread each to a full map.",
    mistakes=(
        Mistake("the terms without the head's 1/sqrt(d_head) scale",
                "the nine terms must add up to the scaled score of Exercise 4.1, so each carries the scale.",
                lambda model, q, k: _terms(model, q, k, scale=False)),
        Mistake("the embeddings split as stored, with no shared part taken out",
                "a vector every query shares can sit in W_E or in W_pos without changing the model; take the means "
                "out of both into the shared part, so the token and position parts hold only what differs.",
                lambda model, q, k: _terms(model, q, k, centre=False)),
        Mistake("the token embeddings left uncentred",
                "the mean token embedding is shared by every query and every key as much as the positions' mean "
                "is: it belongs in the shared part.",
                lambda model, q, k: _terms(model, q, k, centre_tokens=False)),
        Mistake("the query side's positional mean taken over position 0 too",
                "a query at position 0 sees only itself and chooses nothing: the query side's mean runs over the "
                "positions whose attention chooses between keys.",
                lambda model, q, k: _terms(model, q, k, query_means="all")),
        Mistake("the key side's positional mean taken over the query positions only",
                "a key can sit at any position a list holds, position 0 included.",
                lambda model, q, k: _terms(model, q, k, key_means="query")),
        Mistake("the key position's embedding on the query side",
                "the query sits at query_pos: its position part comes from that position's embedding.",
                lambda model, q, k: _terms(model, q, k, key_pos_on_query=True)),
    ))


def _term_table(model, q: int, k: int, strict_wins: bool = True, along: int = -1, scale: bool = True,
                whole_map: bool = False) -> dict[str, tuple[float, float]]:
    out = {}
    for name, term in _terms(model, q, k, scale=scale).items():
        n = term.shape[-1]
        wins = term[:, None, :] > term[:, :, None] if strict_wins else term[:, None, :] >= term[:, :, None]
        share = wins[:, torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)].float().mean().item()
        spread = term.std().item() if whole_map else term.std(along).mean().item()
        out[name] = (share, spread)
    return out


def _term_cases() -> list[Case]:
    noisy = _noisy_max_of_list()
    return [("on a noisy checkpoint at query position 5, key position 2", (noisy, 5, 2)),
            ("on a noisy checkpoint at query position 2, key position 0", (noisy, 2, 0)),
            ("on a fresh model at query position 4, key position 1", (_fresh_model("max_of_list"), 4, 1))]


check_ordering_by_term = exercise(
    "4.3", "which term orders the keys?", circuits.ordering_by_term, function="ordering_by_term",
    cases=_term_cases, atol=1e-3,
    hint="for each term alone, count the strict wins of a larger key token over a smaller one within each query "
         "token's row, and measure how far the term moves along a row (over key tokens), averaged over the rows.",
    mistakes=(
        Mistake("ties counted as ordered",
                "a term that gives every key token the same score prefers none of them: count strict wins only.",
                lambda model, q, k: _term_table(model, q, k, strict_wins=False)),
        Mistake("the spread taken down a column (over query tokens)",
                "the question is how a term moves the keys against each other, so the spread runs over key tokens, "
                "along a row.",
                lambda model, q, k: _term_table(model, q, k, along=0)),
        Mistake("the spread of the whole map, not along each row",
                "a term that only changes from row to row moves no key against another; take the spread within "
                "each row, then average.",
                lambda model, q, k: _term_table(model, q, k, whole_map=True)),
        Mistake("terms without the head's 1/sqrt(d_head) scale",
                "the spreads are in units of attention score, which the head scales before the softmax.",
                lambda model, q, k: _term_table(model, q, k, scale=False)),
    ))


def _margins(model, q: int, same_position: bool = False, own_key: bool = True, pin_query_key: bool = True,
             floor: bool = True, reduce: str = "min") -> Tensor:
    """Worst (or mean) margin by gap, [query token, gap], with one of a learner's slips or none."""
    scores = torch.stack([_pos_qk(model, q, k) for k in range(q + 1)], dim=1)  # [t, k, v]
    vocab, n = scores.shape[0], q + 1
    t = torch.arange(vocab)[:, None, None, None]
    k1, k2 = torch.arange(n)[None, :, None, None], torch.arange(n)[None, None, :, None]
    out = torch.full((vocab, vocab), float("inf"))
    for gap in range(1, vocab):
        c = torch.arange(gap, vocab)
        b = c - gap
        margin = scores[:, :, None, c] - scores[:, None, :, b]
        ok = (k1 == k2) if same_position else (k1 != k2)
        if not own_key:
            ok = ok & (k1 < q) & (k2 < q)
        if pin_query_key:
            ok = ok & ((k1 != q) | (c == t)) & ((k2 != q) | (b == t))
        if floor:
            ok = ok & (c >= t)
        ok = ok.expand_as(margin)
        if reduce == "min":
            out[:, gap] = margin.masked_fill(~ok, float("inf")).flatten(1).min(-1).values
        else:
            count = ok.flatten(1).sum(-1)
            mean = (margin * ok).flatten(1).sum(-1) / count.clamp(min=1)
            out[:, gap] = torch.where(count > 0, mean, torch.tensor(float("inf")))
    return out


def _margin_cases() -> list[Case]:
    noisy = _noisy_max_of_list()
    return [("on a noisy checkpoint at query position 5", (noisy, 5)),
            ("on a noisy checkpoint at query position 1", (noisy, 1)),
            ("on a fresh model at query position 3", (_fresh_model("max_of_list"), 3))]


check_worst_margin_by_gap = exercise(
    "4.4", "the worst case across key positions", circuits.worst_margin_by_gap, function="worst_margin_by_gap",
    cases=_margin_cases, atol=1e-4,
    hint="for each query token and gap, go over every pair of distinct key positions up to the query's own and "
         "every pair of key tokens that far apart, keep only what a list can hold (the key at the query's "
         "position is the query token, the larger key is not below it) and take the least margin; +inf where "
         "nothing is left.",
    mistakes=(
        Mistake("both keys at one position (the within-map comparison)",
                "the maximum competes with keys at other positions: the two keys of a pair sit at different "
                "positions.",
                lambda model, q: _margins(model, q, same_position=True)),
        Mistake("the query's own position left out of the keys",
                "a query attends to itself too: key positions run up to and including the query's.",
                lambda model, q: _margins(model, q, own_key=False)),
        Mistake("any token allowed at the query's position",
                "the key at the query's own position holds the query token, whatever the rest of the list holds.",
                lambda model, q: _margins(model, q, pin_query_key=False)),
        Mistake("a larger key below the query token allowed",
                "the larger key plays the list's maximum, and the query token is in the list, so it cannot be "
                "larger than that key.",
                lambda model, q: _margins(model, q, floor=False)),
        Mistake("the mean margin, not the worst",
                "a failure happens on the worst configuration, not on the average one: take the least margin.",
                lambda model, q: _margins(model, q, reduce="mean")),
    ))


def _need(model, direct: bool = True, positions: bool = True, every_rival: bool = True,
          over_positions: str = "min") -> Tensor:
    """attention_needed as a learner might compute it, with one slip or none."""
    vocab, n = model.cfg.d_vocab, model.cfg.n_ctx
    pos = model.W_pos if positions else torch.zeros_like(model.W_pos)
    ov = (model.W_E[None] + pos[:, None]) @ model.W_V[0, 0] @ model.W_O[0, 0] @ model.W_U  # [k, x, o]
    diff = ov[:, :, :, None] - ov[:, :, None, :]  # [k, x, m, o]
    lead = diff.min(0).values if over_positions == "min" else diff.mean(0)
    tokens = torch.arange(vocab)
    a, b = lead[tokens, tokens][:, None, :], lead.transpose(0, 1)  # [m, 1, o], [m, r, o]
    if direct:
        d_all = torch.stack([(model.W_E + pos[q]) @ model.W_U for q in range(1, n)])
        d_lead = (d_all[:, :, :, None] - d_all[:, :, None, :]).min(0).values  # [t, m, o]
        d_lead = d_lead.masked_fill(~(tokens[:, None, None] <= tokens[None, :, None]), float("inf"))
        d = d_lead.min(0).values[:, None, :]
    else:
        d = torch.zeros(vocab, 1, vocab)
    slope, needed = a - b, -(b + d)
    p = torch.where(slope > 0, needed / slope, torch.where(a + d > 0, -torch.inf, torch.inf))
    p = p.masked_fill(torch.eye(vocab, dtype=torch.bool)[:, None, :], -torch.inf)
    if not every_rival:
        p = p.masked_fill(~torch.eye(vocab, dtype=torch.bool)[None, :, :], -torch.inf)  # only o = r
    need = p.max(-1).values.clamp(min=0.0)
    return need.masked_fill(tokens[None, :] >= tokens[:, None], float("inf"))


def _need_cases() -> list[Case]:
    return [("on the shipped checkpoint with noise on its weights", (_noisy_max_of_list(),)),
            ("on the shipped checkpoint with more noise", (_noisy_max_of_list(0.3),))]


check_attention_needed = exercise(
    "4.5", "the attention the maximum needs", circuits.attention_needed, function="attention_needed",
    cases=_need_cases, atol=1e-4,
    hint="with share p on the maximum and the rest on the runner-up, each rival's logit gap is a straight line in p "
         "made of the maximum's OV row, the runner-up's and the direct path, each at its worst position (and the "
         "direct path at its worst query token); solve each line for the least p, take the largest over the "
         "rivals, and clip at zero.",
    mistakes=(
        Mistake("the direct path left out",
                "the query's own embedding reaches the logits around the head, so it adds its own (worst) gap to "
                "every line.",
                lambda model: _need(model, direct=False)),
        Mistake("the positional embeddings left out",
                "a key's value is read from token plus position, and so is the direct path: take the worst "
                "position, not none.",
                lambda model: _need(model, positions=False)),
        Mistake("only the runner-up as a rival",
                "the maximum must beat every other token's logit, not only the runner-up's.",
                lambda model: _need(model, every_rival=False)),
        Mistake("key positions averaged, not the worst",
                "the maximum can sit at any position; a need that holds wherever it sits takes the worst one.",
                lambda model: _need(model, over_positions="mean")),
    ))


# ------------------------------------------------------------------ chapter 05: MLP effective weights
def _noisy_addition(scale: float = 0.05):
    """The shipped addition checkpoint with noise on every weight, W_pos made large enough to matter."""
    model = _noised(models.load_model("addition"), dict(models.spec("addition").config), scale)
    with torch.no_grad():
        model.W_pos.mul_(5.0)
    return model


def _addition_model_cases() -> list[Case]:
    model = _noisy_addition()
    return [(f"on a noisy addition checkpoint at source position {pos}", (model, pos)) for pos in (0, 1)]


def _through_head(model, embedded: Tensor, v_first: bool = True) -> Tensor:
    ov = model.W_V[0, 0] @ model.W_O[0, 0] if v_first else model.W_O[0, 0] @ model.W_V[0, 0]
    return embedded @ ov @ model.W_in[0]


check_token_to_neuron = exercise(
    "5.1", "tokens to neuron inputs", circuits.token_to_neuron, function="token_to_neuron", kind="implementation",
    cases=_addition_model_cases, atol=1e-3, rtol=1e-3,
    hint="follow a token at the source position through the head and stop at the MLP's input weights: its "
         "embedding plus that position's embedding, then the value and output weights; rows are tokens, columns "
         "neurons.",
    mistakes=(
        Mistake("the positional embedding left out",
                "a token at a source position enters the head as its embedding plus that position's embedding.",
                lambda model, pos: _through_head(model, model.W_E)),
        Mistake("the other position's embedding",
                "the positional embedding to add is the one of the source position the argument names.",
                lambda model, pos: _through_head(model, model.W_E + model.W_pos[1 - pos])),
        Mistake("the skip path, not the head",
                "the map asked for goes through the head (value, then output weights) before the MLP reads it.",
                lambda model, pos: (model.W_E + model.W_pos[pos]) @ model.W_in[0]),
        Mistake("W_O before W_V",
                "the head first reads a value from the source token, then writes it to the residual stream.",
                lambda model, pos: _through_head(model, model.W_E + model.W_pos[pos], v_first=False)),
    ))


def _power_cases() -> list[Case]:
    x = torch.arange(128.0)
    inputs = [torch.cos(2 * torch.pi * 3 * x / 128)[:, None], torch.randn(128, 5), torch.randn(9, 3), torch.randn(10)]
    return [(f"on a {tuple(v.shape)} input", (v,)) for v in inputs]


def _power(values: Tensor, doubled: str = "pairs", norm: str | None = "ortho", squared: bool = True) -> Tensor:
    power = torch.fft.rfft(values, dim=0, norm=norm).abs() ** (2 if squared else 1)
    n = values.shape[0]
    if doubled == "pairs":
        power[1:(n + 1) // 2] *= 2
    elif doubled == "all":
        power[1:] *= 2
    return power


check_frequency_power = exercise(
    "5.2", "power per frequency", fourier.frequency_power, function="frequency_power", kind="implementation",
    cases=_power_cases, atol=1e-3, rtol=1e-3,
    hint="the real FFT along the token axis gives one coefficient per frequency 0 .. n // 2; with the orthonormal "
         "scaling their squared sizes add up to the sum of squares once each frequency that stands for a pair "
         "(itself and n - f) is counted twice.",
    mistakes=(
        Mistake("the power without counting mirror frequencies twice",
                "rfft keeps one of each pair of frequencies f and n - f; the entries must add up to the sum of squares.",
                lambda values: _power(values, doubled="none")),
        Mistake("the constant or the n / 2 frequency doubled too",
                "only the frequencies 1 .. (n - 1) // 2 stand for a pair; the constant and, for even n, n / 2 have "
                "no mirror.",
                lambda values: _power(values, doubled="all")),
        Mistake("the FFT without its orthonormal scaling",
                "the default FFT grows with n: scale it so that the entries add up to the sum of squares.",
                lambda values: _power(values, norm=None)),
        Mistake("sizes of the coefficients, not their squares",
                "power is a sum of squares: square the size of each coefficient.",
                lambda values: _power(values, squared=False)),
    ))


def _smooth_curves(n_curves: int = 6) -> Tensor:
    """Random smooth curves over 128 tokens: random walks, lightly averaged."""
    walks = torch.randn(128, n_curves).cumsum(0)
    return torch.nn.functional.avg_pool1d(walks.T[:, None], 5, 1, 2, count_include_pad=False)[:, 0].T


def _null_cases() -> list[Case]:
    t = torch.arange(128.0)
    mixed = torch.stack([torch.cos(2 * torch.pi * 3 * t / 128), t / 64, (t - 40).clamp(min=0) / 40,
                         torch.sin(2 * torch.pi * t / 128) + t / 128, -(t / 128) ** 2], dim=1) + 1.0
    neurons = circuits.token_to_neuron(_noisy_addition(), 0)[:, :24]
    return [("on random smooth curves, frequencies 1-4", (_smooth_curves(), [1, 2, 3, 4])),
            ("on waves, ramps and a bend, frequencies 1-3", (mixed, [1, 2, 3])),
            ("on neurons of a noisy addition checkpoint, frequencies 1-5", (neurons, [1, 2, 3, 4, 5]))]


def _pooled_share(values: Tensor, freqs: list, base: Tensor | None = None, constant: bool = False) -> float:
    power = fourier.frequency_power(values.double()).reshape(values.shape[0] // 2 + 1, -1).sum(-1)
    total = power if base is None else fourier.frequency_power(base.double()).reshape(power.shape[0], -1).sum(-1)
    return (power[list(freqs)].sum() / (total.sum() if constant else total[1:].sum())).item()


check_shares_against_monotone = exercise(
    "5.3", "the spectrum against a smooth null", fourier.shares_against_monotone, function="shares_against_monotone",
    cases=_null_cases, atol=1e-4,
    hint="two numbers from the same recipe: the share of the whole map's variance (every column together, the "
         "constant left out) at the listed frequencies, once for the curves and once for the best monotone curve "
         "through each of them, increasing or decreasing, whichever fits better.",
    mistakes=(
        Mistake("increasing fits only",
                "a neuron that falls with the token is just as monotone: fit both ways and keep the better fit.",
                lambda curves, freqs: (_pooled_share(curves, freqs),
                                       _pooled_share(fourier.isotonic_fit(curves, True), freqs))),
        Mistake("the median of per-curve shares, not the whole map's",
                "pool the power of every column before dividing, as variance_fractions does, so that large "
                "curves count in proportion.",
                lambda curves, freqs: (fourier.low_frequency_share(curves, freqs).median().item(),
                                       fourier.low_frequency_share(fourier.monotone_fit(curves), freqs).median().item())),
        Mistake("the constant counted in the variance",
                "the constant part is not variance: leave frequency 0 out of the denominator.",
                lambda curves, freqs: (_pooled_share(curves, freqs, constant=True),
                                       _pooled_share(fourier.monotone_fit(curves), freqs, constant=True))),
        Mistake("the fits' power divided by the curves' variance",
                "the null's share is a fraction of the null's own variance: divide the fitted curves' power by "
                "the fitted curves' total.",
                lambda curves, freqs: (_pooled_share(curves, freqs),
                                       _pooled_share(fourier.monotone_fit(curves), freqs, base=curves))),
    ))


def _sinusoid_cases() -> list[Case]:
    t = torch.arange(96.0)
    waves = torch.stack([3 + torch.cos(2 * torch.pi * 2 * t / 128 + 1.0), torch.sin(2 * torch.pi * 5 * t / 128),
                         t / 20, 2 + torch.cos(2 * torch.pi * t / 128) + 0.3 * torch.randn(96)], dim=1)
    neurons = circuits.token_to_neuron(_noisy_addition(), 0)[:96, :20]
    return [("on waves and a ramp over tokens 0-95, periods of 128 tokens", (waves, 128, 6)),
            ("on noisy neurons over tokens 0-95, periods of 128 tokens", (neurons, 128, 8)),
            ("on random smooth curves, periods of their own 128 tokens", (_smooth_curves(8), None, 4))]


def _sinusoid_mistake(curves: Tensor, period, max_freq: int, basis: str = "full", own_period: bool = False,
                      uncentred: bool = False) -> tuple[Tensor, Tensor]:
    flat = curves.double()
    t = torch.arange(curves.shape[0], dtype=torch.float64)
    shares = []
    for f in range(1, max_freq + 1):
        angle = 2 * math.pi * f * t / (curves.shape[0] if own_period or period is None else period)
        columns = {"full": [torch.ones_like(t), angle.cos(), angle.sin()], "cosine": [torch.ones_like(t), angle.cos()],
                   "no constant": [angle.cos(), angle.sin()]}[basis]
        fit_basis = torch.stack(columns, dim=1)
        residual = ((flat - fit_basis @ torch.linalg.lstsq(fit_basis, flat).solution) ** 2).sum(0)
        total = (flat ** 2).sum(0) if uncentred else ((flat - flat.mean(0)) ** 2).sum(0)
        shares.append(residual / total)
    shares = torch.stack(shares)
    best = shares.min(0)
    return best.values.to(curves.dtype), best.indices + 1


check_sinusoid_residual = exercise(
    "5.4", "one wave per neuron", fourier.sinusoid_residual, function="sinusoid_residual", cases=_sinusoid_cases,
    atol=1e-4, rtol=1e-3,
    hint="for every frequency up to max_freq fit a constant, a cosine and a sine of that period to each column by "
         "least squares, keep the frequency with the smallest residual, and return the residual as a fraction "
         "of the column's variance, with the frequency.",
    mistakes=(
        Mistake("a cosine without its sine",
                "a wave can start anywhere in its cycle: the sine and the cosine together give it any phase.",
                lambda curves, period, max_freq: _sinusoid_mistake(curves, period, max_freq, basis="cosine")),
        Mistake("waves without a constant",
                "a neuron's curve has an offset; without a constant the fit spends its wave on it.",
                lambda curves, period, max_freq: _sinusoid_mistake(curves, period, max_freq, basis="no constant")),
        Mistake("periods counted over the tokens given, not over `period`",
                "the curves may be only the first, well-sampled tokens of 128: a frequency f means a period of "
                "period / f tokens.",
                lambda curves, period, max_freq: _sinusoid_mistake(curves, period, max_freq, own_period=True)),
        Mistake("the residual over the sum of squares, not the variance",
                "divide by each column's variance around its mean, so that the offset does not count as explained.",
                lambda curves, period, max_freq: _sinusoid_mistake(curves, period, max_freq, uncentred=True)),
    ))


def _group_cases() -> list[Case]:
    groups = torch.randint(0, 12, (40, 30))
    values = 5.0 + torch.randn(12)[groups] + 0.7 * torch.randn(40, 30)
    uneven = torch.cat([torch.zeros(200, dtype=torch.long), torch.arange(1, 21)])
    skewed = 2.0 + uneven.float() / 5 + torch.randn(220)
    diffs = torch.arange(64)[:, None] - torch.arange(64)[None, :]
    wave = 1.0 + torch.cos(2 * torch.pi * diffs / 64) + 0.02 * diffs + 0.2 * torch.randn(64, 64)
    return [("on 12 random groups", (values, groups)), ("on one large group and 20 single ones", (skewed, uneven)),
            ("on a wave of a - b grouped mod 64", (wave, diffs % 64))]


check_explained_by_groups = exercise(
    "5.5", "what the logits depend on", fourier.explained_by_groups, function="explained_by_groups",
    cases=_group_cases, atol=1e-4,
    hint="replace every value by the mean of the values that share its label, and return one minus the variance "
         "left over as a fraction of the variance of the values.",
    mistakes=(
        Mistake("the share left unexplained",
                "the question is how much the label explains: one minus the residual share.",
                lambda values, groups: ((values.double().flatten() - fourier.group_means(values, groups)[0][
                    fourier.group_means(values, groups)[1]]).var() / values.double().var()).item()),
        Mistake("each group's mean counted once, whatever its size",
                "every value is replaced by its group's mean, so a group weighs as many times as it has members.",
                lambda values, groups: (fourier.group_means(values, groups)[0].var() / values.double().var()).item()),
        Mistake("squares about zero, not about the mean",
                "variance is measured around the mean; an offset shared by every value explains nothing.",
                lambda values, groups: 1 - ((values.double().flatten() - fourier.group_means(values, groups)[0][
                    fourier.group_means(values, groups)[1]]) ** 2).mean().item() / (values.double() ** 2).mean().item()),
    ))


def _ablation_cases() -> list[Case]:
    model = _noised(models.load_model("addition"), dict(models.spec("addition").config), 0.02)
    with torch.no_grad():
        model.W_E.mul_(3.0)  # the skip path is small next to the head's maps: enlarge it so that it counts
        model.W_O.div_(3.0)
    tokens, targets = tasks.addition_pairs()
    pick = torch.randperm(len(tokens))[:1500]
    tokens, targets = tokens[pick], targets[pick]
    return [("with every map's sign flipped, exactly", (model, tokens, targets, lambda m: -m, 0)),
            ("keeping frequencies 1-8, within 1", (model, tokens, targets,
                                                   lambda m: fourier.keep_frequencies(m, range(1, 9)), 1)),
            ("with a degree-12 polynomial fit, within 2", (model, tokens, targets,
                                                           lambda m: fourier.polynomial_fit(m, 12), 2))]


def _replaced_accuracy(model, tokens, targets, transform, tolerance, skip: bool = True, measured: bool = True,
                       use_tolerance: bool = True, every_position: bool = False) -> float:
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    pattern = cache["pattern", 0]
    if not measured:
        pattern = torch.tensor([[1.0, 0.0], [0.5, 0.5]]).expand_as(pattern)
    pre = circuits.neuron_inputs(model, tokens, pattern, transform)
    if not skip:  # the skip path put back as it was
        for q in range(tokens.shape[1]):
            pre[:, q] += (circuits.direct_to_neuron(model, q) - transform(circuits.direct_to_neuron(model, q)))[tokens[:, q]]
    logits = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.mlp.hook_pre", lambda x, hook: pre)])
    keep = targets != IGNORE
    close = (logits.argmax(-1) - targets).abs() <= (tolerance if use_tolerance else 0)
    return ((close & keep).sum() / (keep.numel() if every_position else keep.sum())).item()


check_accuracy_with_maps_replaced = exercise(
    "5.6", "ablate the maps, and the null", circuits.accuracy_with_maps_replaced,
    function="accuracy_with_maps_replaced", cases=_ablation_cases, atol=1e-6,
    hint="transform every map that feeds the neurons (through the head from each source position, and the skip "
         "path at each position), rebuild the neurons' inputs with the attention the model actually computes, put "
         "them in place of the MLP's pre-activations, and count the answers within the tolerance at the "
         "positions that have a target.",
    mistakes=(
        Mistake("the skip path left as it was",
                "each position's own token also reaches the neurons around the head; its map is replaced too.",
                lambda *args: _replaced_accuracy(*args, skip=False)),
        Mistake("attention taken as half and half",
                "rebuild the inputs with the pattern the model computes on each pair, not an idealised one.",
                lambda *args: _replaced_accuracy(*args, measured=False)),
        Mistake("the tolerance ignored",
                "an answer within `tolerance` of the target counts as right.",
                lambda *args: _replaced_accuracy(*args, use_tolerance=False)),
        Mistake("position 0 counted as a wrong answer",
                "position 0 has no target (it is IGNORE): count only the positions that have one.",
                lambda *args: _replaced_accuracy(*args, every_position=True)),
    ))


# ------------------------------------------------------------------ chapter 06: fibonacci
def _position_only_cases() -> list[Case]:
    cases = []
    for _ in range(2):
        model = _fresh_model("fibonacci")
        with torch.no_grad():
            model.W_pos.mul_(10)  # a fresh W_pos is tiny; scale it so mistakes stand far above the tolerance
        cases.append(("on a fresh fibonacci model", (model,)))
    return cases


def _pos_scores(model, scale: bool = True, transposed: bool = False, mean_token: bool = False) -> Tensor:
    x = model.W_pos + (model.W_E.mean(0) if mean_token else 0)
    scores = (x @ model.W_Q[0, 0]) @ (x @ model.W_K[0, 0]).T / (model.cfg.d_head ** 0.5 if scale else 1.0)
    return scores.T if transposed else scores


check_positional_qk_scores = exercise(
    "6.1", "the position-only QK circuit", circuits.positional_qk_scores, function="positional_qk_scores",
    kind="implementation", cases=_position_only_cases, atol=1e-4, rtol=1e-3,
    hint="only the positions: each position's embedding through the query weights, against each position's "
         "embedding through the key weights, scaled as the model scales its scores; rows are query positions, "
         "columns key positions, no token embeddings.",
    mistakes=(
        Mistake("the scores without the 1 / sqrt(d_head) scale",
                "the model divides every attention score by the square root of the head dimension.",
                lambda model: _pos_scores(model, scale=False)),
        Mistake("rows and columns swapped",
                "rows are query positions (through W_Q), columns key positions (through W_K).",
                lambda model: _pos_scores(model, transposed=True)),
        Mistake("the mean token embedding added to every position",
                "the question is what the positions alone contribute: leave the token embeddings out.",
                lambda model: _pos_scores(model, mean_token=True)),
    ))


def _noisy_fibonacci(scale: float = 0.15):
    return _noised(models.load_model("fibonacci"), dict(models.spec("fibonacci").config), scale)


def _dropped_cases() -> list[Case]:
    model = _noisy_fibonacci()
    tokens, targets = tasks.fibonacci_sequences()
    pick = torch.randperm(len(tokens))[:1200]
    tokens, targets = tokens[pick], targets[pick]
    return [("with the keys before q - 1 dropped, on a noisy fibonacci checkpoint", (model, tokens, targets, [2, 3, 4])),
            ("with the key q - 1 dropped", (model, tokens, targets, [1])),
            ("with the query's own key dropped", (model, tokens, targets, [0]))]


def _dropped(model, tokens, targets, offsets, renormalise: bool = True, absolute: bool = False,
             every_row: bool = False) -> dict:
    n = tokens.shape[1]
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    mask = torch.zeros(n, n, dtype=torch.bool)
    for d in offsets:
        mask |= (k == d) & (k <= q) if absolute else (q - k) == d

    def hook(pattern, hook):
        kept = pattern.masked_fill(mask, 0.0)
        return kept / kept.sum(-1, keepdim=True) if renormalise else kept

    logits = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", hook)])
    out = {}
    for pos in range(n):
        keep = targets[:, pos] != IGNORE
        if keep.any():
            right = logits[:, pos].argmax(-1) == targets[:, pos]
            share = right.float().mean() if every_row else right[keep].float().mean()
            out[pos] = (share.item(), F.cross_entropy(logits[keep, pos], targets[keep, pos]).item())
    return out


check_accuracy_with_keys_dropped = exercise(
    "6.2", "attend only to the operands", circuits.accuracy_with_keys_dropped, function="accuracy_with_keys_dropped",
    cases=_dropped_cases, atol=1e-4, rtol=1e-3,
    hint="hook the attention pattern; at every query position set the weight on the keys the given distances "
         "back to zero, let the rest of the row add up to one again, and measure accuracy and cross-entropy "
         "at each position over the rows that have a target there.",
    mistakes=(
        Mistake("the weights zeroed but the rows not renormalised",
                "a row of attention must still add up to one, or the head writes a shrunken mix: divide by "
                "what is left.",
                lambda *args: _dropped(*args, renormalise=False)),
        Mistake("key positions dropped, not distances back from the query",
                "an offset d names the key q - d of each query position q, a different key at every position.",
                lambda *args: _dropped(*args, absolute=True)),
        Mistake("the padded rows counted as wrong answers",
                "a sequence that has ended has no target at that position: count only the rows whose target "
                "is not IGNORE.",
                lambda *args: _dropped(*args, every_row=True)),
    ))


def _agreement_pairs() -> list[Case]:
    fib, add = _noisy_fibonacci(0.3), _noised(models.load_model("addition"), dict(models.spec("addition").config), 0.3)
    pairs = tasks.addition_pairs()[0]
    pairs = pairs[torch.randperm(len(pairs))[:2000]]
    return [("on 2,000 pairs, noisy fibonacci against noisy addition", (fib, add, pairs)),
            ("the other way round", (add, fib, pairs))]


def _answers_agree(model, other, pairs, position: int = 1, against_sum: bool = False, disagree: bool = False) -> float:
    mine, theirs = model(pairs)[:, position].argmax(-1), other(pairs)[:, position].argmax(-1)
    same = (mine == pairs.sum(-1)) & (theirs == pairs.sum(-1)) if against_sum else mine == theirs
    return (~same if disagree else same).float().mean().item()


check_answer_agreement = exercise(
    "6.3", "the two models, output for output", circuits.answer_agreement, function="answer_agreement",
    cases=_agreement_pairs, atol=1e-6,
    hint="run both models on the same pairs, take each model's answer (the most likely token) at the position "
         "that predicts the sum, and count how often the two answers are the same.",
    mistakes=(
        Mistake("the answers at position 0 compared",
                "position 0 has seen only the first number; the sum is predicted at position 1.",
                lambda model, other, pairs: _answers_agree(model, other, pairs, position=0)),
        Mistake("the share where both are right",
                "two models can agree on the same wrong answer: compare them with each other, not with the sum.",
                lambda model, other, pairs: _answers_agree(model, other, pairs, against_sum=True)),
        Mistake("the share of disagreement",
                "the question is how often they agree.",
                lambda model, other, pairs: _answers_agree(model, other, pairs, disagree=True)),
    ))


def _match_cases() -> list[Case]:
    fib = circuits.token_to_neuron(_noisy_fibonacci(), 0)[:96, :40]
    add = circuits.token_to_neuron(_noisy_addition(), 0)[:96, :50]
    smooth = _smooth_curves(12) + 3.0 * torch.randn(12)
    return [("on noisy fibonacci neurons against noisy addition neurons", (fib, add)),
            ("on smooth curves with offsets against their negatives and others", (smooth, torch.cat(
                [-smooth[:, :4] + 0.5 * torch.randn(128, 4), _smooth_curves(9) + 5.0], 1)))]


def _matching(curves, others, centred: bool = True, absolute: bool = True, reduce: str = "max") -> Tensor:
    def unit(x):
        x = x.double() - (x.double().mean(0) if centred else 0)
        return x / x.norm(dim=0)
    corr = unit(curves).T @ unit(others)
    corr = corr.abs() if absolute else corr
    return (corr.max(1).values if reduce == "max" else corr.mean(1)).to(curves.dtype)


check_best_match = exercise(
    "6.4", "neuron for neuron", circuits.best_match, function="best_match", cases=_match_cases, atol=1e-4,
    hint="correlate every column of the first map with every column of the second (each centred on its mean and "
         "scaled to length one), and keep, for each column of the first, the largest correlation in size.",
    mistakes=(
        Mistake("the signed correlation",
                "a neuron whose curve is another's upside down reads the same feature; its output weights can "
                "flip the sign: take the size of the correlation.",
                lambda curves, others: _matching(curves, others, absolute=False)),
        Mistake("curves not centred (a cosine similarity)",
                "a correlation is measured around each curve's mean; an offset shared by two curves is no match.",
                lambda curves, others: _matching(curves, others, centred=False)),
        Mistake("the mean correlation, not the best",
                "each neuron is paired with the one other neuron it follows best.",
                lambda curves, others: _matching(curves, others, reduce="mean")),
    ))


def _phase_cases() -> list[Case]:
    neurons = circuits.token_to_neuron(_noisy_addition(), 0)[:, :16]
    odd = _smooth_curves(6)[:127] + 2.0
    return [("on 16 noisy addition neurons", (neurons, 2 * torch.pi * torch.rand(65, 16))),
            ("on smooth curves over 127 tokens", (odd, 2 * torch.pi * torch.rand(64, 6)))]


def _shifted(values, phases, constant: bool = False, replace: bool = False, norms: tuple = ("ortho", "ortho")):
    n = values.shape[0]
    phases = phases.double().clone()
    if not constant:
        phases[0] = 0.0
        if n % 2 == 0:
            phases[-1] = 0.0
    spectrum = torch.fft.rfft(values.double(), dim=0, norm=norms[0])
    turned = torch.polar(spectrum.abs(), phases) if replace else spectrum * torch.polar(torch.ones_like(phases), phases)
    return torch.fft.irfft(turned, n=n, dim=0, norm=norms[1]).to(values.dtype)


check_phase_shifted = exercise(
    "6.5", "a null with the same spectrum", fourier.phase_shifted, function="phase_shifted", kind="implementation",
    cases=_phase_cases, atol=1e-4, rtol=1e-3,
    hint="go to the frequencies with the real FFT along the tokens, turn every coefficient by its angle (a "
         "complex number of size one), leave the constant (and the n / 2 frequency of an even n) alone, and "
         "come back with the inverse FFT at the same length and the same scaling.",
    mistakes=(
        Mistake("the constant (or the n / 2 frequency) turned too",
                "the constant is a real number; turning it changes the mean and throws part of it away.",
                lambda values, phases: _shifted(values, phases, constant=True)),
        Mistake("each coefficient given the angle, not turned by it",
                "turn each coefficient by its angle, so that the angle 0 gives the curve back.",
                lambda values, phases: _shifted(values, phases, replace=True)),
        Mistake("the forward and inverse FFT with different scalings",
                "use the same normalisation both ways, or the curve comes back scaled.",
                lambda values, phases: _shifted(values, phases, norms=("ortho", "backward"))),
    ))


# ------------------------------------------------------------------ chapter 07: paths through the residual stream
def _one_layer_cases() -> list[Case]:
    fresh = _fresh_model("max_of_list")
    with torch.no_grad():
        fresh.W_pos.mul_(20.0)  # a fresh W_pos is tiny: scale it so that forgetting it shows
    n = fresh.cfg.n_ctx
    return [("on a fresh max_of_list model and a random pattern",
             (fresh, torch.randint(0, 64, (5, n)), _random_causal_pattern(5, 1, n))),
            ("on the noisy checkpoint and a random pattern",
             (_noisy_max_of_list(), torch.randint(0, 64, (7, n)), _random_causal_pattern(7, 1, n)))]


def _paths(model, tokens: Tensor, pattern: Tensor, positions: bool = True, transposed: bool = False) -> tuple:
    embedded = model.W_E[tokens] + (model.W_pos[: tokens.shape[1]] if positions else 0)
    mixing = pattern[:, 0].transpose(-1, -2) if transposed else pattern[:, 0]
    head = torch.einsum("bqk,bkd->bqd", mixing, embedded @ model.W_V[0, 0]) @ model.W_O[0, 0] @ model.W_U
    return embedded @ model.W_U, head


@exercise("7.1", "the path expansion of a one-layer model", circuits.one_layer_path_logits, kind="implementation",
          hint="each path starts from the residual stream's input at every position (token and position); the head "
               "mixes the value vectors of the key positions with the pattern's rows, then writes and unembeds; "
               "return the two paths as a tuple, direct first.",
          mistakes=(
              Mistake("W_pos left out", "the residual stream starts as the token embedding plus the positional "
                      "embedding, and both paths carry both.", lambda m, t, p: _paths(m, t, p, positions=False)),
              Mistake("the pattern read with queries and keys swapped",
                      "pattern[b, h, q, k] is how much query q takes from key k: sum over the last axis.",
                      lambda m, t, p: _paths(m, t, p, transposed=True)),
              Mistake("the two paths added into one tensor",
                      "the exercise asks for each path on its own, as a tuple (direct, head): their sum is the "
                      "logits, which the model already gives.", lambda m, t, p: sum(_paths(m, t, p))),
          ))
def check_one_layer_path_logits(fn: Callable, ex: str) -> None:
    spec = _STATE["spec"]
    for where, args in _one_layer_cases():
        with torch.no_grad():
            paths = circuits.one_layer_path_logits(*_copies(args))
        got = call_learner(fn, ex, *_copies(args), hint=spec.hint)
        compare(got, (paths["direct"], paths["head 0"]), f"{ex} {where}", spec.hint, args, atol=1e-3, rtol=1e-3)
    passed(ex)


def _split_cases() -> list[Case]:
    config = dict(models.spec("addition").config)
    noisy = _noised(models.load_model("addition"), config, 0.05)
    fresh = _fresh_model("addition")
    with torch.no_grad():
        fresh.W_in.mul_(3.0)
    pairs = torch.randint(0, 64, (48, 2))
    cases = []
    for where, model in (("on a noisy addition checkpoint", noisy), ("on a fresh addition model", fresh)):
        with torch.no_grad():
            _, cache = model.run_with_cache(pairs)
        x, attn = cache["embed"] + cache["pos_embed"], cache["attn_out", 0]
        cases.append((f"{where}, pieces [x, attn_out]", (model, [x, attn])))
        cases.append((f"{where}, pieces per source token", (model, [x, *circuits.head_pieces(model, cache)])))
    return cases


check_split_mlp_logits = exercise(
    "7.2", "the MLP split over its input's paths", circuits.split_mlp_logits, function="split_mlp_logits",
    cases=_split_cases, atol=1e-3, rtol=1e-3,
    hint="the skip path carries every piece untouched; the MLP (ReLU included) runs once per piece, on that piece "
         "alone, and its outputs are added; the total is unembedded.",
    mistakes=(
        Mistake("the MLP applied once, to the whole input (the exact model, not the split)",
                "the question is what goes wrong when the MLP sees each piece separately: call it once per piece.",
                lambda model, pieces: (sum(pieces) + circuits.mlp_output(model, sum(pieces))) @ model.W_U + model.b_U),
        Mistake("the skip path left out",
                "the residual stream still carries the pieces themselves past the MLP, and the unembedding reads "
                "them too.",
                lambda model, pieces: sum(circuits.mlp_output(model, p) for p in pieces) @ model.W_U + model.b_U),
        Mistake("the MLP without its ReLU",
                "without the non-linearity the split would be exact; the MLP is relu(x W_in + b_in) W_out + b_out.",
                lambda model, pieces: (sum(pieces) + sum(p @ model.W_in[0] @ model.W_out[0] for p in pieces))
                @ model.W_U + model.b_U),
    ))


def _induction_attention_cases() -> list[Case]:
    return [(f"on a random pattern with half = {half}", (_random_causal_pattern(batch, heads, 2 * half), half))
            for batch, heads, half in [(6, 2, 4), (3, 3, 5)]]


def _attention_at(pattern: Tensor, queries: Tensor, keys: Tensor) -> Tensor:
    return pattern[:, :, queries, keys].mean(dim=(0, 2))


check_induction_attention = exercise(
    "7.3", "induction attention", circuits.induction_attention, function="induction_attention",
    kind="implementation", cases=_induction_attention_cases, atol=1e-6,
    hint="only the queries of the second copy count; each looks at the position just after its own token's earlier "
         "occurrence, half positions back plus one; average over the batch and those queries, one number per head.",
    mistakes=(
        Mistake("the previous position (a previous-token head's key)",
                "an induction head looks at what came after the earlier copy of the current token, not at the "
                "position just before the query.",
                lambda p, half: _attention_at(p, torch.arange(half, p.shape[-1]), torch.arange(half, p.shape[-1]) - 1)),
        Mistake("the earlier occurrence of the same token",
                "the head copies the token that followed the earlier occurrence, one position later.",
                lambda p, half: _attention_at(p, torch.arange(half, p.shape[-1]), torch.arange(half, p.shape[-1]) - half)),
        Mistake("the last query of the first copy counted too",
                "only queries in the second copy (from position half on) have an earlier occurrence to look back to.",
                lambda p, half: _attention_at(p, torch.arange(half - 1, p.shape[-1]),
                                              torch.arange(half - 1, p.shape[-1]) - half + 1)),
    ))


def _patch_cases() -> list[Case]:
    config = dict(models.spec("induction").config)
    noisy = _noised(models.load_model("induction"), config, 0.05)
    tokens, _ = tasks.induction_batch(32)
    corrupted, _ = tasks.induction_batch(32)
    return [("from both layer-0 heads into both layer-1 heads", (noisy, tokens, corrupted, [0, 1], [0, 1])),
            ("from layer-0 head 1 into layer-1 head 0 only", (noisy, tokens, corrupted, [1], [0])),
            ("from layer-0 head 0 into layer-1 head 1 only", (noisy, tokens, corrupted, [0], [1]))]


def _patched_everywhere(model, tokens, corrupted, sources, targets) -> Tensor:
    names = lambda name: name == "blocks.0.attn.hook_z"  # noqa: E731
    _, clean = model.run_with_cache(tokens, names_filter=names)
    _, dirty = model.run_with_cache(corrupted, names_filter=names)
    change = sum((dirty["z", 0][:, :, h] - clean["z", 0][:, :, h]) @ model.W_O[0, h] for h in sources)
    return model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", lambda resid, hook: resid + change)])


def _patched_into(model, tokens, corrupted, sources, targets, reader: str = "k", zero: bool = False) -> Tensor:
    """The path patch written out again (a mistake may not call the reference): layer-0 heads into layer-1 `reader`s."""
    _, clean = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_z")
    _, dirty = model.run_with_cache(corrupted, names_filter="blocks.0.attn.hook_z")
    change = sum(((0 if zero else dirty["z", 0][:, :, h]) - clean["z", 0][:, :, h]) @ model.W_O[0, h] for h in sources)
    weights = {"q": model.W_Q, "k": model.W_K}[reader]

    def hook(activation: Tensor, hook) -> Tensor:
        activation = activation.clone()
        for h in targets:
            activation[:, :, h] += change @ weights[1, h]
        return activation

    return model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.1.attn.hook_{reader}", hook)])


check_patch_key_path = exercise(
    "7.4", "patch one path: into the induction head's keys", circuits.patch_key_path, function="patch_key_path",
    cases=_patch_cases, atol=1e-3, rtol=1e-3,
    hint="the layer-1 key is a linear function of the residual stream, which is a sum: swapping one term of that "
         "sum changes the key by the difference of the two versions of the term, passed through the key weights of "
         "the target heads only; the queries, the values and the other heads keep the clean stream.",
    mistakes=(
        Mistake("the patch put into the queries",
                "the path under test ends in the keys of the layer-1 heads: the query reads the current token, the "
                "key reads what the previous-token head wrote.",
                lambda *args: _patched_into(*args, reader="q")),
        Mistake("the layer-0 output replaced on every path into layer 1 (queries and values too)",
                "patch one path only: the layer-1 input stays clean for the queries, the values and the logits.",
                _patched_everywhere),
        Mistake("every layer-1 head patched, not only the target heads",
                "the other layer-1 heads keep their clean keys: the path ends in the target heads.",
                lambda model, tokens, corrupted, sources, targets: _patched_into(
                    model, tokens, corrupted, sources, list(range(model.cfg.n_heads)))),
        Mistake("the layer-0 output removed from the keys (zero-ablated) instead of replaced",
                "a patch swaps the clean output for the output on the corrupted tokens, so the key still gets a "
                "previous-token signal of the usual size, only the wrong one.",
                lambda *args: _patched_into(*args, zero=True)),
    ))


def _attribution_cases() -> list[Case]:
    config = dict(models.spec("induction").config)
    noisy = _noised(models.load_model("induction"), config, 0.1)
    tokens, targets = tasks.induction_batch(24)
    starts, lengths = torch.randint(0, 6, (24,)), torch.randint(3, 9, (24,))
    moved, moved_targets = tasks.repeated_stretch_batch(starts, lengths)
    return [("on a noisy induction checkpoint", (noisy, tokens, targets)),
            ("on repeats of 3-8 tokens placed anywhere", (noisy, moved, moved_targets))]


def _attribution(model, tokens: Tensor, targets: Tensor, read: str = "centred", answer: str = "target") -> dict:
    keep = targets != IGNORE
    _, cache = model.run_with_cache(tokens)
    wanted = (targets if answer == "target" else tokens)[keep][:, None]
    out = {}
    for name, part in circuits.residual_components(model, cache).items():
        logits = part[keep] @ model.W_U
        if read == "norm":
            out[name] = part[keep].norm(dim=-1).mean().item()
            continue
        if read == "centred":
            logits = logits - logits.mean(-1, keepdim=True)
        out[name] = logits.gather(-1, wanted).mean().item()
    return out


check_correct_logit_attribution = exercise(
    "7.5", "who writes the answer?", circuits.correct_logit_attribution, function="correct_logit_attribution",
    cases=_attribution_cases, atol=1e-3, rtol=1e-3,
    hint="split the final residual stream into its terms (the two embeddings and every head's output); unembed "
         "each term, subtract its mean over the vocabulary, read it at the target token, and average over the "
         "positions that have a target.",
    mistakes=(
        Mistake("the logit not centred on its mean over the vocabulary",
                "adding the same amount to every logit changes no prediction: a term helps the answer only by what "
                "it gives the target more than the average token.",
                lambda *args: _attribution(*args, read="raw")),
        Mistake("the current token's logit, not the target's",
                "the model predicts the next token: read each position's logits at its target, not at the token "
                "it holds.", lambda *args: _attribution(*args, answer="token")),
        Mistake("each term's norm, not its logit",
                "a large vector can write nothing the unembedding reads: measure what each term adds to the correct "
                "logit, not how long it is.", lambda *args: _attribution(*args, read="norm")),
    ))


# ------------------------------------------------------------------ chapter 08: from circuits to a proof


def _tied_lists(n: int = 6, below: int = 8, count: int = 300) -> Tensor:
    """Random lists of small tokens, so that most of them hold their maximum more than once."""
    return torch.randint(0, below, (count, n))


def _on_max_cases() -> list[Case]:
    return [("on a noisy checkpoint, lists of 6 tokens below 8 (many ties)", (_noisy_max_of_list(0.3), _tied_lists())),
            ("on a fresh model, lists of 4 tokens below 5", (_fresh_model("max_of_list"), _tied_lists(4, 5)))]


def _pattern_logits(model, lists: Tensor, wanted: Tensor) -> Tensor:
    def replace(pattern, hook):
        pattern = pattern.clone()
        pattern[:, :, -1] = wanted[:, None]
        return pattern
    return model.run_with_hooks(lists, fwd_hooks=[("blocks.0.attn.hook_pattern", replace)])[:, -1]


def _one_copy(lists: Tensor, last: bool) -> Tensor:
    is_max = lists == lists.max(-1, keepdim=True).values
    index = (is_max.long() * torch.arange(1, lists.shape[1] + 1)).argmax(-1) if last else is_max.long().argmax(-1)
    return F.one_hot(index, lists.shape[1]).float()


check_logits_attention_on_max = exercise(
    "8.1", "the attention replaced by the explanation", proofs.logits_attention_on_max,
    function="logits_attention_on_max", cases=_on_max_cases, atol=1e-4,
    hint="hook the attention pattern and overwrite the last query's row: equal weight on every position that holds "
         "the list's maximum, zero elsewhere; return the logits at the last position.",
    mistakes=(
        Mistake("all the attention on the first copy of the maximum",
                "a tied maximum sits at several positions, and each copy reads its own OV row: share the weight "
                "equally between them.", lambda model, lists: _pattern_logits(model, lists, _one_copy(lists, False))),
        Mistake("all the attention on the last copy of the maximum",
                "a tied maximum sits at several positions: share the weight equally between them.",
                lambda model, lists: _pattern_logits(model, lists, _one_copy(lists, True))),
        Mistake("uniform attention over every key",
                "the explanation says the head attends to the maximum, not to every key alike.",
                lambda model, lists: _pattern_logits(model, lists, torch.full(lists.shape, 1 / lists.shape[1]))),
        Mistake("the model's own logits (the pattern not replaced)",
                "a hook changes the run only if it returns the new pattern (or writes into it) at the pattern's "
                "hook point, layer 0.", lambda model, lists: model(lists)[:, -1]),
    ))


def _brute_cases() -> list[Case]:
    return [("on a noisy checkpoint, lists of length 2", (_noisy_max_of_list(0.4), 2)),
            ("on a very noisy checkpoint, lists of length 2", (_noisy_max_of_list(0.8), 2)),
            ("on a noisy checkpoint, lists of length 3", (_noisy_max_of_list(0.5), 3))]


def _brute(model, n: int, target: str = "max", position: int = -1, skip_ties: bool = False) -> float:
    lists = tasks.all_lists(n, model.cfg.d_vocab)
    logits = torch.cat([model(chunk)[:, position] for chunk in lists.split(20_000)])
    answer = {"max": lists.max(-1).values, "last": lists[:, -1], "prefix": lists[:, : position % n + 1].max(-1).values}
    right = logits.argmax(-1) == answer[target]
    if skip_ties:
        top = lists.topk(2, -1).values
        right = right[top[:, 0] != top[:, 1]]
    return right.float().mean().item()


check_brute_force_accuracy = exercise(
    "8.2", "brute force", proofs.brute_force_accuracy, function="brute_force_accuracy",
    cases=_brute_cases, atol=1e-6,
    hint="every list of length n over the whole vocabulary, in batches; the answer is the logit argmax at the last "
         "position, right when it is the list's maximum; the share of right answers over all of them.",
    mistakes=(
        Mistake("the answer compared with the last token, not the maximum",
                "the model predicts the largest value of the list, wherever it sits.",
                lambda model, n: _brute(model, n, target="last")),
        Mistake("the prediction read at the first position",
                "the list's answer is read where the whole list is in view: the last position.",
                lambda model, n: _brute(model, n, target="max", position=0)),
        Mistake("the lists with a tied maximum left out",
                "a brute force runs every input: ties are lists too (and the easy ones).",
                lambda model, n: _brute(model, n, skip_ties=True)),
    ))


def _cell_cases() -> list[Case]:
    noisy = _noisy_max_of_list(0.2)
    return [("on a noisy checkpoint, length 4, other tokens <= 40", (noisy, 4, 40)),
            ("on a noisy checkpoint, length 6, other tokens <= 12", (noisy, 6, 12)),
            ("on a fresh model, length 3, other tokens <= 25", (_fresh_model("max_of_list"), 3, 25))]


def _attention(model, n: int, lo: int, own_key: bool = True, every_rival: bool = True, least: bool = True,
               phantom: bool = False) -> Tensor:
    """least_attention_on_max as a learner might compute it, with one slip or none."""
    scores = proofs.circuit_pieces(model, n)[0]
    vocab, q = scores.shape[0], n - 1
    t, m = torch.arange(vocab)[:, None], torch.arange(vocab)[None, :]
    best = scores[:, :q, : lo + 1].amax(-1)  # [t, k]: the largest rival score at each position
    own = scores[:, q].diagonal()  # [t]
    total = best.exp().sum(-1) if every_rival else best.amax(-1).exp()  # [t]
    at_query = own.exp() / (own.exp() + total)  # [t]: t = m, every earlier position a rival
    before = scores[:, :q]  # [t, j, m]: the maximum at position j
    mine = best.exp()[:, :, None] if every_rival and not phantom else 0.0  # the rival the maximum displaces
    others = total[:, None, None] - mine
    others = others + (own.exp()[:, None, None] if own_key else 0)
    share = before.exp() / (before.exp() + others)
    share = share.amin(1) if least else share.amax(1)
    out = torch.where(t == m, at_query[:, None], share)
    return torch.where((m > lo) & ((t == m) | (t <= lo)), out, torch.zeros((), dtype=out.dtype))


check_least_attention_on_max = exercise(
    "8.3", "the least attention on the maximum", proofs.least_attention_on_max, function="least_attention_on_max",
    cases=_cell_cases, atol=1e-5,
    hint="the maximum's share is its weight over all the weights; it is least with one copy of the maximum at its "
         "worst position and the largest-scoring rival at every other position, the query's own key included when "
         "it is not the maximum.",
    mistakes=(
        Mistake("a rival counted at the maximum's own position",
                "when the last token is not the maximum, the maximum sits at one of the earlier positions, and that "
                "position cannot hold a rival too: the rivals fill the other positions only.",
                lambda *args: _attention(*args, phantom=True)),
        Mistake("the query's own key left out of the denominator",
                "the last position attends to itself too: when the last token is not the maximum, its key takes "
                "a share.", lambda *args: _attention(*args, own_key=False)),
        Mistake("a single rival key instead of one per position",
                "every position before the query can hold a rival, and each takes its own share.",
                lambda *args: _attention(*args, every_rival=False)),
        Mistake("the maximum at its best position, not its worst",
                "a bound must hold wherever the maximum sits: take the position where its share is least.",
                lambda *args: _attention(*args, least=False)),
    ))


def _margin(model, n: int, lo: int, direct: bool = True, capped: bool = True, query_row: bool = True,
            max_at_query: bool = True) -> Tensor:
    """least_margin as a learner might compute it, with one slip or none."""
    scores, ov, d_table = proofs.circuit_pieces(model, n)
    vocab, q = scores.shape[0], n - 1
    tokens = torch.arange(vocab)
    lead = ov[:, :, :, None] - ov[:, :, None, :]
    own = lead[:, tokens, tokens]
    a_any, a_last = own[:q].amin(0), (own.amin(0) if max_at_query else own[:q].amin(0))
    b_rest = lead[:q, : lo + 1].amin((0, 1))
    p = proofs.least_attention_on_max(model, n, lo)
    out = torch.full((vocab, vocab), torch.inf)
    for t in range(vocab):
        a = torch.where((tokens == t)[:, None], a_last, a_any)
        b = b_rest if not query_row else torch.where((tokens == t)[:, None], b_rest, torch.minimum(b_rest, lead[q, t]))
        d = (d_table[t, tokens, None] - d_table[t][None, :]) if direct else torch.zeros(vocab, vocab)
        mixed = p[t][:, None] * a + (1 - p[t][:, None]) * b
        margin = d + (torch.minimum(mixed, a) if capped else mixed)
        out[t] = margin.masked_fill(torch.eye(vocab, dtype=torch.bool), torch.inf).amin(-1)
    fits = (tokens[None] > lo) & ((tokens[:, None] == tokens[None]) | (tokens[:, None] <= lo))
    return out.masked_fill(~fits, torch.inf)


check_least_margin = exercise(
    "8.4", "the least margin of a cell", proofs.least_margin, function="least_margin",
    cases=_cell_cases, atol=1e-4,
    hint="for each rival, the direct path's lead plus the attention-weighted lead of the OV rows: the maximum's rows "
         "at their worst, the other tokens' rows (the query's own included) at their worst, mixed by the least share "
         "on the maximum, but never counted as better than the maximum's own rows alone; the least over rivals.",
    mistakes=(
        Mistake("the direct path left out",
                "the query token's embedding reaches the logits around the head, and its lead (or deficit) counts "
                "in every cell.", lambda *args: _margin(*args, direct=False)),
        Mistake("the mix trusted when the other tokens lead more than the maximum",
                "the real share on the maximum can be anything above the least one; when the other rows lead by "
                "more, a larger share makes the margin worse, so the worst case is then the maximum's rows alone.",
                lambda *args: _margin(*args, capped=False)),
        Mistake("the query token's own OV row left out",
                "when the last token is not the maximum, the query attends to its own key too and its row counts "
                "among the others.", lambda *args: _margin(*args, query_row=False)),
        Mistake("the maximum's row at the query position left out when the last token is the maximum",
                "when the list ends with its maximum, that copy sits at the query position and reads that "
                "position's OV row.", lambda *args: _margin(*args, max_at_query=False)),
    ))


def _largest_tables() -> Tensor:
    vocab = tasks.MAX_OF_LIST_VOCAB
    t, m = torch.arange(vocab)[:, None], torch.arange(vocab)[None, :]
    lo = m - torch.randint(1, 6, (vocab, vocab))
    return torch.where((m >= t) & ((t == m) | (lo >= t)), lo, torch.full_like(lo, -2))


def _count_cases() -> list[Case]:
    return [("on a random table of certified cells, length 3", (_largest_tables(), 3)),
            ("on a random table of certified cells, length 6", (_largest_tables(), 6))]


def _count(largest: Tensor, n: int, at_least_one: bool = True, with_max: bool = True, exponent: int = -1) -> int:
    vocab, total = largest.shape[0], 0
    q = n - 1 if exponent == -1 else n
    for t in range(vocab):
        for m in range(t, vocab):
            lo = int(largest[t, m])
            if lo < -1:
                continue
            base = lo + 2 if with_max else lo + 1
            total += base**q if (t == m or not at_least_one) else base**q - (base - 1) ** q
    return total


check_certified_count = exercise(
    "8.5", "count, do not run", proofs.certified_count, function="certified_count", kind="implementation",
    cases=_count_cases, atol=0.5,
    hint="in a certified cell the last token is fixed and every earlier position holds the maximum or a token no "
         "larger than the cell's bound; when the last token is not the maximum, the maximum must appear at least "
         "once among them.",
    mistakes=(
        Mistake("the lists without the maximum counted too",
                "when the last token is not the maximum, a list of the cell must hold the maximum somewhere before "
                "it: leave out the lists where no earlier position does.",
                lambda largest, n: _count(largest, n, at_least_one=False)),
        Mistake("the maximum not counted among the values of the earlier positions",
                "an earlier position may hold another copy of the maximum as well as a small token.",
                lambda largest, n: _count(largest, n, with_max=False)),
        Mistake("the last position counted as free",
                "the last token is the cell's own: only the positions before it are free.",
                lambda largest, n: _count(largest, n, exponent=n)),
    ))


# ------------------------------------------------------------------ the originals, taken once
_MISSING = object()
# (not all of builtins: ipykernel swaps `input` in and out around every cell)
_GUARDED_BUILTINS = {"abs", "all", "any", "bool", "callable", "dict", "float", "getattr", "hasattr", "int",
                     "isinstance", "issubclass", "len", "list", "max", "min", "range", "round", "set", "sorted", "str",
                     "sum", "tuple", "type", "zip", "Exception", "NotImplementedError"}
_GUARDED_MODULES = (sys.modules[__name__], circuits, fourier, models, proofs, tasks, train, torch, torch.linalg, torch.fft, F,
                    math, builtins)
_ORIGINALS = _guarded_objects()
