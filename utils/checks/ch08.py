"""The checkers of chapter 08: from circuits to a proof."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from utils import models, proofs, tasks
from utils.checks.engine import Case, Mistake, exercise
from utils.checks.fixtures import fresh_model, noisy_model


def _tied_lists(n: int = 6, below: int = 8, count: int = 300) -> Tensor:
    """Random lists of small tokens, so that most of them hold their maximum more than once."""
    return torch.randint(0, below, (count, n))


def _on_max_cases() -> list[Case]:
    return [("on a noisy checkpoint, lists of 6 tokens below 8 (many ties)", (noisy_model("max_of_list", 0.3), _tied_lists())),
            ("on a fresh model, lists of 4 tokens below 5", (fresh_model("max_of_list"), _tied_lists(4, 5)))]


def _one_copy(lists: Tensor, last: bool) -> Tensor:
    """All the weight on the first (or last) copy of each list's maximum, [batch, key]."""
    is_max = (lists == lists.max(-1, keepdim=True).values).long()
    index = (is_max * torch.arange(1, lists.shape[1] + 1)).argmax(-1) if last else is_max.argmax(-1)
    return F.one_hot(index, lists.shape[1]).float()


check_logits_attention_on_max = exercise(
    "8.1", "the attention replaced by the explanation", proofs.logits_attention_on_max,
    function="logits_attention_on_max", cases=_on_max_cases, atol=1e-4,
    hint="hook the attention pattern and overwrite the last query's row: equal weight on every position that holds "
         "the list's maximum, zero elsewhere; return the logits at the last position.",
    mistakes=(
        Mistake("all the attention on the first copy of the maximum",
                "a tied maximum sits at several positions, and each copy reads its own OV row: share the weight "
                "equally between them.", lambda model, lists: proofs.logits_with_last_row(model, lists, _one_copy(lists, False))),
        Mistake("all the attention on the last copy of the maximum",
                "a tied maximum sits at several positions: share the weight equally between them.",
                lambda model, lists: proofs.logits_with_last_row(model, lists, _one_copy(lists, True))),
        Mistake("uniform attention over every key",
                "the explanation says the head attends to the maximum, not to every key alike.",
                lambda model, lists: proofs.logits_with_last_row(model, lists,
                                                                 torch.full(lists.shape, 1 / lists.shape[1]))),
        Mistake("the model's own logits (the pattern not replaced)",
                "a hook changes the run only if it returns the new pattern (or writes into it) at the pattern's "
                "hook point, layer 0.", lambda model, lists: model(lists)[:, -1]),
    ))


def _brute_cases() -> list[Case]:
    return [("on a noisy checkpoint, lists of length 2", (noisy_model("max_of_list", 0.4), 2)),
            ("on a very noisy checkpoint, lists of length 2", (noisy_model("max_of_list", 0.8), 2)),
            ("on a noisy checkpoint, lists of length 3", (noisy_model("max_of_list", 0.5), 3))]


def _predictions(model, n: int, position: int = -1) -> tuple[Tensor, Tensor]:
    """Every list of length n and the model's prediction at `position` on each."""
    lists = tasks.all_lists(n, model.cfg.d_vocab)
    return lists, models.predictions(model, lists)[:, position]


def _untied_only(model, n: int) -> float:
    """The reference's accuracy over the lists whose maximum is not tied, from the lists it got wrong."""
    def untied(lists: Tensor) -> Tensor:
        top = lists.topk(2, -1).values
        return top[:, 0] != top[:, 1]
    lists = tasks.all_lists(n, model.cfg.d_vocab)
    total = int(untied(lists).sum())
    return (total - int(untied(proofs.brute_force(model, n)["wrong"]).sum())) / total


check_brute_force_accuracy = exercise(
    "8.2", "brute force", proofs.brute_force_accuracy, function="brute_force_accuracy",
    cases=_brute_cases, atol=1e-6,
    hint="every list of length n over the whole vocabulary, in batches; the answer is the logit argmax at the last "
         "position, right when it is the list's maximum; the share of right answers over all of them.",
    mistakes=(
        Mistake("the answer compared with the last token, not the maximum",
                "the model predicts the largest value of the list, wherever it sits.",
                lambda model, n: (lambda lists, said: (said == lists[:, -1]).float().mean().item())(
                    *_predictions(model, n))),
        Mistake("the prediction read at the first position",
                "the list's answer is read where the whole list is in view: the last position.",
                lambda model, n: (lambda lists, said: (said == lists.max(-1).values).float().mean().item())(
                    *_predictions(model, n, position=0))),
        Mistake("the lists with a tied maximum left out",
                "a brute force runs every input: ties are lists too (and the easy ones).",
                _untied_only),
    ))


def _cell_cases() -> list[Case]:
    noisy = noisy_model("max_of_list", 0.2)
    return [("on a noisy checkpoint, length 4, other tokens <= 40", (noisy, 4, 40)),
            ("on a noisy checkpoint, length 6, other tokens <= 12", (noisy, 6, 12)),
            ("on a fresh model, length 3, other tokens <= 25", (fresh_model("max_of_list"), 3, 25))]


def _attention(model, n: int, lo: int, change: Callable) -> Tensor:
    """The reference on the circuits' attention scores [t, key_pos, y] changed by `change(scores, lo)`."""
    scores, ov, direct = proofs.circuit_pieces(model, n)
    return proofs.least_attention_of_pieces((change(scores, lo), ov, direct), lo)


def _no_rivals(scores: Tensor, lo: int) -> Tensor:
    """The scores of the positions before the query with no rival there (no weight on a token <= lo)."""
    emptied = scores[:, :-1].clone()
    emptied[:, :, : lo + 1] = -torch.inf
    return emptied


def _one_rival(scores: Tensor, lo: int) -> Tensor:
    """No rival at the earlier positions, the strongest of them at one extra position (where the maximum never
    sits: its score there is +inf, its share 1)."""
    strongest = scores[:, :-1, : lo + 1].amax((1, 2))[:, None, None].expand(-1, 1, lo + 1)
    slot = torch.cat([strongest, torch.full_like(scores[:, :1, lo + 1:], torch.inf)], -1)
    return torch.cat([slot, _no_rivals(scores, lo), scores[:, -1:]], 1)


def _query_key_left_out(model, n: int, lo: int) -> Tensor:
    """The reference with no weight on the query's own key when it is not the maximum (its score -inf)."""
    def hidden(scores, lo):
        scores = scores.clone()
        scores[:, -1].diagonal().fill_(-torch.inf)
        return scores
    vocab = model.cfg.d_vocab
    return torch.where(torch.eye(vocab, dtype=torch.bool), proofs.least_attention_on_max(model, n, lo),
                       _attention(model, n, lo, hidden))


def _at_best_position(model, n: int, lo: int) -> Tensor:
    """The best over j of the reference with the maximum held at position j (at every other position before the
    query its score is +inf, where its share would be 1)."""
    def only_at(j: int) -> Callable:
        def change(scores, lo):
            scores = scores.clone()
            scores[:, [k for k in range(n - 1) if k != j], lo + 1:] = torch.inf
            return scores
        return change
    return torch.stack([_attention(model, n, lo, only_at(j)) for j in range(n - 1)]).amax(0)


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
                # as if the maximum sat at a position of its own, every earlier position keeping its rival
                lambda *args: _attention(*args, lambda s, lo: torch.cat([s[:, :-1], _no_rivals(s, lo), s[:, -1:]], 1))),
        Mistake("the query's own key left out of the denominator",
                "the last position attends to itself too: when the last token is not the maximum, its key takes "
                "a share.", _query_key_left_out),
        Mistake("a single rival key instead of one per position",
                "every position before the query can hold a rival, and each takes its own share.",
                lambda *args: _attention(*args, _one_rival)),
        Mistake("the maximum at its best position, not its worst",
                "a bound must hold wherever the maximum sits: take the position where its share is least.",
                _at_best_position),
    ))


def _margin(model, n: int, lo: int, **changed: Callable) -> Tensor:
    """The reference's least margin with some of its tables changed (changed[name](tables) gives the new one)."""
    pieces = proofs.circuit_pieces(model, n)
    tables = proofs.margin_tables(pieces)
    tables.update({name: change(tables) for name, change in changed.items()})
    return proofs.least_margin_of_pieces(pieces, lo, tables=tables)


def _mix_trusted(model, n: int, lo: int) -> Tensor:
    """The reference with the mix p a + (1 - p) b taken as it is: the worst case over shares above the least one,
    min(mix, a), is the mix less (1 - p)(b - a) where b > a, so that much is handed back through the allowance."""
    pieces = proofs.circuit_pieces(model, n)
    tables = proofs.margin_tables(pieces)
    p = proofs.least_attention_of_pieces(pieces, lo)[:, :, None]
    given_back = (1 - p) * (proofs.other_keys_lead(tables, lo) - tables["a"]).clamp(min=0)
    return proofs.least_margin_of_pieces(pieces, lo, allowance=-given_back, tables=tables)


check_least_margin = exercise(
    "8.4", "the least margin of a cell", proofs.least_margin, function="least_margin",
    cases=_cell_cases, atol=1e-4,
    hint="for each rival, the direct path's lead plus the attention-weighted lead of the OV rows: the maximum's rows "
         "at their worst, the other tokens' rows (the query's own included) at their worst, mixed by the least share "
         "on the maximum, but never counted as better than the maximum's own rows alone; the least over rivals.",
    mistakes=(
        Mistake("the direct path left out",
                "the query token's embedding reaches the logits around the head, and its lead (or deficit) counts "
                "in every cell.", lambda *args: _margin(*args, d=lambda tables: torch.zeros_like(tables["d"]))),
        Mistake("the mix trusted when the other tokens lead more than the maximum",
                "the real share on the maximum can be anything above the least one; when the other rows lead by "
                "more, a larger share makes the margin worse, so the worst case is then the maximum's rows alone.",
                _mix_trusted),
        Mistake("the query token's own OV row left out",
                "when the last token is not the maximum, the query attends to its own key too and its row counts "
                "among the others.", lambda *args: _margin(*args, lead_q=lambda tables: torch.full_like(tables["lead_q"],
                                                                                               torch.inf))),
        Mistake("the maximum's row at the query position left out when the last token is the maximum",
                "when the list ends with its maximum, that copy sits at the query position and reads that "
                "position's OV row.", lambda *args: _margin(*args, a=lambda tables: tables["a_before_q"])),
    ))


def _largest_tables() -> Tensor:
    vocab = tasks.MAX_OF_LIST_VOCAB
    t, m = torch.arange(vocab)[:, None], torch.arange(vocab)[None, :]
    lo = m - torch.randint(1, 6, (vocab, vocab))
    return torch.where((m >= t) & ((t == m) | (lo >= t)), lo, torch.full_like(lo, -2))


def _count_cases() -> list[Case]:
    return [("on a random table of certified cells, length 3", (_largest_tables(), 3)),
            ("on a random table of certified cells, length 6", (_largest_tables(), 6))]


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
                lambda largest, n: proofs.certified_count(largest, n, lambda vocab, n, t, m, lo: (lo + 2) ** (n - 1))),
        Mistake("the maximum not counted among the values of the earlier positions",
                "an earlier position may hold another copy of the maximum as well as a small token.",
                lambda largest, n: proofs.certified_count(largest, n, lambda vocab, n, t, m, lo: (
                    (lo + 1) ** (n - 1) if t == m else (lo + 1) ** (n - 1) - lo ** (n - 1)))),
        Mistake("the last position counted as free",
                "the last token is the cell's own: only the positions before it are free.",
                lambda largest, n: proofs.certified_count(largest, n, lambda vocab, n, t, m, lo: proofs.cell_count(
                    vocab, n + 1, t, m, lo))),
    ))


