"""The checkers of chapter 10: the capstone's mystery models.

A behaviour exercise is checked against the model itself (not a reference): the learner's rule must
agree with the model's predictions on fresh inputs. An explanation is checked by putting it in the
model's place (utils.explanations) and reading the loss it recovers against the nulls.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from utils import circuits, explanations, models, mysteries
from utils.checks.engine import Attempt, CheckFailed, Mistake, call_learner, diagnosis, exercise, passed

AGREEMENT = 0.99  # a rule passes when it gives the model's answer on at least this share of fresh inputs
BEHAVIOUR_INPUTS = 20_000
EXPLANATION_INPUTS = 4_000


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))


def _model_answers(model, name: str, tokens: Tensor) -> Tensor:
    """The model's predictions where it is read: [batch] for one position, [batch, k] for k."""
    answers = models.predictions(model, tokens)[:, mysteries.READ[name]]
    return answers.squeeze(1) if answers.shape[1] == 1 else answers


def _as_answers(got, expected: Tensor, attempt: Attempt) -> Tensor:
    if not isinstance(got, Tensor):
        raise CheckFailed(f"{attempt}: your function returned a {type(got).__name__}; it should return a tensor of "
                          f"tokens, shape {tuple(expected.shape)}. Hint: {attempt.hint}")
    got = got.detach()
    if got.dim() == expected.dim() + 1 and got.shape[-1] == 1:
        got = got.squeeze(-1)
    if got.shape != expected.shape:
        raise CheckFailed(f"{attempt}: your function returned shape {tuple(got.shape)}, expected {tuple(expected.shape)} "
                          f"(one token per input, or one per position read). Hint: {attempt.hint}")
    if got.dtype.is_floating_point:
        if not torch.equal(got, got.round()):
            raise CheckFailed(f"{attempt}: your function returned fractional values; the model's answers are tokens "
                              "(whole numbers).")
        got = got.long()
    return got


# what kind of input a disagreement is on, for the message: one label per input (or per read position)
def _by_pointer(tokens: Tensor) -> list[str]:
    return [f"the last token is {p}" for p in tokens[:, -1].tolist()]


def _by_read_position(tokens: Tensor) -> list[list[str]]:
    return [[f"position {i}" for i in range(mysteries.READ["mystery_b"].start, mysteries.READ["mystery_b"].stop)]
            for _ in range(len(tokens))]


def _by_order(tokens: Tensor) -> list[str]:
    return ["the first token is the smaller" if a < b else "the first token is the larger" if a > b
            else "the two tokens are equal" for a, b in tokens.tolist()]


def _where_it_disagrees(tokens: Tensor, got: Tensor, expected: Tensor, kinds: Callable) -> str:
    """'it disagrees most on <kind> (x % of those)'."""
    labels = kinds(tokens)
    wrong = (got != expected)
    if wrong.dim() == 1:
        wrong, labels = wrong[:, None], [[label] for label in labels]
    tally: dict[str, list[int]] = {}
    for row_labels, row_wrong in zip(labels, wrong.tolist()):
        for label, w in zip(row_labels, row_wrong):
            tally.setdefault(label, [0, 0])
            tally[label][0] += w
            tally[label][1] += 1
    label, (bad, total) = max(tally.items(), key=lambda item: item[1][0] / item[1][1])
    example = int(wrong.any(1).nonzero()[0, 0])
    return (f"it disagrees most where {label} ({bad / total:.0%} of those); for example on "
            f"{tokens[example].tolist()} the model says {expected[example].tolist()}, your rule "
            f"{got[example].tolist()}")


def _inputs(name: str) -> str:
    return "all 4,096 inputs" if name == "mystery_c" else f"{BEHAVIOUR_INPUTS:,} fresh inputs"


def _behaviour(name: str, kinds: Callable) -> Callable:
    def check(fn: Callable, attempt: Attempt) -> None:
        model = models.load_model(name)
        tokens, _ = mysteries.fresh_inputs(name, BEHAVIOUR_INPUTS, _generator())
        got = call_learner(fn, attempt, tokens.clone())
        expected = _model_answers(model, name, tokens)
        got = _as_answers(got, expected, attempt)
        agreement = (got == expected).float().mean().item()
        if agreement < AGREEMENT:
            named = diagnosis(got, attempt, (tokens,), atol=0, rtol=0)
            raise CheckFailed(f"{attempt}: your rule gives the model's answer on {agreement:.1%} of "
                              f"{_inputs(name)} (at least {AGREEMENT:.0%} needed); "
                              f"{_where_it_disagrees(tokens, got, expected, kinds)}. "
                              + (named or f"Hint: {attempt.hint}"))
        passed(attempt, f"Your rule gives the model's answer on {agreement:.2%} of {_inputs(name)}.")
    return check


def _refused(attempt: Attempt, err: Exception) -> CheckFailed:
    return CheckFailed(f"{attempt}: your explanation was refused: {err}.")


def _explained(fn: Callable, model, tokens: Tensor, attempt: Attempt) -> Tensor:
    """The learner's explanation on `tokens`, run where it cannot touch the model."""
    with explanations.without_the_model(model) as watch:
        try:
            out = call_learner(fn, attempt, tokens.clone())
        except CheckFailed:
            if watch.refusal is not None:
                raise _refused(attempt, watch.refusal) from None
            raise
    if not isinstance(out, Tensor):
        raise CheckFailed(f"{attempt}: your function returned a {type(out).__name__}, not a tensor. Hint: {attempt.hint}")
    return out.detach()


def _verdict(report: dict, attempt: Attempt, nulls: tuple[str, str], got: Tensor, tokens: Tensor) -> None:
    ours, model = report["explanation"], report["model"]
    print_report = "; ".join(f"{row}: accuracy {report[row]['accuracy']:.1%}, recovered {report[row]['recovered']:.2f}"
                             for row in ("explanation",) + nulls)
    if not explanations.passes(report):
        named = diagnosis(got, attempt, (tokens,), atol=1e-4, rtol=0)
        raise CheckFailed(
            f"{attempt}: with your explanation in its place the model gets {ours['accuracy']:.1%} of its answers "
            f"right (its own: {model['accuracy']:.1%}) and recovers {ours['recovered']:.2f} of the loss (at least "
            f"{explanations.PASS_RECOVERED} and within {explanations.PASS_ACCURACY_DROP:.0%} of the model's accuracy "
            f"needed). The nulls: {print_report.split('; ', 1)[1]}. " + (named or f"Hint: {attempt.hint}"))
    passed(attempt, f"Put in the model's place — {print_report}.")


def _pattern_check(name: str) -> Callable:
    rows = mysteries.READ[name]

    def check(fn: Callable, attempt: Attempt) -> None:
        model = models.load_model(name)
        tokens, targets = mysteries.fresh_inputs(name, EXPLANATION_INPUTS, _generator())
        pattern = _explained(fn, model, tokens, attempt)
        try:
            report = explanations.grade_pattern(model, lambda _: pattern, tokens, targets, rows)
        except explanations.ExplanationRefused as err:
            raise _refused(attempt, err) from None
        scored = _scored_rows(pattern.float(), rows)
        _verdict(report, attempt, ("even attention", "best fixed position"), scored, tokens)
    return check


def _scored_rows(pattern: Tensor, rows: slice) -> Tensor:
    """The pattern with the rows that are not scored set to even attention (so a named mistake is recognised)."""
    out = circuits.uniform_causal_pattern(pattern).clone()
    out[:, rows] = pattern[:, rows]
    return out


def _classes(key: Tensor) -> Tensor:
    return torch.unique(key, return_inverse=True)[1]


def check_mlp_key_body(fn: Callable, attempt: Attempt) -> None:
    model = models.load_model("mystery_c")
    tokens, targets = mysteries.fresh_inputs("mystery_c", 0)
    key = _explained(fn, model, tokens, attempt)
    try:
        report = explanations.grade_mlp_key(model, lambda _: key, tokens, targets)
    except explanations.ExplanationRefused as err:
        raise _refused(attempt, err) from None
    _verdict(report, attempt, ("mean MLP output", "best single token"), _classes(key), tokens)


def _pattern_of(name: str, keys: Callable) -> Callable:
    return lambda tokens: _scored_rows(explanations.one_hot_rows(tokens, mysteries.READ[name], keys(tokens)),
                                       mysteries.READ[name])


# ---------------------------------------------------------------------------------------- mystery a
check_what_it_computes_a = exercise(
    "10.1", "what mystery a computes", mysteries.pointed_token, function="what_it_computes_a",
    hint="look at many inputs with the model's answer beside them: which input token does the answer equal, and what "
         "decides which one it is?",
    mistakes=(
        Mistake("positions counted from 1", "the model counts positions as Python does, from 0.",
                lambda t: t.gather(1, (t[:, -1:] - 1) % (t.shape[1] - 1)).squeeze(1)),
        Mistake("the last token itself", "the answer is one of the earlier tokens; the last one decides which.",
                lambda t: t[:, -1]),
        Mistake("positions counted from the end", "the last token counts from the start of the input.",
                lambda t: t.gather(1, t.shape[1] - 2 - t[:, -1:]).squeeze(1)),
    ))(_behaviour("mystery_a", _by_pointer))

check_explanation_a = exercise(
    "10.2", "mystery a's attention, predicted", mysteries.pointer_pattern, function="explanation_a",
    hint="read the QK circuit with the query's token on one side and the key's position on the other, and say in "
         "one sentence where the last position looks.",
    mistakes=(
        Mistake("the position after the named one (positions counted from 1)",
                "look again at which key position lights up for each query token: the model counts from 0.",
                _pattern_of("mystery_a", lambda t: (t[:, -1:] + 1).clamp(max=t.shape[1] - 1))),
        Mistake("the key whose token is largest", "that is chapter 03's model; this head's key side is about positions.",
                _pattern_of("mystery_a", lambda t: t[:, :-1].argmax(1, keepdim=True))),
        Mistake("positions counted from the end", "the diagonal of the QK picture runs from the first position.",
                _pattern_of("mystery_a", lambda t: t.shape[1] - 2 - t[:, -1:])),
    ))(_pattern_check("mystery_a"))

# ---------------------------------------------------------------------------------------- mystery b
check_what_it_computes_b = exercise(
    "10.3", "what mystery b computes", mysteries.sorted_values, function="what_it_computes_b",
    hint="line up the model's answers at the positions it is read with the tokens before the separator: which of them "
         "comes out first, which next?",
    mistakes=(
        Mistake("largest first", "read the model's first answer again: it is the smallest of the list.",
                lambda t: mysteries.sorted_values(t).flip(-1)),
        Mistake("the list as it came, unsorted", "line the answers up against the list again: they come out in "
                "another order.", lambda t: t[:, :mysteries.SORT_LENGTH]),
        Mistake("each position's own token (the answer one step too late)",
                "the model at a position predicts the token that comes next, not the one it sits on.",
                lambda t: t[:, mysteries.READ["mystery_b"]]),
    ))(_behaviour("mystery_b", _by_read_position))


def _order(tokens: Tensor) -> Tensor:
    return tokens[:, :mysteries.SORT_LENGTH].argsort(-1)


check_explanation_b = exercise(
    "10.4", "mystery b's attention, predicted", mysteries.sorting_pattern, function="explanation_b",
    hint="for each query token, which key tokens score highest in the QK circuit? Compare the key's value with the "
         "query's; then say which list position holds the winner.",
    mistakes=(
        Mistake("each position attends to the list in its own order (the k-th answer to position k)",
                "the attention follows the tokens' values, not where they sit in the list.",
                _pattern_of("mystery_b", lambda t: torch.arange(mysteries.SORT_LENGTH).expand(len(t), -1))),
        Mistake("each position attends to where its own token sits in the list",
                "that copies the token the position already holds: the head looks one value further up.",
                _pattern_of("mystery_b", lambda t: torch.cat([_order(t)[:, :1], _order(t)[:, :-1]], 1))),
        Mistake("attention to the list token closest in value to the query's, above or below",
                "a key with a smaller value than the query's scores low, however close: the head looks only up.",
                _pattern_of("mystery_b", lambda t: (t[:, :mysteries.SORT_LENGTH, None]
                                                   - t[:, None, mysteries.READ["mystery_b"]]).abs().argmin(1))),
    ))(_pattern_check("mystery_b"))

# ---------------------------------------------------------------------------------------- mystery c
check_what_it_computes_c = exercise(
    "10.5", "what mystery c computes", mysteries.distance, function="what_it_computes_c",
    hint="tabulate the answer over both tokens (a 64 x 64 picture): along which lines is it constant, and how does it "
         "grow away from them?",
    mistakes=(
        Mistake("the difference with its sign", "read the answers where the first token is the smaller: they are "
                "not negative.", lambda t: t[:, 0] - t[:, 1]),
        Mistake("the sum", "the answer is 0 whenever the two tokens are equal.", lambda t: t.sum(1)),
        Mistake("the larger token", "the answer is 0 whenever the two tokens are equal, however large they are.",
                lambda t: t.max(1).values),
    ))(_behaviour("mystery_c", _by_order))

check_mlp_key_c = exercise(
    "10.6", "what mystery c's MLP reads", mysteries.distance, function="mlp_key_c",
    hint="plot the neurons' activations over both tokens: along which lines is each constant? The key is the "
         "quantity that is constant along them.",
    mistakes=(
        Mistake("the sum of the tokens", "the neurons' activations are constant along the other diagonal.",
                lambda t: _classes(t.sum(1))),
        Mistake("the larger token", "pairs with the same larger token but different answers need different outputs.",
                lambda t: _classes(t.max(1).values)),
        Mistake("a coarser version of the right quantity",
                "the key must tell apart every two inputs whose answers differ.",
                lambda t: _classes(mysteries.distance(t) // 2)),
    ))(check_mlp_key_body)
