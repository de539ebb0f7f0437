"""An explanation put in the model's place (chapter 10): the test of an interpretation.

An explanation of an attention head is a rule that gives, from the tokens alone, the pattern the
head makes; an explanation of an MLP is the one quantity of the input its output depends on (its
*key*). Either is graded by running the model with its own pattern, or its own MLP output,
replaced by what the explanation says, and comparing the loss with the model's and with two
nulls: the share of the loss recovered,

    recovered = (null loss - explanation's loss) / (null loss - model's loss),

is 1 when the explanation does all the model does and 0 when it does no better than the null.

Nulls for a pattern: even attention over the visible positions, and the best fixed position (each
scored row puts all its weight on the one key position that serves it best on these inputs).
Nulls for an MLP key: one class for every input (the MLP's mean output), and the best single token.
An explanation may not run the model or read its weights: it must predict, not copy.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from transformer_lens.utilities import get_act_name

from utils import circuits
from utils.tasks import IGNORE

PASS_RECOVERED = 0.9  # an explanation passes when it recovers at least this share of the loss
PASS_ACCURACY_DROP = 0.05  # ... and keeps the model's accuracy to within five percentage points
MAX_KEY_CLASSES = 128  # a key is a summary: at most this many distinct values (the tokens themselves are not one)


class ExplanationRefused(Exception):
    """An explanation that ran the model or read its weights, or gave something that is not a pattern or key."""


# --------------------------------------------------------------------- the explanation may not use the model
class _NoWeights(TorchFunctionMode):
    """Refuses any torch operation on the model's weights, or on a tensor equal to one (a copy, another load)."""

    def __init__(self, weights: list[Tensor]):
        super().__init__()
        self.refusal: ExplanationRefused | None = None
        self.storages = {_storage(w) for w in weights}
        self.by_shape: dict[tuple, list[Tensor]] = {}
        for w in weights:
            if w.numel() > 1 and bool((w != w.flatten()[0]).any()):  # a zero bias is not a fingerprint
                self.by_shape.setdefault(tuple(w.shape), []).append(w.detach())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in tree_flatten((args, kwargs))[0]:
            if isinstance(value, Tensor) and (_storage(value) in self.storages or any(
                    torch.equal(value, w) for w in self.by_shape.get(tuple(value.shape), ()))):
                self.refuse("it read the model's weights: an explanation predicts from the tokens alone, as a rule "
                            "you could say in a sentence")
        return func(*args, **kwargs)

    def refuse(self, why: str) -> None:
        self.refusal = self.refusal or ExplanationRefused(why)
        raise self.refusal


def _storage(tensor: Tensor) -> int:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return -1


@contextlib.contextmanager
def without_the_model(model: torch.nn.Module):
    """While open, running any module, or reading `model`'s weights (or a copy of them), raises ExplanationRefused.

    Yields a watch whose ``refusal`` is the first refusal raised inside (None if none), so that a caller
    whose own code turned the exception into another can still tell why.
    """
    watch = _NoWeights(list(model.parameters()) + list(model.buffers()))

    def refuse_forward(module, args):
        watch.refuse("it ran the model: an explanation predicts from the tokens alone, it does not copy what the "
                     "model does")

    handle = torch.nn.modules.module.register_module_forward_pre_hook(refuse_forward)
    try:
        with watch:
            yield watch
    finally:
        handle.remove()


def explanation_output(explanation, model, tokens: Tensor) -> Tensor:
    """What `explanation(tokens)` returns, run where it cannot use `model` (a copy of the tokens is passed)."""
    with without_the_model(model):
        out = explanation(tokens.clone())
    if not isinstance(out, Tensor):
        raise ExplanationRefused(f"it returned a {type(out).__name__}, not a tensor")
    return out.detach()


# --------------------------------------------------------------------- scores
def read_loss_and_accuracy(logits: Tensor, targets: Tensor) -> dict:
    """Mean cross-entropy and accuracy over the positions whose target is not IGNORE."""
    keep = targets != IGNORE
    logits, targets = logits[keep], targets[keep]
    return {"loss": F.cross_entropy(logits, targets).item(),
            "accuracy": (logits.argmax(-1) == targets).float().mean().item()}


def targets_at(tokens: Tensor, answers: Tensor, rows: slice) -> Tensor:
    """Targets [batch, pos]: `answers` ([batch] or [batch, k]) at the positions `rows`, IGNORE elsewhere."""
    targets = torch.full_like(tokens, IGNORE)
    targets[:, rows] = answers.reshape(len(tokens), -1).to(tokens.dtype)
    return targets


def recovered(null: float, explained: float, model: float) -> float:
    """The share of the loss an explanation recovers: 1 for the model's loss, 0 for the null's."""
    return (null - explained) / (null - model)


def _report(scores: dict[str, dict], null: str) -> dict[str, dict]:
    for row in scores.values():
        row["recovered"] = recovered(scores[null]["loss"], row["loss"], scores["model"]["loss"])
    return scores


def passes(report: dict[str, dict], row: str = "explanation") -> bool:
    """Whether `row` of a report keeps the model's accuracy (within PASS_ACCURACY_DROP) and recovers PASS_RECOVERED."""
    return (report[row]["accuracy"] >= report["model"]["accuracy"] - PASS_ACCURACY_DROP
            and report[row]["recovered"] >= PASS_RECOVERED)


# --------------------------------------------------------------------- patterns
def logits_with_rows_replaced(model, tokens: Tensor, pattern: Tensor, rows: slice) -> Tensor:
    """Logits with the query rows `rows` of layer 0's pattern (every head) replaced by `pattern` [batch, pos, pos]."""
    def replace(old, hook=None):
        new = old.clone()
        new[:, :, rows] = pattern[:, None, rows].to(old.dtype)
        return new

    return circuits.logits_with_pattern_replaced(model, tokens, replace)


def checked_pattern(pattern: Tensor, tokens: Tensor, rows: slice) -> Tensor:
    """`pattern`, or ExplanationRefused saying why it is not an attention pattern at the scored rows."""
    n = tokens.shape[1]
    if pattern.shape != (len(tokens), n, n):
        raise ExplanationRefused(f"the pattern has shape {tuple(pattern.shape)}; a pattern for {len(tokens)} inputs of "
                                 f"{n} tokens is [batch, query position, key position] = {(len(tokens), n, n)}")
    scored = pattern[:, rows].float()
    future = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)[rows]
    if not torch.isfinite(scored).all() or (scored < -1e-6).any():
        raise ExplanationRefused("the pattern has negative or non-finite weights where the model is read")
    if (scored[:, future].abs() > 1e-6).any():
        raise ExplanationRefused("the pattern puts weight on later positions, which a causal head cannot see")
    sums = scored.sum(-1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
        raise ExplanationRefused(f"a row of the pattern sums to {sums.flatten()[(sums - 1).abs().flatten().argmax()]:.3f}, "
                                 "not 1: attention weights over the visible positions add up to 1")
    return pattern.float()


def best_fixed_position_pattern(model, tokens: Tensor, targets: Tensor, rows: slice) -> Tensor:
    """The null that attends to one fixed key position per scored row, the one with the lowest loss on these inputs."""
    n = tokens.shape[1]
    row_ids = torch.arange(n)[rows]
    losses = torch.full((len(row_ids), n), float("inf"))
    for key in range(n):
        keys = torch.full((len(tokens), len(row_ids)), key)
        logits = logits_with_rows_replaced(model, tokens, one_hot_rows(tokens, rows, keys), rows)
        per_row = F.cross_entropy(logits[:, rows].transpose(1, 2), targets[:, rows], ignore_index=IGNORE,
                                  reduction="none").mean(0)
        losses[:, key] = torch.where(row_ids >= key, per_row, torch.inf)  # a row cannot see later keys
    best = losses.argmin(-1)
    return one_hot_rows(tokens, rows, best.expand(len(tokens), -1))


def one_hot_rows(tokens: Tensor, rows: slice, keys: Tensor) -> Tensor:
    """A pattern [batch, pos, pos]: even attention, except rows `rows`, which put all their weight on `keys` [batch, rows]."""
    n = tokens.shape[1]
    pattern = circuits.uniform_causal_pattern(torch.zeros(len(tokens), n, n)).clone()
    pattern[:, rows] = F.one_hot(keys, n).float()
    return pattern


@torch.no_grad()
def grade_pattern(model, explanation, tokens: Tensor, targets: Tensor, rows: slice) -> dict[str, dict]:
    """Loss, accuracy and loss recovered of the model, the explanation's pattern in its place, and the two nulls.

    The report's rows: "model", "explanation", "even attention", "best fixed position"; the
    share recovered is measured from even attention.
    """
    pattern = checked_pattern(explanation_output(explanation, model, tokens), tokens, rows)
    n = tokens.shape[1]
    even = circuits.uniform_causal_pattern(torch.zeros(len(tokens), n, n))
    scores = {"model": read_loss_and_accuracy(model(tokens), targets),
              "explanation": read_loss_and_accuracy(logits_with_rows_replaced(model, tokens, pattern, rows), targets),
              "even attention": read_loss_and_accuracy(logits_with_rows_replaced(model, tokens, even, rows), targets),
              "best fixed position": read_loss_and_accuracy(logits_with_rows_replaced(
                  model, tokens, best_fixed_position_pattern(model, tokens, targets, rows), rows), targets)}
    return _report(scores, "even attention")


# --------------------------------------------------------------------- MLP keys
def checked_key(key: Tensor, tokens: Tensor) -> Tensor:
    """`key` as class numbers 0..k-1 [batch], or ExplanationRefused saying why it is not a key."""
    if key.shape != (len(tokens),):
        raise ExplanationRefused(f"the key has shape {tuple(key.shape)}; it is one number per input: "
                                 f"({len(tokens)},)")
    if not torch.isfinite(key.float()).all():
        raise ExplanationRefused("the key has non-finite values")
    classes = torch.unique(key, return_inverse=True)[1]
    if int(classes.max()) + 1 > MAX_KEY_CLASSES:
        raise ExplanationRefused(f"the key takes {int(classes.max()) + 1} different values; a key is a summary of the "
                                 f"input, at most {MAX_KEY_CLASSES} values (the tokens themselves explain nothing)")
    return classes


def logits_with_mlp_by_key(model, tokens: Tensor, classes: Tensor, layer: int = 0) -> Tensor:
    """Logits with every input's MLP output replaced by the mean MLP output over the inputs of its class."""
    name = get_act_name("mlp_out", layer)
    _, cache = model.run_with_cache(tokens, names_filter=name)
    out = cache[name]
    k = int(classes.max()) + 1
    sums = torch.zeros((k,) + out.shape[1:]).index_add_(0, classes, out)
    means = sums / torch.bincount(classes, minlength=k).view(-1, *[1] * (out.dim() - 1))
    return model.run_with_hooks(tokens, fwd_hooks=[(name, lambda act, hook: means[classes])])


@torch.no_grad()
def grade_mlp_key(model, explanation, tokens: Tensor, targets: Tensor) -> dict[str, dict]:
    """Loss, accuracy and loss recovered of the model, its MLP output averaged within the explanation's key classes,
    and the nulls: one class for all ("mean MLP output") and the better of the single tokens ("best single token").
    """
    classes = checked_key(explanation_output(explanation, model, tokens), tokens)
    one = torch.zeros(len(tokens), dtype=torch.long)
    singles = [read_loss_and_accuracy(logits_with_mlp_by_key(model, tokens, tokens[:, i]), targets)
               for i in range(tokens.shape[1])]
    scores = {"model": read_loss_and_accuracy(model(tokens), targets),
              "explanation": read_loss_and_accuracy(logits_with_mlp_by_key(model, tokens, classes), targets),
              "mean MLP output": read_loss_and_accuracy(logits_with_mlp_by_key(model, tokens, one), targets),
              "best single token": min(singles, key=lambda s: s["loss"])}
    return _report(scores, "mean MLP output")
