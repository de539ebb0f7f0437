"""Exercise checkers: each compares the learner's function with the reference on fresh inputs.

A checker prints one success line, or raises CheckFailed whose message says what was
expected, what came back, and a hint. In Jupyter a CheckFailed shows as that short
message only, never as a traceback.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from utils.tasks import IGNORE


class CheckFailed(Exception):
    """An exercise check failed; the message is for the learner."""

    def _render_traceback_(self) -> list[str]:  # IPython shows this instead of a traceback
        return [f"\x1b[31m✗ {self.args[0]}\x1b[0m"]


def passed(exercise: str) -> None:
    print(f"✓ {exercise}: all checks passed.")


def call_learner(fn: Callable, exercise: str, *args: Any, hint: str = "", **kwargs: Any) -> Any:
    """Call the learner's function, turning 'not implemented' and crashes into CheckFailed."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise CheckFailed(f"{exercise}: not implemented yet. Fill in the function in the cell above, "
                          f"run that cell, then run this check again.") from None
    except CheckFailed:
        raise
    except Exception as err:  # the learner's code crashed: say where, briefly
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise CheckFailed(f"{exercise}: your function raised {type(err).__name__}: {first_line}"
                          + (f" Hint: {hint}" if hint else "")) from None


def compare_tensors(got: Any, expected: Tensor, exercise: str, hint: str, atol: float = 1e-5, rtol: float = 1e-4,
                    what: str = "result") -> None:
    """Raise CheckFailed unless `got` is a tensor matching `expected` in shape, dtype kind and values."""
    if not isinstance(got, Tensor):
        raise CheckFailed(f"{exercise}: expected the {what} to be a torch.Tensor, got {type(got).__name__}. Hint: {hint}")
    if tuple(got.shape) != tuple(expected.shape):
        raise CheckFailed(f"{exercise}: expected the {what} to have shape {tuple(expected.shape)}, "
                          f"got {tuple(got.shape)}. Hint: {hint}")
    if expected.dtype.is_floating_point != got.dtype.is_floating_point or (expected.dtype == torch.bool) != (got.dtype == torch.bool):
        raise CheckFailed(f"{exercise}: expected the {what} to have dtype {expected.dtype}, got {got.dtype}. Hint: {hint}")
    if got.dtype.is_floating_point and torch.isnan(got).any():
        raise CheckFailed(f"{exercise}: the {what} contains NaN ({int(torch.isnan(got).sum())} entries). Hint: {hint}")
    got_cmp, exp_cmp = got.detach().to(expected.dtype), expected.detach()
    if expected.dtype.is_floating_point:
        ok = torch.allclose(got_cmp, exp_cmp, atol=atol, rtol=rtol)
    else:
        ok = torch.equal(got_cmp, exp_cmp)
    if not ok:
        wrong = ~torch.isclose(got_cmp.float(), exp_cmp.float(), atol=atol, rtol=rtol)
        idx = tuple(int(i) for i in wrong.nonzero()[0])
        raise CheckFailed(f"{exercise}: {int(wrong.sum())} of {wrong.numel()} entries differ; at index {idx} "
                          f"expected {exp_cmp[idx].item():.5g}, got {got_cmp[idx].item():.5g}. Hint: {hint}")


def compare_float(got: Any, expected: float, exercise: str, hint: str, what: str, atol: float = 1e-4) -> None:
    """Raise CheckFailed unless `got` is a finite number (or one-element tensor) within atol of `expected`."""
    if isinstance(got, Tensor) and got.numel() == 1:
        got = got.item()
    if not isinstance(got, (float, int)):
        raise CheckFailed(f"{exercise}: expected a float, got {type(got).__name__}. Hint: {hint}")
    if not math.isfinite(got) or abs(got - expected) > atol:
        raise CheckFailed(f"{exercise}: for {what} expected {expected:.4f}, got {got:.4f}. Hint: {hint}")


def _random_models() -> list:
    """Freshly initialised max_of_list (attention only) and addition (with MLP) models with non-zero biases."""
    from utils import models

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
    from utils import models

    return models.build_model(name, seed=int(torch.randint(0, 10_000, ())))


def _random_causal_pattern(batch: int, heads: int, n: int) -> Tensor:
    """A random attention pattern [batch, head, query, key]: rows sum to 1, no weight on later keys."""
    future = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    return torch.randn(batch, heads, n, n).masked_fill(future, -torch.inf).softmax(-1)


# ------------------------------------------------------------------ chapter 00: tour
def check_residual_from_components(fn: Callable) -> None:
    from utils import circuits

    ex = "Exercise 0.1 (residual_from_components)"
    hint = ("add cache['hook_embed'], cache['hook_pos_embed'], and for every layer cache['attn_out', layer] "
            "and, unless model.cfg.attn_only, cache['mlp_out', layer].")
    for name, model in _random_models():
        tokens = torch.randint(0, model.cfg.d_vocab, (4, model.cfg.n_ctx))
        _, cache = model.run_with_cache(tokens)
        got = call_learner(fn, ex, model, cache, hint=hint)
        compare_tensors(got, circuits.residual_from_components(model, cache), f"{ex} on the {name} model", hint, atol=1e-4)
    passed(ex)


def check_attention_pattern(fn: Callable) -> None:
    from utils import circuits

    ex = "Exercise 0.2 (attention_pattern)"
    hint = ("scores[b, h, q, k] = q[b, q, h] . k[b, k, h] / sqrt(d_head); set keys after the query (k > q) "
            "to -inf, then softmax over the key axis (the last one).")
    for batch, pos, heads, d_head in [(3, 6, 1, 32), (2, 5, 3, 8)]:
        q, k = torch.randn(batch, pos, heads, d_head), torch.randn(batch, pos, heads, d_head)
        got = call_learner(fn, ex, q, k, hint=hint)
        compare_tensors(got, circuits.attention_pattern(q, k), ex, hint, atol=1e-5)
    passed(ex)


def check_rotate_residual_stream(fn: Callable) -> None:
    from utils import models

    ex = "Exercise 0.3 (rotate_residual_stream)"
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
            if key.endswith(models._WRITES):
                hint = f"{key} writes to the stream (d_model is its first axis): use R.T @ W."
            elif key.endswith(models._WRITE_BIASES):
                hint = f"{key} is added to the stream, so it rotates like a residual vector: b @ R."
            elif key.endswith(models._READS):
                hint = f"{key} has d_model as its last axis: use W @ R."
            else:
                hint = f"{key} does not touch the residual stream: copy it unchanged."
            compare_tensors(got[key], expected[key], f"{ex} on the {name} model", hint, atol=1e-5, what=f"entry {key!r}")
    passed(ex)


# ------------------------------------------------------------------ chapter 01: training
def check_max_of_list_targets(fn: Callable) -> None:
    from utils import tasks

    ex = "Exercise 1.1 (max_of_list_targets)"
    hint = ("the target at position i is the largest of tokens[..., :i+1] (a running maximum: torch.cummax), "
            "and position 0 has no target: set it to IGNORE (-1).")
    for length in (2, 4, 6):
        tokens = torch.randint(0, tasks.MAX_OF_LIST_VOCAB, (16, length))
        got = call_learner(fn, ex, tokens.clone(), hint=hint)
        compare_tensors(got, tasks.max_of_list_targets(tokens), ex, hint)
    passed(ex)


def check_addition_pairs(fn: Callable) -> None:
    from utils import tasks

    ex = "Exercise 1.2 (addition_pairs)"
    hint = ("include every pair with a + b <= max_sum (0 included, the bound too), ordered by a then b; targets "
            "are IGNORE (-1) at position 0 and a + b at position 1.")
    for max_sum in (int(torch.randint(3, 12, ())), tasks.ADDITION_MAX):
        got = call_learner(fn, ex, max_sum, hint=hint)
        if not (isinstance(got, tuple) and len(got) == 2):
            raise CheckFailed(f"{ex}: expected a pair (tokens, targets), got {type(got).__name__}. Hint: return tokens, targets")
        tokens, targets = tasks.addition_pairs(max_sum)
        compare_tensors(got[0], tokens, f"{ex} with max_sum={max_sum}", hint, what="tokens")
        compare_tensors(got[1], targets, f"{ex} with max_sum={max_sum}", hint, what="targets")
    passed(ex)


def _fibonacci_check_inputs(max_value: int, length: int) -> Tensor:
    """Fibonacci inputs for checking, [n, length]: targets equal to max_value, rows that end early, random rows.

    Padding is random tokens, not FIBONACCI_PAD, so a function that reads the padding shows it.
    """
    from utils import tasks

    tokens, targets = tasks.fibonacci_sequences(length, max_value)
    valid = tasks.fibonacci_valid_positions(tokens)
    tokens = torch.where(valid, tokens, torch.randint(0, max_value + 1, tokens.shape))
    edge = (targets == max_value).any(-1)
    short = ~valid.all(-1)
    pick = [torch.nonzero(rows).squeeze(-1) for rows in (edge, short, torch.ones_like(edge))]
    chosen = torch.cat([p[torch.randperm(len(p))[:n]] for p, n in zip(pick, (4, 20, 40)) if len(p)])
    return tokens[chosen]


def check_fibonacci_targets(fn: Callable) -> None:
    from utils import tasks

    ex = "Exercise 1.3 (fibonacci_targets)"
    hint = ("at position i >= 1 the target is x[i-1] + x[i]. It is IGNORE at position 0, where that sum exceeds "
            "max_value, and on padding: every position from the first j >= 2 with tokens[j] != tokens[j-2] + "
            "tokens[j-1] onwards (a cumulative product of that test along the positions finds them).")
    top, n = tasks.ADDITION_MAX, tasks.FIBONACCI_LENGTH
    for max_value, length in ((top, n), (int(torch.randint(20, 60, ())), n), (top, 3), (top, 2)):
        tokens = _fibonacci_check_inputs(max_value, length)
        where = f"{ex} with max_value={max_value} on sequences of {length} tokens"
        got = call_learner(fn, ex, tokens.clone(), max_value, hint=hint)
        expected = tasks.fibonacci_targets(tokens, max_value)
        if isinstance(got, Tensor) and got.shape == expected.shape:
            nxt = torch.zeros_like(tokens)
            nxt[:, 1:] = tokens[:, :-1] + tokens[:, 1:]
            reads_padding = torch.where(nxt <= max_value, nxt, IGNORE)
            reads_padding[:, 0] = IGNORE
            if torch.equal(got, reads_padding) and not torch.equal(got, expected):
                row = int((got != expected).any(-1).nonzero()[0])
                raise CheckFailed(f"{where}: your targets are right wherever the sequence runs, but you also give "
                                  f"targets on the padding after it ends: for {tokens[row].tolist()} you gave "
                                  f"{got[row].tolist()}, expected {expected[row].tolist()}. "
                                  "Hint: a position is padding once tokens[j] != tokens[j-2] + tokens[j-1] for some "
                                  "j >= 2 at or before it; give it IGNORE.")
        compare_tensors(got, expected, where, hint)
    passed(ex)


def check_loss_fn(fn: Callable) -> None:
    from utils import tasks, train

    ex = "Exercise 1.4 (loss_fn)"
    hint = ("F.cross_entropy wants [N, vocab] logits and [N] targets: flatten batch and position, and pass "
            "ignore_index=IGNORE so that positions without a target do not count (the mean is over the rest).")
    logits = 3 * torch.randn(8, 6, 64)
    targets = torch.randint(0, 64, (8, 6))
    targets[:, 0] = tasks.IGNORE
    targets[torch.rand(8, 6) < 0.3] = tasks.IGNORE
    got = call_learner(fn, ex, logits.clone(), targets.clone(), hint=hint)
    compare_tensors(got, train.loss_fn(logits, targets), ex, hint, what="loss")
    passed(ex)


def check_train_step(fn: Callable) -> None:
    from utils import models, tasks, train

    ex = "Exercise 1.5 (train_step)"
    seed = int(torch.randint(0, 10_000, ()))
    mine, theirs = models.build_model("max_of_list", seed=seed), models.build_model("max_of_list", seed=seed)
    opt_mine = torch.optim.AdamW([p for p in mine.parameters() if p.requires_grad], lr=1e-2)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        tokens, targets = tasks.max_of_list_batch(32)
        expected_loss = train.train_step(mine, opt_mine, tokens, targets)
        got = call_learner(fn, ex, theirs, opt_theirs, tokens, targets,
                           hint="loss_fn(model(tokens), targets), optimizer.zero_grad(), loss.backward(), optimizer.step().")
        if isinstance(got, Tensor):
            raise CheckFailed(f"{ex}: expected the loss as a Python float, got a Tensor. Hint: return loss.item().")
        if not isinstance(got, float):
            raise CheckFailed(f"{ex}: expected the loss as a Python float, got {type(got).__name__}. Hint: return loss.item().")
        if not math.isfinite(got) or abs(got - expected_loss) > 1e-4:
            raise CheckFailed(f"{ex}: at step {step + 1} expected loss {expected_loss:.5f}, got {got:.5f}. Hint: "
                              f"compute the loss of model(tokens) with loss_fn before stepping, and call "
                              f"optimizer.zero_grad() every step so gradients do not pile up.")
        for (name, p), q in zip(mine.state_dict().items(), theirs.state_dict().values()):
            if not torch.allclose(p, q, atol=1e-5):
                raise CheckFailed(f"{ex}: after step {step + 1} the weights differ from the reference ({name}). "
                                  f"Hint: the order is loss, optimizer.zero_grad(), loss.backward(), optimizer.step().")
    passed(ex)


# ------------------------------------------------------------------ chapter 02: zero-layer models
def check_bigram_log_table(fn: Callable) -> None:
    from utils import models

    ex = "Exercise 2.1 (bigram_log_table)"
    hint = ("multiply W_E [vocab, d_model] by W_U [d_model, vocab] (in that order), add b_U, and take "
            "log_softmax over the last axis (the next token).")
    model = _fresh_model("bigram")
    with torch.no_grad():
        model.b_U.copy_(0.1 * torch.randn_like(model.b_U))
        got = call_learner(fn, ex, model, hint=hint)
        compare_tensors(got, models.bigram_table(model), ex, hint, atol=1e-4)
    passed(ex)


def check_kl_to_chain(fn: Callable) -> None:
    from utils import tasks

    ex = "Exercise 2.2 (kl_to_chain)"
    hint = ("per row, KL(true || model) = sum_next T[cur, next] * (log T[cur, next] - log_model[cur, next]); "
            "then weight the rows by the stationary distribution pi and sum.")
    transitions = tasks.bigram_transition_matrix(8, seed=int(torch.randint(0, 10_000, ())))
    log_model = torch.log_softmax(torch.randn(8, 8), dim=-1)
    pi = tasks.stationary_distribution(transitions)
    expected = (pi @ (transitions * (transitions.log() - log_model)).sum(-1)).reshape(())
    got = call_learner(fn, ex, log_model.clone(), transitions.clone(), pi.clone(), hint=hint)
    if isinstance(got, (float, int)):
        got = torch.tensor(float(got))
    if isinstance(got, Tensor) and got.numel() == 1:
        got = got.reshape(())
    compare_tensors(got, expected, ex, hint, atol=1e-5, what="KL")
    passed(ex)


# ------------------------------------------------------------------ chapter 03: QK and OV circuits


def check_token_qk_circuit(fn: Callable) -> None:
    from utils import circuits

    ex = "Exercise 3.1 (token_qk_circuit)"
    hint = ("rows are query tokens, columns key tokens: W_E @ W_Q[0, 0] @ W_K[0, 0].T @ W_E.T, divided by "
            "sqrt(d_head) like the attention scores.")
    model = _fresh_model("max_of_list")
    with torch.no_grad():
        got = call_learner(fn, ex, model, hint=hint)
        compare_tensors(got, circuits.full_qk_tokens(model), ex, hint, atol=1e-4)
    passed(ex)


def check_full_ov_circuit(fn: Callable) -> None:
    from utils import circuits

    ex = "Exercise 3.2 (full_ov_circuit)"
    hint = ("follow a token through the head: embed (W_E), value (W_V[0, 0]), output (W_O[0, 0]), unembed (W_U); "
            "rows are attended tokens, columns output logits. Return a plain tensor (use .AB on a FactoredMatrix).")
    model = _fresh_model("max_of_list")
    with torch.no_grad():
        got = call_learner(fn, ex, model, hint=hint)
        compare_tensors(got, circuits.full_ov(model).AB, ex, hint, atol=1e-4)
    passed(ex)


def check_copying_score(fn: Callable) -> None:
    from utils import circuits

    ex = "Exercise 3.3 (copying_score)"
    hint = ("take the (complex) eigenvalues with torch.linalg.eigvals, then return the real part of their sum "
            "divided by the sum of their absolute values, as a float.")
    cases = [torch.eye(6), -torch.eye(6), torch.randn(10, 10), torch.randn(10, 10) + 3 * torch.eye(10),
             torch.tensor([[0.0, -1.0], [1.0, 0.0]])]
    for matrix in cases:
        got = call_learner(fn, ex, matrix.clone(), hint=hint)
        compare_float(got, circuits.copying_score(matrix), ex, hint, f"a {tuple(matrix.shape)} test matrix")
    passed(ex)


# ------------------------------------------------------------------ chapter 04: positions in QK
def check_positional_qk_circuit(fn: Callable) -> None:
    from utils import circuits

    ex = "Exercise 4.1 (positional_qk_circuit)"
    hint = ("queries come from W_E + W_pos[query_pos], keys from W_E + W_pos[key_pos]: "
            "(W_E + W_pos[q]) @ W_Q[0, 0] @ W_K[0, 0].T @ (W_E + W_pos[k]).T / sqrt(d_head).")
    model = _fresh_model("max_of_list")
    with torch.no_grad():
        for q, k in [(5, 2), (3, 3), (4, 0)]:
            got = call_learner(fn, ex, model, q, k, hint=hint)
            compare_tensors(got, circuits.full_qk_positional(model, q, k), f"{ex} at query {q}, key {k}", hint, atol=1e-4)
    passed(ex)


def check_fraction_ordered(fn: Callable) -> None:
    from utils import circuits

    ex = "Exercise 4.2 (fraction_ordered)"
    hint = ("for every row (query token) and every pair of key tokens b < c, count whether scores[row, c] > "
            "scores[row, b] (strictly); return the fraction of all such comparisons as a float.")
    cases = [torch.arange(5.0).repeat(3, 1), -torch.arange(5.0).repeat(3, 1), torch.randn(7, 9),
             torch.tensor([[0.0, 1.0, 1.0], [2.0, 0.0, 3.0]])]
    for scores in cases:
        got = call_learner(fn, ex, scores.clone(), hint=hint)
        compare_float(got, circuits.fraction_ordered(scores), ex, hint, f"a {tuple(scores.shape)} test map", atol=1e-6)
    passed(ex)


# ------------------------------------------------------------------ chapter 05: MLP effective weights
def check_token_to_neuron(fn: Callable) -> None:
    from utils import circuits

    ex = "Exercise 5.1 (token_to_neuron)"
    hint = ("follow a token through the head into the MLP: (W_E + W_pos[source_pos]) @ W_V[0, 0] @ W_O[0, 0] "
            "@ W_in[0]; rows are tokens, columns neurons. No W_U: the ReLU stands between W_in and W_out.")
    model = _fresh_model("addition")
    with torch.no_grad():
        for pos in (0, 1):
            got = call_learner(fn, ex, model, pos, hint=hint)
            compare_tensors(got, circuits.token_to_neuron(model, pos), f"{ex} at source position {pos}", hint,
                            atol=1e-3, rtol=1e-3)
    passed(ex)


def check_frequency_power(fn: Callable) -> None:
    from utils import fourier

    ex = "Exercise 5.2 (frequency_power)"
    hint = ("torch.fft.rfft(values, dim=0, norm='ortho').abs() ** 2 gives one entry per frequency 0 .. n // 2; "
            "double the frequencies that stand for a pair (1 .. (n - 1) // 2) so the entries add up to "
            "(values ** 2).sum(0).")
    x = torch.arange(128.0)
    cases = [torch.cos(2 * torch.pi * 3 * x / 128)[:, None], torch.randn(128, 5), torch.randn(9, 3), torch.randn(10)]
    for values in cases:
        got = call_learner(fn, ex, values.clone(), hint=hint)
        compare_tensors(got, fourier.frequency_power(values), f"{ex} on a {tuple(values.shape)} input", hint,
                        atol=1e-3, rtol=1e-3, what="power")
    passed(ex)


def check_keep_frequencies(fn: Callable) -> None:
    from utils import fourier

    ex = "Exercise 5.3 (keep_frequencies)"
    hint = ("take torch.fft.rfft along dim 0, zero every coefficient except the constant (index 0) and the listed "
            "frequencies, and go back with torch.fft.irfft(..., n=values.shape[0], dim=0).")
    cases = [(torch.randn(128, 6), [1, 2, 3, 4]), (torch.randn(128, 3), [7]), (torch.randn(12, 2), []),
             (torch.randn(11, 4), [2, 5])]
    for values, freqs in cases:
        got = call_learner(fn, ex, values.clone(), list(freqs), hint=hint)
        compare_tensors(got, fourier.keep_frequencies(values, freqs), f"{ex} keeping {freqs} of a "
                        f"{tuple(values.shape)} map", hint, atol=1e-4, rtol=1e-3)
    passed(ex)


# ------------------------------------------------------------------ chapter 06: fibonacci
def check_attention_on_recent(fn: Callable) -> None:
    from utils import circuits

    ex = "Exercise 6.1 (attention_on_recent)"
    hint = ("for query position q add pattern[:, 0, q, q] and pattern[:, 0, q, q - 1] (only the first at q = 0), "
            "then average over the batch: one number per query position.")
    for batch, n in [(7, 5), (3, 4)]:
        pattern = _random_causal_pattern(batch, 1, n)
        got = call_learner(fn, ex, pattern.clone(), hint=hint)
        compare_tensors(got, circuits.attention_on_recent(pattern), f"{ex} on a {tuple(pattern.shape)} pattern",
                        hint, what="attention per query position")
    passed(ex)


def check_positional_qk_scores(fn: Callable) -> None:
    from utils import circuits

    ex = "Exercise 6.2 (positional_qk_scores)"
    hint = ("only the positions: (W_pos @ W_Q[0, 0]) @ (W_pos @ W_K[0, 0]).T / sqrt(d_head); rows are query "
            "positions, columns key positions, no W_E.")
    model = _fresh_model("fibonacci")
    with torch.no_grad():
        model.W_pos.mul_(10)  # a fresh W_pos is tiny; scale it so mistakes stand far above the tolerance
        got = call_learner(fn, ex, model, hint=hint)
        compare_tensors(got, circuits.positional_qk_scores(model), ex, hint, atol=1e-4, rtol=1e-3)
    passed(ex)


# ------------------------------------------------------------------ chapter 07: paths through the residual stream
def check_one_layer_path_logits(fn: Callable) -> None:
    from utils import circuits

    ex = "Exercise 7.1 (one_layer_path_logits)"
    hint = ("direct = (W_E[tokens] + W_pos[:n]) @ W_U; head = einsum('bqk,bkd->bqd', pattern[:, 0], embedded @ W_V[0, 0]) "
            "@ W_O[0, 0] @ W_U. Return the two as a tuple (direct, head), each [batch, pos, vocab].")
    model = _fresh_model("max_of_list")
    tokens = torch.randint(0, model.cfg.d_vocab, (5, model.cfg.n_ctx))
    pattern = torch.rand(5, 1, model.cfg.n_ctx, model.cfg.n_ctx).tril().softmax(-1)  # any pattern: the expansion is linear
    with torch.no_grad():
        got = call_learner(fn, ex, model, tokens, pattern, hint=hint)
        if not (isinstance(got, tuple) and len(got) == 2):
            raise CheckFailed(f"{ex}: expected a tuple (direct, head), got {type(got).__name__}. Hint: {hint}")
        expected = circuits.one_layer_path_logits(model, tokens, pattern)
        compare_tensors(got[0], expected["direct"], ex, hint, atol=1e-3, rtol=1e-3, what="direct path")
        compare_tensors(got[1], expected["head 0"], ex, hint, atol=1e-3, rtol=1e-3, what="head path")
    passed(ex)


def check_naive_path_logits(fn: Callable) -> None:
    from utils import circuits

    ex = "Exercise 7.2 (naive_path_logits)"
    hint = ("x = embed + pos_embed; pieces = circuits.head_pieces(model, cache) (one per source position); add x, "
            "every piece, mlp_output(x) and mlp_output(piece) for every piece separately, then @ W_U + b_U.")
    model = _fresh_model("addition")
    tokens = torch.randint(0, model.cfg.d_vocab, (16, model.cfg.n_ctx))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        got = call_learner(fn, ex, model, cache, hint=hint)
        compare_tensors(got, circuits.naive_path_logits(model, cache), ex, hint, atol=1e-3, rtol=1e-3, what="logits")
    passed(ex)


def check_memory_management_cosines(fn: Callable) -> None:
    from utils import circuits, models

    ex = "Exercise 7.5 (memory_management_cosines)"
    hint = ("neuron n reads along W_in[0][:, n] (a column) and writes along W_out[0][n, :] (a row); "
            "torch.nn.functional.cosine_similarity(W_in[0].T, W_out[0], dim=-1) gives all of them.")
    seed = int(torch.randint(0, 10_000, ()))
    state = models.build_model("addition", seed=seed).state_dict()
    n = models.spec("addition").config["d_mlp"]
    # half the neurons erase what they read (nn.Linear stores [out, in], so neuron k is row k of
    # mlp.in.weight and column k of mlp.out.weight)
    state["blocks.0.mlp.out.weight"][:, : n // 2] = -state["blocks.0.mlp.in.weight"][: n // 2].T
    model = models.model_from_state(dict(models.spec("addition").config, seed=seed), state)
    with torch.no_grad():
        got = call_learner(fn, ex, model, hint=hint)
        compare_tensors(got, circuits.memory_management_cosines(model), ex, hint, atol=1e-4, what="cosines")
    passed(ex)


def check_induction_attention(fn: Callable) -> None:
    from utils import circuits

    ex = "Exercise 7.3 (induction_attention)"
    hint = ("for every query q in the second copy (q >= half), take pattern[:, :, q, q - half + 1] and average "
            "over the batch and those queries: one number per head.")
    for batch, heads, half in [(6, 2, 4), (3, 3, 5)]:
        pattern = _random_causal_pattern(batch, heads, 2 * half)
        got = call_learner(fn, ex, pattern.clone(), half, hint=hint)
        compare_tensors(got, circuits.induction_attention(pattern, half), f"{ex} with half={half}", hint,
                        what="attention per head")
    passed(ex)


def check_composition_score(fn: Callable) -> None:
    from utils import circuits

    ex = "Exercise 7.4 (composition_score)"
    hint = "||A @ B||_F / (||A||_F * ||B||_F): torch.linalg.matrix_norm is the Frobenius norm by default."
    cases = [(torch.eye(4), torch.eye(4)), (torch.randn(6, 3), torch.randn(3, 6)),
             (torch.randn(5, 5), torch.randn(5, 5)), (torch.tensor([[1.0, 0.0]]).T, torch.tensor([[0.0, 1.0]]))]
    for a, b in cases:
        got = call_learner(fn, ex, a.clone(), b.clone(), hint=hint)
        compare_float(got, circuits.composition_score(a, b), ex, hint, f"a {tuple(a.shape)} @ {tuple(b.shape)} product",
                      atol=1e-5)
    passed(ex)
