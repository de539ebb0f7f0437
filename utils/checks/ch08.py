"""The checkers of chapter 08: from circuits to a proof."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from utils import circuits, fourier, models, proofs, tasks, train
from utils.checks.engine import (Attempt, Case, CheckFailed, Mistake, call_learner, check_case, compare,
                                 compare_float, compare_tensors, copies, diagnosis, exercise, matches, passed)
from utils.checks.fixtures import (fresh_model, noisy_addition, noisy_model, random_causal_pattern,
                                   random_models, smooth_curves)
from utils.tasks import IGNORE



def _tied_lists(n: int = 6, below: int = 8, count: int = 300) -> Tensor:
    """Random lists of small tokens, so that most of them hold their maximum more than once."""
    return torch.randint(0, below, (count, n))


def _on_max_cases() -> list[Case]:
    return [("on a noisy checkpoint, lists of 6 tokens below 8 (many ties)", (noisy_model("max_of_list", 0.3), _tied_lists())),
            ("on a fresh model, lists of 4 tokens below 5", (fresh_model("max_of_list"), _tied_lists(4, 5)))]


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
    return [("on a noisy checkpoint, lists of length 2", (noisy_model("max_of_list", 0.4), 2)),
            ("on a very noisy checkpoint, lists of length 2", (noisy_model("max_of_list", 0.8), 2)),
            ("on a noisy checkpoint, lists of length 3", (noisy_model("max_of_list", 0.5), 3))]


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
    noisy = noisy_model("max_of_list", 0.2)
    return [("on a noisy checkpoint, length 4, other tokens <= 40", (noisy, 4, 40)),
            ("on a noisy checkpoint, length 6, other tokens <= 12", (noisy, 6, 12)),
            ("on a fresh model, length 3, other tokens <= 25", (fresh_model("max_of_list"), 3, 25))]


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


