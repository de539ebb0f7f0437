"""Chapter 04's pieces of the max_of_list proof, against brute force on the model itself.

The four QK terms, the score table, the worst-case score margin over key positions and the
attention the maximum needs are what chapter 08's accuracy bound is built from; each is
checked here against what the model computes when it runs on lists (hooks on q, k and the
attention pattern), so that a wrong sign, a missed position or a bound that does not bound fails.
"""

from __future__ import annotations

import pytest
import torch

from utils import circuits, models, tasks



pytestmark = pytest.mark.usefixtures("reading_only")


@pytest.fixture(scope="module")
def shipped():
    return models.load_model("max_of_list")


@pytest.fixture(scope="module")
def noisy(shipped):
    torch.manual_seed(5)
    state = {k: w + 0.1 * (w.std() if w.numel() > 1 else 1.0) * torch.randn_like(w)
             for k, w in shipped.state_dict().items()}
    return models.model_from_state(dict(models.spec("max_of_list").config), state)


def _scores_on_lists(model, lists: torch.Tensor) -> torch.Tensor:
    """The head's attention scores from the last position, q . k / sqrt(d_head), read from the cache, [batch, key_pos]."""
    _, cache = model.run_with_cache(lists, names_filter=lambda name: name.endswith(("hook_q", "hook_k")))
    q, k = cache["q", 0][:, -1, 0], cache["k", 0][:, :, 0]  # [batch, d_head], [batch, pos, d_head]
    return torch.einsum("bd,bkd->bk", q, k) / model.cfg.d_head ** 0.5


def test_the_nine_terms_add_up_to_the_positional_circuit_and_depend_on_what_their_names_say(noisy):
    for q, k in [(5, 2), (1, 1), (3, 0), (0, 0)]:
        terms = circuits.qk_score_terms(noisy, q, k)
        assert list(terms) == list(circuits.QK_TERMS) and len(terms) == 9
        assert torch.allclose(sum(terms.values()), circuits.full_qk_positional(noisy, q, k), atol=1e-4)
        for name, term in terms.items():
            query_part, key_part = name.split("·")
            assert term.shape == (64, 64)
            if key_part != "token":  # the same for every key token
                assert torch.allclose(term, term[:, :1].expand(64, 64), atol=1e-5), name
            if query_part != "token":  # the same for every query token
                assert torch.allclose(term, term[:1].expand(64, 64), atol=1e-5), name
        assert terms["token·token"].std(-1).mean() > 0 and terms["const·token"].std(-1).mean() > 0


def test_the_parts_of_each_side_take_their_means_over_the_positions_that_side_can_hold(noisy):
    query, key = circuits.residual_parts(noisy, 3, "query"), circuits.residual_parts(noisy, 3, "key")
    assert torch.allclose(sum(query.values()), noisy.W_E + noisy.W_pos[3], atol=1e-6)
    assert torch.allclose(sum(key.values()), noisy.W_E + noisy.W_pos[3], atol=1e-6)
    assert torch.allclose(query["token"].mean(0), torch.zeros(32), atol=1e-6)
    assert torch.allclose(sum(circuits.residual_parts(noisy, q, "query")["pos"][0] for q in range(1, 6)), torch.zeros(32), atol=1e-5)
    assert torch.allclose(sum(circuits.residual_parts(noisy, k, "key")["pos"][0] for k in range(6)), torch.zeros(32), atol=1e-5)
    with pytest.raises(ValueError):
        circuits.residual_parts(noisy, 3, "value")


def test_moving_a_vector_from_w_pos_to_w_e_changes_the_split_as_stored_but_not_the_nine_terms(shipped):
    moved = models.moved_to_token_embeddings(shipped, "max_of_list", shipped.W_pos[1:].mean(0))
    lists = torch.randint(0, 64, (500, 6), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(moved(lists), shipped(lists), atol=1e-3)
    for q, k in [(5, 2), (1, 0)]:
        for a, b in zip(circuits.qk_score_terms(moved, q, k).values(), circuits.qk_score_terms(shipped, q, k).values()):
            assert torch.allclose(a, b, atol=1e-4)
    before = circuits.uncentred_qk_score_terms(shipped, 1, 0)["pos·token"]
    after = circuits.uncentred_qk_score_terms(moved, 1, 0)["pos·token"]
    assert torch.allclose(sum(circuits.uncentred_qk_score_terms(moved, 1, 0).values()),
                          circuits.full_qk_positional(moved, 1, 0), atol=1e-4)
    assert not torch.allclose(before, after, atol=1e-2)


def test_the_score_table_is_what_the_model_computes_on_lists(noisy):
    lists = torch.randint(0, 64, (500, 6), generator=torch.Generator().manual_seed(0))
    table = circuits.qk_score_table(noisy)
    for n in (2, 4, 6):
        measured = _scores_on_lists(noisy, lists[:, :n])
        q = n - 1
        from_table = table[q, lists[:, q, None], torch.arange(n), lists[:, :n]]
        assert torch.allclose(measured, from_table, atol=1e-4)


def test_ordering_by_term_sees_no_ordering_once_the_positions_are_gone(shipped):
    state = dict(shipped.state_dict())
    state["pos_embed.weight"] = torch.zeros_like(state["pos_embed.weight"])
    flat = models.model_from_state(dict(models.spec("max_of_list").config), state)
    table = circuits.ordering_by_term(flat, 5, 2)
    assert all(table[name] == (0.0, 0.0) for name in circuits.QK_TERMS if "pos" in name)
    terms = circuits.qk_score_terms(flat, 5, 2)  # without positions, the key-token terms are the token-only map
    assert circuits.fraction_ordered(terms["const·token"] + terms["token·token"]) == pytest.approx(
        circuits.fraction_ordered(circuits.full_qk_tokens(flat)), abs=1e-3)
    trained = circuits.ordering_by_term(shipped, 5, 2)
    assert trained["const·token"][0] == 1.0 and trained["const·token"][1] > 5 * trained["token·token"][1]


def test_taking_a_part_out_of_the_queries_gives_the_pattern_computed_by_hand(noisy):
    lists = torch.randint(0, 64, (300, 6), generator=torch.Generator().manual_seed(4))
    logits, pattern = circuits.run_without_query_part(noisy, lists, None)
    assert torch.allclose(logits, noisy(lists), atol=1e-5)
    _, cache = noisy.run_with_cache(lists, names_filter=lambda name: name.endswith("hook_k"))
    keys = cache["k", 0][:, :, 0]  # [batch, pos, d_head]
    causal = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    for part in ("pos", "const"):
        _, pattern = circuits.run_without_query_part(noisy, lists, part)
        residual = noisy.W_E[lists] + noisy.W_pos
        residual = residual - torch.stack([circuits.residual_parts(noisy, p, "query")[part][0] for p in range(6)])
        scores = torch.einsum("bqd,bkd->bqk", residual @ noisy.W_Q[0, 0], keys) / noisy.cfg.d_head ** 0.5
        expected = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        assert torch.allclose(pattern, expected, atol=1e-5), part


@pytest.mark.parametrize("n", [2, 3])
def test_the_worst_margin_is_the_least_margin_over_every_list_of_length_n(noisy, n):
    """Every configuration of query position n - 1 is a list of n tokens: enumerate them all.

    Length 2 also tells the cross-position comparison from the within-position one: with a single
    free key position, both keys at position 0 is a pair no list has.
    """
    lists = tasks.all_lists(n)
    scores = torch.cat([_scores_on_lists(noisy, chunk) for chunk in lists.split(65_536)])  # [list, key_pos]
    query = lists[:, n - 1]
    brute = torch.full((64, 64), float("inf"))
    for k1 in range(n):
        for k2 in range(n):
            if k1 == k2:
                continue
            c, b = lists[:, k1], lists[:, k2]
            keep = (c > b) & (c >= query)
            index = query[keep] * 64 + (c - b)[keep]
            margin = (scores[:, k1] - scores[:, k2])[keep]
            flat = brute.view(-1)
            flat.scatter_reduce_(0, index, margin, reduce="amin")
    worst = circuits.worst_margin_by_gap(noisy, n - 1)
    assert torch.equal(torch.isinf(worst), torch.isinf(brute))
    finite = torch.isfinite(brute)
    assert torch.allclose(worst[finite], brute[finite], atol=1e-4)


def test_no_list_of_length_6_beats_the_worst_margin(noisy):
    lists = torch.randint(0, 64, (20_000, 6), generator=torch.Generator().manual_seed(1))
    scores = _scores_on_lists(noisy, lists)
    worst = circuits.worst_margin_by_gap(noisy, 5)
    query = lists[:, 5]
    for k1 in range(6):
        for k2 in range(6):
            c, b = lists[:, k1], lists[:, k2]
            keep = (k1 != k2) & (c > b) & (c >= query)
            bound = worst[query[keep], (c - b)[keep]]
            assert ((scores[keep, k1] - scores[keep, k2]) >= bound - 1e-4).all()


def test_the_within_position_margin_is_a_different_comparison(shipped):
    cross = circuits.worst_margin_by_gap(shipped, 5)
    within = circuits.worst_margin_by_gap(shipped, 5, same_position=True)
    assert not torch.allclose(cross[torch.isfinite(cross)], within[torch.isfinite(cross)])
    assert torch.isinf(circuits.worst_margin_by_gap(shipped, 0)).all()  # one key: no pair


def _answer_with_last_row(model, lists: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """The model's answers at the last position with the last query's attention replaced by `row` [batch, key_pos]."""
    def replace(pattern, hook):
        pattern = pattern.clone()
        pattern[:, 0, -1, :] = row
        return pattern

    logits = model.run_with_hooks(lists, fwd_hooks=[("blocks.0.attn.hook_pattern", replace)])
    return logits[:, -1].argmax(-1)


def _row_with_share(lists: torch.Tensor, share: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random attention row with `share` [batch] on the copies of the maximum and the rest on the other keys."""
    on_max = lists == lists.max(-1, keepdim=True).values
    weights = torch.rand(lists.shape, generator=generator) ** 4 + 1e-6  # uneven splits too
    to_max = weights * on_max / (weights * on_max).sum(-1, keepdim=True)
    others = weights * ~on_max
    to_rest = others / others.sum(-1, keepdim=True).clamp(min=1e-12)
    return share[:, None] * to_max + (1 - share[:, None]) * to_rest


@pytest.mark.parametrize("worst_rest", [False, True])
def test_the_needed_share_always_wins(noisy, worst_rest):
    """Attention patterns chosen at random, with at least the needed share on the maximum: the answer is the maximum.

    Without worst_rest the need assumes the rest sits on the runner-up, so those lists hold only two values.
    """
    g = torch.Generator().manual_seed(2)
    need = circuits.attention_needed(noisy, worst_rest=worst_rest)
    checked = 0
    for n in range(2, 7):
        if worst_rest:
            lists = torch.randint(0, 64, (4000, n), generator=g)
        else:
            pair = torch.randint(0, 64, (4000, 2), generator=g)
            pick = torch.randint(0, 2, (4000, n), generator=g)
            lists = pair.gather(1, pick)
        top = lists.topk(2, dim=-1).values
        distinct = lists.max(-1).values > lists.min(-1).values
        runner = torch.where(lists < top[:, :1], lists, -1).max(-1).values
        m = top[:, 0]
        lists, m, runner = lists[distinct], m[distinct], runner[distinct]
        needed = need[m, runner]
        usable = needed < 1
        share = needed + (1 - needed) * torch.rand(needed.shape, generator=g) ** 2
        share = torch.where(usable, share.clamp(max=1.0), torch.ones_like(share))
        row = _row_with_share(lists[usable], share[usable], g)
        answers = _answer_with_last_row(noisy, lists[usable], row)
        assert (answers == m[usable]).all(), f"length {n}: {(answers != m[usable]).sum()} lists lost with the share needed"
        checked += int(usable.sum())
    assert checked > 10_000


def test_the_need_is_not_a_trivial_bound(shipped):
    need = circuits.attention_needed(shipped)
    need_any = circuits.attention_needed(shipped, worst_rest=True)
    m = torch.arange(1, 64)
    assert (need_any[m, m - 1] >= need[m, m - 1] - 1e-6).all()  # more freedom for the rest, more need
    assert 0.2 < need[m, m - 1].mean() < 0.9 and torch.isfinite(need[m, m - 1]).all()
    assert torch.isinf(need[m - 1, m]).all() and torch.isinf(need.diagonal()).all()  # runner-up not below the maximum
    # well below the need, some list with only the maximum and its runner-up is answered wrong
    g = torch.Generator().manual_seed(3)
    lost = 0
    for top in range(10, 64, 6):
        lists = torch.tensor([[top - 1] * 5 + [top - 1], [top] + [top - 1] * 5, [top - 1] * 4 + [top, top - 1]])
        share = torch.full((3,), max(need[top, top - 1].item() - 0.25, 0.0))
        answers = _answer_with_last_row(shipped, lists[1:], _row_with_share(lists[1:], share[1:], g))
        lost += int((answers != top).sum())
    assert lost > 0


def test_attention_on_maximum_reads_the_pattern_and_the_answers(shipped):
    lists = torch.tensor([[3, 9, 9, 1], [8, 2, 5, 7], [0, 0, 0, 0]])
    share, right = circuits.attention_on_maximum(shipped, lists)
    _, cache = shipped.run_with_cache(lists)
    row = cache["pattern", 0][:, 0, -1]
    assert torch.allclose(share, torch.stack([row[0, 1] + row[0, 2], row[1, 0], row[2].sum()]))
    answers = shipped(lists)[:, -1].argmax(-1)
    assert torch.equal(right, answers == lists.max(-1).values)


def test_key_pairs_out_of_order_counts_ties_and_wrong_orders_and_those_a_list_can_hold():
    scores = torch.tensor([[0.0, 1.0, 2.0],  # query token 0: every pair in order
                           [0.0, 0.0, 2.0],  # query token 1: keys 0 and 1 tie (a list with maximum 1 can hold it)
                           [2.0, 1.0, 0.0]])  # query token 2: every pair reversed; only pairs with key 2 are in a list
    assert circuits.key_pairs_out_of_order(scores) == (4, 3)
    assert circuits.key_pairs_out_of_order(circuits.full_qk_tokens(models.load_model("max_of_list")))[0] > 0


def test_the_trained_keys_reach_the_score_along_one_axis_and_untrained_ones_do_not(shipped):
    assert circuits.variance_on_first_key_axis(shipped) > 0.9
    assert circuits.variance_on_first_key_axis(models.build_model("max_of_list", seed=1)) < 0.5


def test_accuracy_and_gap1_share_read_the_model_and_its_pattern(noisy):
    lists = torch.randint(0, 64, (400, 6), generator=torch.Generator().manual_seed(6))
    accuracy, gap1 = circuits.accuracy_and_gap1_share(noisy, lists)
    assert list(accuracy) == list(gap1) == [2, 3, 4, 5, 6]
    assert accuracy[6] == (noisy(lists)[:, -1].argmax(-1) == lists.max(-1).values).float().mean().item()
    share, _ = circuits.attention_on_maximum(noisy, lists)
    top_two = lists.topk(2, dim=-1).values
    assert gap1[6] == pytest.approx(share[top_two[:, 0] - top_two[:, 1] == 1].mean().item(), abs=1e-6)
