"""The checkers of chapter 02: zero-layer models."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from utils import circuits, models, tasks
from utils.checks.engine import Case, Mistake, exercise
from utils.checks.fixtures import fresh_model

def _bigram_model() -> list[Case]:
    """A freshly initialised bigram model with a non-zero unembedding bias."""
    model = fresh_model("bigram")
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
    model = fresh_model("max_of_list")
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


def _without_w_pos(model, tokens: Tensor) -> Tensor:
    return circuits.direct_path_logits(model, tokens) - model.W_pos[tokens.shape[-1] - 1] @ model.W_U


check_direct_path_logits = exercise(
    "2.3", "what the direct path adds to each logit", circuits.direct_path_logits, function="direct_path_logits",
    kind="analysis", cases=_max_lists, atol=1e-4,
    hint="the direct path carries what the embeddings put in the residual stream at the last position (the token and "
         "the position both write there) straight to the unembedding, bias included.",
    mistakes=(
        Mistake("the token's embedding without W_pos",
                "the residual stream at a position starts as the token's embedding plus the position's.",
                _without_w_pos),
        Mistake("the first position instead of the last",
                "the model answers at the last position of each list: read its token and its position.",
                lambda model, tokens: circuits.direct_path_logits(model, tokens[:, :1])),
        Mistake("the logits without the unembedding bias b_U",
                "no head writes the bias, so count it with the direct path: then the terms add up to the logits.",
                lambda model, tokens: circuits.direct_path_logits(model, tokens) - model.b_U),
        Mistake("the last position of the context, not of the list",
                "on a list shorter than n_ctx the last position is the list's own last index.",
                lambda model, tokens: (model.W_E[tokens[:, -1]] + model.W_pos[-1]) @ model.W_U + model.b_U),
    ))


def _boost_lists() -> list[Case]:
    model = _max_of_list_with_logit_bias()
    return [("on a fresh max_of_list model, 300 lists of length 6", (model, torch.randint(0, 64, (300, 6))))]


def _boosts(model, tokens: Tensor, direct: Tensor | None = None, head: Tensor | None = None) -> tuple[float, float]:
    """The reference's two boosts, with the direct path's or the head's term swapped for a mistaken one."""
    answer, (right_direct, right_head) = tokens.max(-1).values, circuits.logit_terms(model, tokens)
    return (circuits.correct_logit_boost(right_direct if direct is None else direct, answer),
            circuits.correct_logit_boost(right_head if head is None else head, answer))


def _raw_correct_logits(model, tokens: Tensor) -> tuple[float, float]:
    """Each term's mean logit for the right answer, not centred: the reference's boost plus the term's mean logit."""
    answer = tokens.max(-1).values
    return tuple(circuits.correct_logit_boost(term, answer) + term.mean().item()
                 for term in circuits.logit_terms(model, tokens))


def _boosts_against_the_mean_over_lists(model, tokens: Tensor) -> tuple[float, float]:
    answer = tokens.max(-1).values
    return tuple((x[torch.arange(len(x)), answer] - x.mean(0)[answer]).mean().item()
                 for x in circuits.logit_terms(model, tokens))


check_logit_boosts = exercise(
    "2.4", "who pushes the right answer up?", circuits.logit_boosts, function="logit_boosts",
    kind="analysis", cases=_boost_lists, atol=1e-3,
    hint="split the logits at the last position into the direct path and the head's output (read from the cache and "
         "unembedded); for each, a list's boost is its logit for the list's maximum minus its mean logit over the "
         "vocabulary; average the boosts over the lists.",
    mistakes=(
        Mistake("the raw logit of the right answer, not centred on the term's mean logit",
                "a term that raises every logit by the same amount (the bias, a shared direction) helps no answer; "
                "a logit attribution measures the right answer's logit against the same term's mean logit over "
                "the vocabulary, on each list.",
                _raw_correct_logits),
        Mistake("the direct path without W_pos",
                "the position's embedding is in the residual stream too, and reaches the unembedding directly.",
                lambda model, tokens: _boosts(model, tokens, direct=_without_w_pos(model, tokens))),
        Mistake("the direct path at the first position",
                "both terms must be read where the model answers, at the last position.",
                lambda model, tokens: _boosts(model, tokens,
                                              direct=circuits.direct_path_logits(model, tokens[:, :1]))),
        Mistake("the direct path without b_U",
                "count the unembedding bias with the direct path, so that the two terms add up to the logits.",
                lambda model, tokens: _boosts(model, tokens,
                                              direct=circuits.direct_path_logits(model, tokens) - model.b_U)),
        Mistake("the mean logit over the lists instead of over the vocabulary",
                "a boost compares the correct logit with the other logits of the same list.",
                _boosts_against_the_mean_over_lists),
        Mistake("the head's term taken from the whole logits",
                "the logits already contain the direct path; the head's own term is its output times W_U.",
                lambda model, tokens: _boosts(model, tokens, head=model(tokens)[:, -1])),
    ))


def _ablation_lists() -> list[Case]:
    model = _max_of_list_with_logit_bias(layer_biases=True)
    return [("on a fresh max_of_list model, 200 lists of length 6", (model, torch.randint(0, 64, (200, 6))))]


def _ablated(model, tokens: Tensor, replace: Callable) -> Tensor:
    """The reference's logits with the embeddings' mean over the lists swapped for `replace(embeddings)`."""
    _, cache = model.run_with_cache(tokens)
    embeddings = cache["resid_pre", 0]
    swapped = replace(embeddings) - embeddings[:, -1].mean(0)
    return circuits.logits_without_direct_path(model, tokens) + swapped @ model.W_U


def _ablated_upstream(model, tokens: Tensor) -> Tensor:
    """Every list's embeddings replaced by their mean before the head reads them."""
    return model.run_with_hooks(tokens, fwd_hooks=[
        ("blocks.0.hook_resid_pre", lambda resid, hook: resid.mean(0, keepdim=True).expand_as(resid))])[:, -1]


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


