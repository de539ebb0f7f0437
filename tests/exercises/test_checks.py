"""Every exercise checker accepts the reference solution and rejects typical learner mistakes.

A rejection is always a ``CheckFailed`` with one short paragraph for the learner: the
exercise label, what went wrong and a hint. Never a raw exception or a traceback.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types

import pytest
import torch
import torch.nn.functional as F

from utils import checks
from utils.checks import engine
from utils import circuits as _circuits, fourier as _fourier, models as _models, tasks as _tasks, train as _train
from utils import mysteries as _mysteries, proofs as _proofs, residual_paths as _residual_paths
from utils import superposition as _superposition
from utils.checks import CheckFailed


class _Unwatched(types.SimpleNamespace):
    """A utils module whose functions are copies with code objects of their own.

    A checker fails a learner's function that calls its exercise's reference. The mistakes
    below start from the reference and distort it, and the references stand in for a right
    answer; through these copies (which call each other, not the originals) the checkers
    judge them on their results.
    """

    def __init__(self, module) -> None:
        namespace = dict(vars(module))
        for name, value in vars(module).items():
            if isinstance(value, types.FunctionType) and value.__module__ == module.__name__:
                value = inspect.unwrap(value)  # a @torch.no_grad() function: copy the function it wraps
                code = value.__code__.replace(co_name=f"{name}_copy", co_qualname=f"{name}_copy")
                namespace[name] = types.FunctionType(code, namespace, name, value.__defaults__, value.__closure__)
                namespace[name].__kwdefaults__ = value.__kwdefaults__
        super().__init__(**{k: v for k, v in namespace.items() if not k.startswith("__")})


circuits, fourier, models, tasks, train = map(_Unwatched, (_circuits, _fourier, _models, _tasks, _train))
proofs, residual_paths, superposition, mysteries = map(_Unwatched, (_proofs, _residual_paths, _superposition, _mysteries))

IGNORE = tasks.IGNORE
NAN = float("nan")

_UNWATCHED = {module.__name__: copy for module, copy in [(_circuits, circuits), (_fourier, fourier), (_models, models),
                                                           (_tasks, tasks), (_train, train), (_proofs, proofs),
                                                           (_residual_paths, residual_paths),
                                                           (_superposition, superposition), (_mysteries, mysteries)]}
# references that are not the spec's own: full_ov returns a FactoredMatrix, the learner returns a tensor; the
# one-layer path expansion is defined below
_OTHER_REFERENCES = {"full_ov_circuit": lambda model: model.W_E @ model.W_V[0, 0] @ model.W_O[0, 0] @ model.W_U,
                     "one_layer_path_logits": lambda m, t, p: paths_right(m, t, p)}


def _unwatched_reference(spec):
    reference = spec.references[0]
    return getattr(_UNWATCHED[reference.__module__], reference.__name__)


# check name -> (checker, reference implementation, exercise label), one entry per exercise spec
CHECKS = {spec.function: (spec.check, _OTHER_REFERENCES.get(spec.function) or _unwatched_reference(spec),
                          f"Exercise {spec.number}") for spec in checks.EXERCISES.values()}


@pytest.fixture(autouse=True)
def _seed():
    """The checkers draw fresh random inputs; fix the seed so every run tests the same inputs."""
    torch.manual_seed(0)


def test_every_checker_is_covered():
    defined = {name[len("check_"):] for name in dir(checks) if name.startswith("check_")}
    assert defined == set(CHECKS)


def _named(check_name: str, looks_like: str):
    """The spec's own named mistake of exercise `check_name` that starts with `looks_like`."""
    spec = CHECKS[check_name][0]
    [mistake] = [m for m in next(s for s in checks.EXERCISES.values() if s.check is spec).mistakes
                 if m.looks_like.startswith(looks_like)]
    return mistake.gives


def _fails(check_name: str, fn) -> str:
    """Run the checker on `fn`; return the CheckFailed message after the common format checks."""
    check, _, label = CHECKS[check_name]
    with pytest.raises(CheckFailed) as excinfo:
        check(fn)
    message = str(excinfo.value)
    assert label in message, message
    assert "\n" not in message, f"not a single paragraph: {message!r}"
    assert len(message) < 700, f"too long ({len(message)} chars): {message}"
    err = excinfo.value
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), "chained traceback"
    return message


# ------------------------------------------------------------------ (a) the reference passes
@pytest.mark.parametrize("check_name", list(CHECKS))
def test_reference_passes(check_name, capsys):
    check, reference, label = CHECKS[check_name]
    check(reference)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("✓") and label in out[0], out


# ------------------------------------------------------------------ (b) typical mistakes
# Exercise 0.1: residual_from_components(model, cache)
def _layers_sum(model, cache, mlp: bool = True):
    total = 0
    for layer in range(model.cfg.n_layers):
        total = total + cache["attn_out", layer]
        if mlp and not model.cfg.attn_only:
            total = total + cache["mlp_out", layer]
    return total


def resid_mlp_even_if_attn_only(model, cache):
    return cache["hook_embed"] + cache["hook_pos_embed"] + sum(
        cache["attn_out", layer] + cache["mlp_out", layer] for layer in range(model.cfg.n_layers))


# Exercise 0.2: attention_pattern(q, k)
def _pattern(q, k, scale=True, mask=True, dim=-1):
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k)
    if scale:
        scores = scores / math.sqrt(q.shape[-1])
    if mask:
        n = q.shape[1]
        scores = scores.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
    return scores.softmax(dim=dim)


def pattern_transposed(q, k):
    return _pattern(q, k).transpose(-1, -2)


def pattern_heads_last(q, k):
    return _pattern(q, k).permute(0, 2, 3, 1)  # [batch, query, key, head]


def pattern_mask_includes_diagonal_wrongly(q, k):
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    n = q.shape[1]
    return scores.masked_fill(torch.tril(torch.ones(n, n, dtype=torch.bool), -1), float("-inf")).softmax(-1)


# Exercise 0.5: rotate_residual_stream(state, R)
def _rotate(state, R, writes=lambda w, R: R.T @ w, skip=()):
    out = {}
    for key, w in state.items():
        if key in skip or any(key.endswith(s) for s in skip):
            out[key] = w.clone()
        elif key.endswith(("attn.o.weight", "mlp.out.weight")):
            out[key] = writes(w, R)
        elif key.endswith(("attn.o.bias", "mlp.out.bias")):
            out[key] = w @ R
        elif key.endswith(("embed.weight", "unembed.weight", "q.weight", "k.weight", "v.weight", "mlp.in.weight")):
            out[key] = w @ R
        else:
            out[key] = w.clone()
    return out


def rotate_writers_on_wrong_side(state, R):
    return _rotate(state, R, writes=lambda w, R: w @ R)


def rotate_forgets_pos_embed(state, R):
    return _rotate(state, R, skip=("pos_embed.weight",))


def rotate_forgets_unembed(state, R):
    return _rotate(state, R, skip=("unembed.weight",))


def rotate_returns_list(state, R):
    return list(_rotate(state, R).values())


def rotate_drops_untouched_keys(state, R):
    return {k: v for k, v in _rotate(state, R).items() if not k.endswith(("q.bias", "k.bias", "v.bias"))}


# Exercise 1.1: max_of_list_targets(tokens)
def max_returns_list(tokens):
    return tasks.max_of_list_targets(tokens).tolist()


def max_float(tokens):
    return tasks.max_of_list_targets(tokens).float()


# Exercise 1.2: fibonacci_targets(tokens, max_value)
def fib_forgets_last(tokens, max_value):  # reads x[i+1] off the input: nothing after the last token
    targets = torch.full_like(tokens, IGNORE)
    nxt = tokens[..., 1:]
    targets[..., :-1] = torch.where(nxt <= max_value, nxt, IGNORE)
    targets[..., 0] = IGNORE
    return targets


def fib_forgets_position_0(tokens, max_value):
    targets = tasks.fibonacci_targets(tokens, max_value)
    targets[..., 0] = tokens[..., 1]
    return targets


def fib_greater_or_equal(tokens, max_value):
    targets = tasks.fibonacci_targets(tokens, max_value)
    return torch.where(targets == max_value, IGNORE, targets)


def fib_assumes_five_tokens(tokens, max_value):  # indexes positions 1-4 by hand: fails on shorter sequences
    nxt = torch.stack([torch.full_like(tokens[:, 0], IGNORE)] + [tokens[:, i - 1] + tokens[:, i] for i in range(1, 5)], 1)
    return torch.where(tasks.fibonacci_targets(tokens, max_value) == IGNORE, IGNORE, nxt)


# Exercise 1.3: train_step(model, optimizer, tokens, targets)
def step_no_ignore_index(model, optimizer, tokens, targets):
    optimizer.zero_grad()
    loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
    loss.backward()
    optimizer.step()
    return loss.item()


def step_summed_loss(model, optimizer, tokens, targets):
    optimizer.zero_grad()
    loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    loss.backward()
    optimizer.step()
    return loss.item()


def step_no_optimizer_step(model, optimizer, tokens, targets):
    optimizer.zero_grad()
    loss = train.loss_fn(model(tokens), targets)
    loss.backward()
    return loss.item()


def step_returns_tensor(model, optimizer, tokens, targets):
    optimizer.zero_grad()
    loss = train.loss_fn(model(tokens), targets)
    loss.backward()
    optimizer.step()
    return loss


def step_zero_grad_after_backward(model, optimizer, tokens, targets):
    loss = train.loss_fn(model(tokens), targets)
    loss.backward()
    optimizer.zero_grad()
    optimizer.step()
    return loss.item()


# chapter 02
def direct_logits_as_probabilities(model, tokens):
    return ((model.W_E[tokens[:, -1]] + model.W_pos[tokens.shape[1] - 1]) @ model.W_U + model.b_U).softmax(-1)


def direct_logits_every_position(model, tokens):
    return (model.W_E[tokens] + model.W_pos[:tokens.shape[1]]) @ model.W_U + model.b_U


def boosts_as_list(model, tokens):
    return list(circuits.logit_boosts(model, tokens))


def boosts_swapped(model, tokens):
    return circuits.logit_boosts(model, tokens)[::-1]


def ablation_full_logits(model, tokens):
    return model(tokens)[:, -1]


def ablation_every_position(model, tokens):
    _, cache = model.run_with_cache(tokens)
    embeddings = cache["resid_pre", 0]
    return (cache["attn_out", 0] + embeddings.mean(0)) @ model.W_U + model.b_U


# chapter 03
def ov_factored(model):
    return circuits.full_ov(model)  # a FactoredMatrix, not a tensor


# chapter 04
# chapter 05: token_to_neuron(model, source_pos), frequency_power(values)
def t2n_uses_unembed(model, source_pos):
    return (model.W_E + model.W_pos[source_pos]) @ model.W_V[0, 0] @ model.W_O[0, 0] @ model.W_U


def t2n_transposed(model, source_pos):
    return circuits.token_to_neuron(model, source_pos).T


def t2n_uses_w_out(model, source_pos):
    return (model.W_E + model.W_pos[source_pos]) @ model.W_V[0, 0] @ model.W_O[0, 0] @ model.W_out[0].T


# chapter 06: positional_qk_scores(model) (the spec names the other exercises' mistakes)
def posqk_token_circuit(model):
    return circuits.full_qk_positional(model, 0, 0)  # [vocab, vocab]: tokens, not positions


# chapter 07: one_layer_path_logits(model, tokens, pattern) (the spec names the other exercises' mistakes)
def paths_right(model, tokens, pattern):
    embedded = model.W_E[tokens] + model.W_pos[: tokens.shape[1]]
    head = torch.einsum("bqk,bkd->bqd", pattern[:, 0], embedded @ model.W_V[0, 0]) @ model.W_O[0, 0] @ model.W_U
    return embedded @ model.W_U, head


def paths_without_w_o(model, tokens, pattern):
    embedded = model.W_E[tokens] + model.W_pos[: tokens.shape[1]]
    head = torch.einsum("bqk,bkd->bqd", pattern[:, 0], embedded @ model.W_V[0, 0]) @ model.W_U[: model.cfg.d_head]
    return embedded @ model.W_U, head


MISTAKES = [
    ("one_layer_path_logits", paths_without_w_o),
    ("token_to_neuron", t2n_uses_unembed),
    ("token_to_neuron", t2n_transposed),
    ("token_to_neuron", t2n_uses_w_out),
    ("positional_qk_scores", posqk_token_circuit),
    ("full_ov_circuit", ov_factored),
    ("direct_path_logits", direct_logits_as_probabilities),
    ("direct_path_logits", direct_logits_every_position),
    ("logit_boosts", boosts_as_list),
    ("logit_boosts", boosts_swapped),
    ("logits_without_direct_path", ablation_full_logits),
    ("logits_without_direct_path", ablation_every_position),
    ("attention_pattern", pattern_transposed),
    ("attention_pattern", pattern_heads_last),
    ("attention_pattern", pattern_mask_includes_diagonal_wrongly),
    ("rotate_residual_stream", rotate_writers_on_wrong_side),
    ("rotate_residual_stream", rotate_forgets_pos_embed),
    ("rotate_residual_stream", rotate_forgets_unembed),
    ("rotate_residual_stream", rotate_returns_list),
    ("rotate_residual_stream", rotate_drops_untouched_keys),
    ("max_of_list_targets", max_returns_list),
    ("max_of_list_targets", max_float),
    ("fibonacci_targets", fib_forgets_last),
    ("fibonacci_targets", fib_forgets_position_0),
    ("fibonacci_targets", fib_greater_or_equal),
    ("fibonacci_targets", fib_assumes_five_tokens),
    ("train_step", step_no_optimizer_step),
    ("train_step", step_returns_tensor),
    ("train_step", step_zero_grad_after_backward),
    ("train_step", step_summed_loss),
]


def test_every_checker_has_three_mistakes():
    """Mistakes fed here, or named in the exercise's spec (tests/exercises/test_exercises.py feeds those)."""
    for check_name, (_, _, label) in CHECKS.items():
        named = len(checks.EXERCISES[label.removeprefix("Exercise ")].mistakes)
        assert sum(c == check_name for c, _ in MISTAKES) + named >= 3, check_name


@pytest.mark.parametrize("check_name, mistake", [pytest.param(c, m, id=m.__name__) for c, m in MISTAKES])
def test_mistake_rejected_with_hint(check_name, mistake):
    message = _fails(check_name, mistake)
    assert "Hint" in message or "This looks like" in message, message


def test_residual_mistake_specific_to_mlp_models_is_caught():
    """Adding mlp_out even for attention-only models is a crash (no such hook), reported as a CheckFailed."""
    _fails("residual_from_components", resid_mlp_even_if_attn_only)


def test_loss_without_ignore_index_is_rejected():
    """Without ignore_index, F.cross_entropy crashes on the -1 targets: reported as CheckFailed naming the error."""
    message = _fails("train_step", step_no_ignore_index)
    assert "IndexError" in message or "RuntimeError" in message, message


def test_loss_without_ignore_index_gets_a_hint():
    message = _fails("train_step", step_no_ignore_index)
    assert "Hint" in message and "ignore_index" in message, message


def test_mistake_messages_are_specific():
    """The messages point at the actual problem, not just 'wrong'."""
    assert "got list" in _fails("max_of_list_targets", max_returns_list)
    assert "dtype" in _fails("max_of_list_targets", max_float)
    assert "got a Tensor" in _fails("train_step", step_returns_tensor)
    assert "pos_embed.weight" in _fails("rotate_residual_stream", rotate_forgets_pos_embed)
    assert "attn.o.weight" in _fails("rotate_residual_stream", _named("rotate_residual_stream", "R where R.T"))
    assert "shape" in _fails("attention_pattern", pattern_heads_last)
    assert "padding" in _fails("fibonacci_targets", _named("fibonacci_targets", "targets on the padding"))
    assert "IndexError" in _fails("fibonacci_targets", fib_assumes_five_tokens)


# ------------------------------------------------------------------ (c) stubs, (d) crashes
def _raise_not_implemented(*args, **kwargs):
    raise NotImplementedError("not implemented yet")


def _raise_index_error(*args, **kwargs):
    raise IndexError("index 7 is out of bounds for dimension 0 with size 6")


@pytest.mark.parametrize("check_name", list(CHECKS))
def test_stub_reports_not_implemented(check_name):
    message = _fails(check_name, _raise_not_implemented)
    assert "not implemented yet" in message, message


@pytest.mark.parametrize("check_name", list(CHECKS))
def test_crash_reports_exception_type(check_name):
    message = _fails(check_name, _raise_index_error)
    assert "IndexError" in message and "index 7 is out of bounds" in message, message


def _raise_multiline(*args, **kwargs):
    raise RuntimeError("Error(s) in loading state_dict:\n\tMissing key(s): 'embed.weight'\n\tUnexpected key(s): 'x'")


def test_crash_with_multiline_message_stays_one_paragraph():
    message = _fails("max_of_list_targets", _raise_multiline)
    assert "RuntimeError" in message


# ------------------------------------------------------------------ (e) NaN results
def _nan_residual(model, cache):
    return torch.full_like(cache["resid_post", model.cfg.n_layers - 1], NAN)


def _nan_pattern(q, k):
    batch, pos, heads, _ = q.shape
    return torch.full((batch, heads, pos, pos), NAN)


def _nan_rotation(state, R):
    return {key: torch.full_like(w, NAN) for key, w in state.items()}


def _nan_step_without_update(model, optimizer, tokens, targets):
    return NAN


def _nan_step_after_correct_update(model, optimizer, tokens, targets):
    train.train_step(model, optimizer, tokens, targets)
    return NAN


@pytest.mark.parametrize("check_name, fn", [
    ("residual_from_components", _nan_residual),
    ("attention_pattern", _nan_pattern),
    ("rotate_residual_stream", _nan_rotation),
    ("bigram_log_table", lambda model: torch.full((16, 16), NAN)),
    ("kl_to_chain", lambda log_model, transitions, pi: torch.tensor(NAN)),
    ("direct_path_logits", lambda model, tokens: torch.full((len(tokens), 64), NAN)),
    ("logits_without_direct_path", lambda model, tokens: torch.full((len(tokens), 64), NAN)),
    ("token_qk_circuit", lambda model: torch.full((64, 64), NAN)),
    ("full_ov_circuit", lambda model: torch.full((64, 64), NAN)),
    ("positional_qk_circuit", lambda model, q, k: torch.full((64, 64), NAN)),
])
def test_nan_result_reported(check_name, fn):
    message = _fails(check_name, fn)
    assert "NaN" in message and "Hint" in message, message


@pytest.mark.parametrize("check_name, fn", [
    ("max_of_list_targets", lambda tokens: torch.full(tokens.shape, NAN)),
    ("fibonacci_targets", lambda tokens, max_value: torch.full(tokens.shape, NAN)),
])
def test_nan_result_for_integer_targets_reported(check_name, fn):
    """Integer targets cannot hold NaN: a float tensor full of NaN is rejected for its dtype (or its NaNs)."""
    message = _fails(check_name, fn)
    assert "NaN" in message or "dtype" in message, message


def test_nan_loss_from_train_step_rejected():
    _fails("train_step", _nan_step_without_update)


def test_nan_loss_after_correct_update_rejected():
    message = _fails("train_step", _nan_step_after_correct_update)
    assert "NaN" in message or "nan" in message, message


# ------------------------------------------------------------------ how Jupyter shows a failure
def test_render_traceback_is_one_short_line():
    err = CheckFailed("Exercise 1.1 (max_of_list_targets): expected a tensor. Hint: use cummax.")
    lines = err._render_traceback_()
    assert isinstance(lines, list) and len(lines) == 1
    assert "Exercise 1.1 (max_of_list_targets): expected a tensor. Hint: use cummax." in lines[0]
    assert "\n" not in lines[0] and len(lines[0]) < 200
    assert "Traceback" not in lines[0]


def test_render_traceback_of_a_real_failure():
    with pytest.raises(CheckFailed) as excinfo:
        checks.check_max_of_list_targets(_named("max_of_list_targets", "a target at position 0"))
    (line,) = excinfo.value._render_traceback_()
    assert str(excinfo.value) in line and "\n" not in line


# ------------------------------------------------------------------ chapters 03, 05-06: more on the new checkers
# Correct solutions written differently from the reference must pass too (float32 instead of float64,
# another multiplication order, einsum, explicit loops), whatever random inputs the checker draws.
def t2n_other_order(model, source_pos):
    through = model.W_V[0, 0] @ (model.W_O[0, 0] @ model.W_in[0])
    return model.W_E @ through + model.W_pos[source_pos] @ through


def power_float32_by_mask(values):
    n = values.shape[0]
    power = torch.fft.rfft(values.float(), dim=0, norm="ortho").abs().square()
    freqs = torch.arange(n // 2 + 1)
    pair = (freqs > 0) & (2 * freqs != n)
    return power * torch.where(pair, 2.0, 1.0).reshape((-1,) + (1,) * (values.dim() - 1))


def power_explicit_projection(values):
    n = values.shape[0]
    x = torch.arange(n, dtype=torch.float64)
    rows = [values.double().sum(0) ** 2 / n]
    for f in range(1, n // 2 + 1):
        c, s = torch.cos(2 * math.pi * f * x / n), torch.sin(2 * math.pi * f * x / n)
        rows.append(sum((b @ values.double()) ** 2 / (b @ b) for b in (c, s) if (b @ b) > 1e-9))
    return torch.stack(rows).float()


def dropped_by_a_keep_mask(model, tokens, targets, offsets):
    """The kept keys as a float mask, built by loops, each row renormalised: the same measurement."""
    n = tokens.shape[1]
    keep = torch.ones(n, n)
    for q in range(n):
        for d in offsets:
            if 0 <= q - d < n:
                keep[q, q - d] = 0.0

    def hook(pattern, hook):
        kept = pattern * keep
        return kept / kept.sum(-1, keepdim=True)

    logits = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", hook)])
    out = {}
    for q in range(n):
        rows = targets[:, q] != IGNORE
        if rows.any():
            out[q] = ((logits[rows, q].argmax(-1) == targets[rows, q]).float().mean().item(),
                      F.cross_entropy(logits[rows, q], targets[rows, q]).item())
    return out


def best_match_by_corrcoef(curves, others):
    a = curves.shape[1]
    return torch.corrcoef(torch.cat([curves, others], 1).T)[:a, a:].abs().max(1).values


def phase_shifted_by_exp(values, phases):
    n = values.shape[0]
    turn = torch.exp(1j * phases.double())
    turn[0] = 1.0
    if n % 2 == 0:
        turn[-1] = 1.0
    return torch.fft.irfft(torch.fft.rfft(values.double(), dim=0) * turn, n=n, dim=0).float()


def posqk_einsum(model):
    q = torch.einsum("pm,mh->ph", model.W_pos, model.W_Q[0, 0])
    k = torch.einsum("pm,mh->ph", model.W_pos, model.W_K[0, 0])
    return torch.einsum("ph,kh->pk", q, k) / math.sqrt(model.cfg.d_head)


def ordered_by_column_pairs(scores):
    n = scores.shape[-1]
    wins = sum((scores[:, c] > scores[:, b]).sum().item() for c in range(n) for b in range(c))
    return wins / (scores.shape[0] * n * (n - 1) / 2)


def agreement_from_scores(model, lists):
    queries = model.W_E[lists[:, -1]] @ model.W_Q[0, 0]  # [batch, d_head]
    keys = model.W_E[lists] @ model.W_K[0, 0]  # [batch, pos, d_head]
    token_choice = torch.einsum("bd,bkd->bk", queries, keys).argmax(-1)
    _, cache = model.run_with_cache(lists)
    model_choice = cache["blocks.0.attn.hook_pattern"][:, 0, -1].argmax(-1)
    same = lists[torch.arange(len(lists)), token_choice] == lists[torch.arange(len(lists)), model_choice]
    return same.float().mean().item()


def mix_gap_with_the_frozen_helper(model, a, b, alpha, beta):
    pattern = model.run_with_cache(a)[1]["blocks.0.attn.hook_pattern"]
    mix = alpha * model.W_E[a] + beta * model.W_E[b]
    mixed = model.run_with_hooks(a, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda p, hook: pattern),
                                               ("hook_embed", lambda e, hook: mix)])
    combined = alpha * circuits.logits_with_frozen_pattern(model, a, pattern) + \
        beta * circuits.logits_with_frozen_pattern(model, b, pattern)
    return float((mixed - combined).abs().max())


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("check_name, solution", [
    ("token_to_neuron", t2n_other_order),
    ("frequency_power", power_float32_by_mask),
    ("frequency_power", power_explicit_projection),
    ("accuracy_with_keys_dropped", dropped_by_a_keep_mask),
    ("best_match", best_match_by_corrcoef),
    ("phase_shifted", phase_shifted_by_exp),
    ("positional_qk_scores", posqk_einsum),
    ("fraction_ordered", ordered_by_column_pairs),
    ("token_only_agreement", agreement_from_scores),
    ("frozen_mix_gap", mix_gap_with_the_frozen_helper),
], ids=lambda x: getattr(x, "__name__", x))
def test_equivalent_solutions_pass(check_name, solution, seed, capsys):
    torch.manual_seed(seed)
    check, _, label = CHECKS[check_name]
    check(solution)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("✓") and label in out[0], out


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("check_name, mistake", [
], ids=lambda x: getattr(x, "__name__", x))
def test_subtle_mistakes_rejected_for_other_seeds(check_name, mistake, seed):
    torch.manual_seed(seed)
    message = _fails(check_name, mistake)
    assert "Hint" in message or "This looks like" in message, message


@pytest.mark.parametrize("check_name, fn", [
    ("token_to_neuron", lambda model, pos: torch.full((128, 128), NAN)),
    ("frequency_power", lambda values: torch.full((values.shape[0] // 2 + 1,) + values.shape[1:], NAN)),
    ("positional_qk_scores", lambda model: torch.full((5, 5), NAN)),
])
def test_nan_result_reported_for_new_checkers(check_name, fn):
    message = _fails(check_name, fn)
    assert "NaN" in message and "Hint" in message, message


def test_new_checker_messages_are_specific():
    assert "shape (5, 5)" in _fails("positional_qk_scores", posqk_token_circuit)
    assert "source position 0" in _fails("token_to_neuron", _named("token_to_neuron", "the positional embedding left out"))
    assert "(64, 0)" in _fails("frequency_power", _named("frequency_power", "the constant or the n / 2"))  # the Nyquist entry of a 128-token input


@pytest.mark.parametrize("check_name, fn", [
    ("frequency_power", lambda values: torch.fft.rfft(values, dim=0, norm="ortho").abs().square().tolist()),
    ("positional_qk_scores", lambda model: circuits.positional_qk_scores(model).tolist()),
])
def test_new_checkers_reject_lists(check_name, fn):
    assert "got list" in _fails(check_name, fn)


# ------------------------------------------------------------------ (e) guarding the grading
@pytest.fixture
def restore():
    """Undo what a tampering function below changes, and forget that the checks were tampered with."""
    undo: list[tuple[object, str, object]] = []

    def replace(owner, name: str, value) -> None:
        undo.append((owner, name, owner[name] if isinstance(owner, dict) else getattr(owner, name)))
        owner.__setitem__(name, value) if isinstance(owner, dict) else setattr(owner, name, value)

    yield replace
    for owner, name, value in reversed(undo):
        owner.__setitem__(name, value) if isinstance(owner, dict) else setattr(owner, name, value)
    checks.guard._STATE["untrusted"] = None


def _ov_right(model):
    return model.W_E @ model.W_V[0, 0] @ model.W_O[0, 0] @ model.W_U


def test_a_function_that_calls_its_own_reference_fails():
    message = _fails("full_ov_circuit", lambda model: _circuits.full_ov(model).AB)
    assert "calls circuits.full_ov" in message and "yourself" in message
    # a copy of the reference's code is still the reference
    copy = types.FunctionType(_circuits.copying_score.__code__, vars(_circuits))
    assert "calls circuits.copying_score" in _fails("copying_score", lambda matrix: copy(matrix))
    # another exercise's reference is a helper like any other
    checks.check_positional_qk_circuit(lambda model, q, k: _positional_from_tokens(model, q, k))


def _positional_from_tokens(model, q, k):
    shifted_q, shifted_k = model.W_E + model.W_pos[q], model.W_E + model.W_pos[k]
    return shifted_q @ model.W_Q[0, 0] @ model.W_K[0, 0].T @ shifted_k.T / model.cfg.d_head ** 0.5 + 0 * _circuits.full_qk_tokens(model)


@pytest.mark.parametrize("owner, target", [("engine", "compare_tensors"), ("package", "check_copying_score"),
                                           ("package", "CheckFailed"), ("engine", "CheckFailed"),
                                           ("guard", "verify_untouched"), ("guard", "_guarded_objects"),
                                           ("guard", "run_watched"), ("engine", "call_learner")])
def test_a_function_that_rebinds_the_checks_fails_and_so_does_every_later_check(restore, owner, target):
    fake = (lambda *a, **k: None) if target != "CheckFailed" else type("Quiet", (Exception,), {})
    module = checks if owner == "package" else getattr(checks, owner)

    def sneaky(model):
        restore(module, target, fake)
        return _ov_right(model) * 2  # wrong, so only a replaced checker would pass it

    with pytest.raises(Exception) as excinfo:  # with CheckFailed replaced, the failure is raised as the fake
        checks.check_full_ov_circuit(sneaky)
    message = str(excinfo.value)
    assert checks.UNTRUSTED in message and target in message, message


def test_torch_functions_are_guarded_too(restore):
    def loosen_allclose(model):
        restore(torch, "allclose", lambda *a, **k: True)
        return torch.zeros(64, 64)

    assert "torch.allclose" in _fails("full_ov_circuit", loosen_allclose)


def test_the_notebooks_names_for_the_checks_are_guarded(restore):
    def rebind_notebook_checks(model):  # this test module stands in for the notebook that called the check
        restore(globals(), "checks", types.SimpleNamespace())
        return _ov_right(model)

    assert "the notebook's 'checks'" in _fails("full_ov_circuit", rebind_notebook_checks)


def test_after_tampering_every_check_fails_until_the_kernel_restarts(restore):
    def sneaky(model):
        restore(checks.engine, "passed", lambda exercise: None)
        return _ov_right(model)

    _fails("full_ov_circuit", sneaky)
    message = _fails("copying_score", lambda matrix: float(torch.linalg.eigvals(matrix).real.sum()))
    assert checks.UNTRUSTED in message and "Restart the kernel" in message


def test_switching_off_the_reference_watch_is_tampering(restore):
    def unwatched(model):
        import sys
        sys.setprofile(None)
        return _circuits.full_ov(model).AB

    assert "the reference watch" in _fails("full_ov_circuit", unwatched)


def test_tensor_subclasses_and_float_subclasses_are_not_trusted():
    class Agreeable(torch.Tensor):
        pass

    message = _fails("full_ov_circuit", lambda model: _ov_right(model).as_subclass(Agreeable))
    assert "plain torch.Tensor" in message

    class Close(float):
        def __sub__(self, other):
            return 0.0

    assert "expected 1.0000, got 0.0000" in _fails("copying_score", lambda matrix: Close(0.0))


def test_in_a_learners_jupyterlab_a_failed_check_prints_and_the_chapter_goes_on(monkeypatch, capsys):
    monkeypatch.setenv("JPY_SESSION_NAME", "/home/learner/chapters/03_qk_ov.ipynb")
    monkeypatch.delenv(checks.STRICT_ENV, raising=False)
    assert not checks.strict()
    handed_back = checks.check_full_ov_circuit(_raise_not_implemented)  # returns the course's stand-in
    out = capsys.readouterr().out
    assert "✗ Exercise 3.2 (full_ov_circuit): not implemented yet" in out and "in place of yours" in out
    spec = checks.EXERCISES["3.2"]
    model = _models.build_model("max_of_list", seed=1)
    assert handed_back is spec.stand_in and torch.allclose(handed_back(model), _circuits.full_ov(model).AB)
    assert checks.check_full_ov_circuit(handed_back) is spec.stand_in  # checking the stand-in again: told so
    assert "is the course's own function, which an earlier failed check put in place of yours" in capsys.readouterr().out
    monkeypatch.setenv(checks.STRICT_ENV, "1")  # the grader's kernels, even under a Jupyter server
    assert checks.strict()
    _fails("full_ov_circuit", _raise_not_implemented)
    monkeypatch.delenv("JPY_SESSION_NAME")
    monkeypatch.setenv(checks.STRICT_ENV, "0")
    assert not checks.strict()
    monkeypatch.delenv(checks.STRICT_ENV)
    assert checks.strict()  # nbval, nbclient, scripts


def test_every_exercise_has_one_spec():
    assert sorted(checks.EXERCISES) == sorted(label.split()[1] for _, _, label in CHECKS.values())
    for number, spec in checks.EXERCISES.items():
        assert spec.check is getattr(checks, f"check_{spec.function}")
        assert spec.label == f"Exercise {number} ({spec.function})"
        assert all(callable(ref) and ref.__module__.startswith("utils.") for ref in spec.references)


# ------------------------------------------------------------------ (f) the answer is out of the learner's reach
def _values_in(obj, found: list, depth: int = 3) -> None:
    """Every tensor and float in `obj`, looking `depth` levels into containers, objects' attributes and closures."""
    if isinstance(obj, torch.Tensor):
        found.append(obj)
    elif isinstance(obj, float):
        found.append(obj)
    elif depth and isinstance(obj, (list, tuple, set, frozenset)):
        for item in obj:
            _values_in(item, found, depth - 1)
    elif depth and isinstance(obj, dict):
        for item in list(obj.values()):
            _values_in(item, found, depth - 1)
    elif depth and isinstance(obj, types.FunctionType):
        for cell in obj.__closure__ or ():
            try:
                _values_in(cell.cell_contents, found, depth - 1)
            except ValueError:  # an empty cell
                pass
    elif depth and hasattr(obj, "__dict__") and not isinstance(obj, (type, types.ModuleType, torch.nn.Module)):
        _values_in(vars(obj), found, depth - 1)


_TENSOR_TYPES = frozenset((torch.Tensor, torch.nn.Parameter))  # (a set: the scan runs over every live object)


def _live_tensors() -> list:
    import gc
    import warnings

    with warnings.catch_warnings():  # isinstance on some of torch's deprecated objects warns
        warnings.simplefilter("ignore")
        return [obj for obj in gc.get_objects() if type(obj) in _TENSOR_TYPES]


def _everything_a_learner_can_reach(every_live_tensor: bool, older: set[int] = frozenset()) -> list:
    """What a function could read while a checker runs it: every frame above it, the checkers' modules, live tensors."""
    import sys

    found: list = []
    frame = sys._getframe(2)
    while frame is not None:
        _values_in(frame.f_locals, found)
        frame = frame.f_back
    for name, module in list(sys.modules.items()):
        if name.startswith("utils.checks"):
            _values_in(vars(module), found)
    if every_live_tensor:  # (those alive before the check began are an earlier test's, not the checker's)
        found += [obj for obj in _live_tensors() if id(obj) not in older]
    return found


def _parts(result, depth: int = 3) -> list:
    parts: list = []
    _values_in(result, parts, depth)
    return [p for p in parts if isinstance(p, torch.Tensor) and p.numel() > 1
            or isinstance(p, float) and p not in (0.0, 1.0) and not math.isnan(p)]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.detach(), b.detach())
    return isinstance(a, float) and isinstance(b, float) and a == b


@pytest.mark.parametrize("check_name", list(CHECKS))
def test_the_learners_function_cannot_find_the_expected_answer(check_name):
    """A function that searches the stack, the checkers' modules and every live tensor for the answer finds nothing.

    It looks first, then computes the right answer itself (so the check passes) and records any
    reachable object equal to that answer: the checker must not hold the answer yet.
    """
    torch.manual_seed(20_261_203)  # inputs no other test draws: an earlier test's results may still be alive
    check, reference, _ = CHECKS[check_name]
    leaks: list[str] = []
    calls: list[tuple] = []  # every live tensor is scanned at the first call only (it takes a while)
    older = {id(obj) for obj in _live_tensors()}

    def searcher(*args):
        calls.append(args)
        # (chapter 10 refuses an explanation that touches the model's weights, as scanning every tensor does; a
        # searcher that switches that refusal off still finds no answer)
        with torch._C.DisableTorchFunction():
            reachable = _everything_a_learner_can_reach(every_live_tensor=len(calls) == 1, older=older)
            inputs = _parts(args, depth=5)  # (an answer equal to an input, like a copied weight, gives nothing away)
        result = reference(*args)
        with torch._C.DisableTorchFunction():
            leaks.extend(f"{type(part).__name__} {tuple(getattr(part, 'shape', ()))}" for part in _parts(result)
                         if any(_same(part, seen) for seen in reachable) and not any(_same(part, x) for x in inputs))
        return result

    check(searcher)
    assert not leaks, f"{check_name}: the answer was reachable while the learner's function ran: {leaks[:3]}"


# ------------------------------------------------------------------ (g) mistakes are built from the references
def _functions(path) -> dict[str, tuple[list[str], set[str]]]:
    """Every function in a source file (nested ones too): (its body's names, operators and numbers, docstring left
    out; the names of the functions it calls)."""
    import ast
    import io
    import tokenize

    found = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef):
            body = node.body[1:] if isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value,
                                                                                     ast.Constant) else node.body
            text = "\n".join(ast.unparse(statement) for statement in body)
            tokens = [t.string for t in tokenize.generate_tokens(io.StringIO(text).readline)
                      if t.type in (tokenize.NAME, tokenize.OP, tokenize.NUMBER)]
            calls = {getattr(c.func, "attr", getattr(c.func, "id", None)) for c in ast.walk(node) if isinstance(c, ast.Call)}
            found[f"{path.name}:{node.name}"] = (tokens, calls)
    return found


@pytest.mark.parametrize("chapter", [module.__name__.rsplit(".", 1)[1] for module in checks.CHAPTER_MODULES])
def test_no_checker_function_copies_a_function_of_the_course(chapter):
    """A named mistake is built from the reference or its pieces (it calls them); a private near-copy of a function
    of the course (60 % or more of the same token sequence in a body of 30 tokens or more, calling neither that
    function nor anything it calls) would drift from it unnoticed. (On the single checks.py this replaced, the
    measure found 27 such copies.)"""
    import difflib
    from pathlib import Path

    root = Path(checks.__file__).parent.parent
    ours = {}
    for module in ("circuits", "fourier", "models", "proofs", "residual_paths", "superposition", "tasks", "train"):
        ours.update(_functions(root / f"{module}.py"))
    course_functions = {name.split(":")[1] for name in ours}
    copies = []
    for name, (tokens, calls) in _functions(Path(checks.__file__).parent / f"{chapter}.py").items():
        for other, (their, their_calls) in ours.items():
            pieces = {other.split(":")[1]} | (their_calls & course_functions)  # the function and what it is built from
            if min(len(tokens), len(their)) < 30 or calls & pieces:
                continue
            matcher = difflib.SequenceMatcher(None, tokens, their, autojunk=False)
            if matcher.real_quick_ratio() >= 0.6 and matcher.quick_ratio() >= 0.6 and matcher.ratio() >= 0.6:
                copies.append(f"{name} ~ {other} ({matcher.ratio():.0%})")
    assert not copies, "checker functions that copy the course's code: " + "; ".join(copies)


def test_a_decorated_reference_is_watched_by_its_own_code():
    """answer_agreement is wrapped by @torch.no_grad(), whose wrapper every such function shares: calling another
    decorated function is no call of the reference, calling the reference still is."""
    assert _circuits.answer_agreement.__code__ is _circuits.accuracy_with_maps_replaced.__code__  # the shared wrapper

    def uses_a_decorated_helper(model, other, pairs):
        _circuits.accuracy_with_maps_replaced  # noqa: B018  (only to show the helper is at hand)
        with torch.no_grad():
            return (model(pairs)[:, 1].argmax(-1) == other(pairs)[:, 1].argmax(-1)).float().mean().item()

    checks.check_answer_agreement(uses_a_decorated_helper)
    assert "calls circuits.answer_agreement" in _fails("answer_agreement", lambda m, o, p: _circuits.answer_agreement(m, o, p))


def test_a_passing_check_hands_back_the_learners_own_function():
    def full_ov_circuit(model):
        return model.W_E @ model.W_V[0, 0] @ model.W_O[0, 0] @ model.W_U

    assert checks.check_full_ov_circuit(full_ov_circuit) is full_ov_circuit


def test_every_stand_in_takes_the_learners_arguments():
    """A failed check hands the chapter the stand-in in place of the learner's function: it must accept the same
    leading arguments as the exercise asks for (the notebook's stub)."""
    import inspect

    from tests.exercises.test_exercises import SOLUTIONS

    stubs = {}
    for nb in SOLUTIONS.values():
        for cell in nb.cells:
            for m in re.finditer(r"^def (\w+)\(([^)]*)\)", cell.source, re.MULTILINE):
                stubs[m.group(1)] = [a.split(":")[0].split("=")[0].strip() for a in m.group(2).split(",") if a.strip()]
    for spec in checks.EXERCISES.values():
        wanted = len(stubs[spec.function])
        parameters = list(inspect.signature(spec.stand_in).parameters.values())
        required = [p for p in parameters if p.default is inspect.Parameter.empty]
        assert len(required) <= wanted <= len(parameters), (spec.number, wanted, parameters)


# ------------------------------------------------------------------ diagnoses the engine makes for every exercise
def test_a_hook_on_the_attention_scores_is_named_as_the_transformerlens_4_trap():
    from transformer_lens.utilities import get_act_name

    def uniform_attention_accuracy(model, lists):  # ablating through the scores, as in TransformerLens 2 and ARENA
        def uniform_scores(scores, hook):
            return torch.zeros_like(scores).masked_fill(~torch.ones_like(scores, dtype=torch.bool).tril(), -1e9)

        logits = model.run_with_hooks(lists, fwd_hooks=[(get_act_name("attn_scores", 0), uniform_scores)])
        return (logits[:, -1].argmax(-1) == lists.max(-1).values).float().mean().item()

    message = _fails("uniform_attention_accuracy", uniform_attention_accuracy)
    assert "hook_attn_scores" in message and "TransformerLens 4 models drop edits" in message, message
    assert "What the check saw" in message, message


def test_an_edit_in_place_on_the_attention_scores_is_named_as_the_trap_too():
    from transformer_lens.utilities import get_act_name

    def uniform_attention_accuracy(model, lists):  # an edit in place raises no warning: the source names the hook
        def uniform_scores(scores, hook):
            scores.zero_()

        logits = model.run_with_hooks(lists, fwd_hooks=[(get_act_name("attn_scores", 0), uniform_scores)])
        return (logits[:, -1].argmax(-1) == lists.max(-1).values).float().mean().item()

    assert "TransformerLens 4 models drop edits" in _fails("uniform_attention_accuracy", uniform_attention_accuracy)


def test_the_parts_of_a_tuple_or_a_dict_are_named():
    spec = checks.EXERCISES["4.2"]
    attempt = engine.Attempt(spec)
    right = {"token-token": torch.zeros(2), "token-position": torch.ones(2)}
    with pytest.raises(CheckFailed, match=r"same keys in another order, \['token-position', 'token-token'\]"):
        engine.compare(dict(reversed(list(right.items()))), right, attempt)
    with pytest.raises(CheckFailed, match=r"entry 'token-position'"):
        engine.compare({**right, "token-position": torch.zeros(2)}, right, attempt)
    with pytest.raises(CheckFailed, match=r"the second of the 2 results"):
        engine.compare((1.0, 2.0), (1.0, 3.0), attempt)
    named = engine.Attempt(dataclasses.replace(spec, parts=("the scores", "the margin")))
    with pytest.raises(CheckFailed, match=r"for the margin expected 3"):
        engine.compare((1.0, 2.0), (1.0, 3.0), named)


@pytest.mark.parametrize("check_name", ["fraction_attending_to_max", "copying_score"])
def test_a_tensor_where_a_float_is_asked_for_is_refused(check_name):
    reference = CHECKS[check_name][1]

    def as_a_tensor(*args):
        return torch.tensor(reference(*args))

    assert "expected a Python float, got a tensor" in _fails(check_name, as_a_tensor)


def test_a_mistake_that_gives_nan_is_recognised_by_its_nans():
    wrong = torch.tensor([[1.0, float("nan")], [0.5, 0.5]])
    assert engine.matches(wrong.clone(), wrong)
    assert not engine.matches(torch.tensor([[1.0, 0.0], [0.5, 0.5]]), wrong)
    assert not engine.matches(torch.tensor([[1.0, float("nan")], [0.4, 0.6]]), wrong)
