"""Circuit tools on the shipped max_of_list checkpoint: each must agree with what the model computes."""

import pytest
import torch

from utils import circuits, fourier, models, residual_paths, tasks


@pytest.fixture(scope="module")
def model():
    return models.load_model("max_of_list")


@pytest.fixture(scope="module")
def run(model):
    tokens = torch.randint(0, 64, (16, 6), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens)
    return tokens, cache


def test_uniform_causal_pattern_spreads_each_row_over_the_visible_keys():
    pattern = circuits.uniform_causal_pattern(torch.rand(2, 1, 4, 4))
    torch.testing.assert_close(pattern[1, 0, 2], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 1, 4))


def test_attention_to_max_and_the_uniform_ablation_on_the_trained_model(model):
    lists = torch.randint(0, 64, (500, 6), generator=torch.Generator().manual_seed(1))
    assert circuits.fraction_attending_to_max(model, lists) > 0.99
    # lists whose maximum sits only at position 0 (all others small): attending there is the answer
    first = torch.cat([torch.full((50, 1), 63), torch.randint(0, 10, (50, 5))], 1)
    assert circuits.fraction_attending_to_max(model, first) > 0.9
    trained = (model(lists)[:, -1].argmax(-1) == lists.max(-1).values).float().mean().item()
    assert circuits.uniform_attention_accuracy(model, lists) < 0.2 < 0.99 < trained


def test_positional_qk_reproduces_every_cached_score(model, run):
    tokens, cache = run
    for q_pos in range(6):
        for k_pos in range(q_pos + 1):
            scores = circuits.full_qk_positional(model, q_pos, k_pos)[tokens[:, q_pos], tokens[:, k_pos]]
            cached = (cache["q", 0][:, q_pos, 0] * cache["k", 0][:, k_pos, 0]).sum(-1) / model.cfg.d_head**0.5
            torch.testing.assert_close(scores, cached, atol=1e-4, rtol=1e-4)


def test_token_qk_is_the_positional_circuit_without_positions(model):
    expected = model.W_E @ model.W_Q[0, 0] @ model.W_K[0, 0].T @ model.W_E.T / model.cfg.d_head**0.5
    torch.testing.assert_close(circuits.full_qk_tokens(model), expected, atol=1e-4, rtol=1e-4)
    unscaled = circuits.full_qk_tokens(model, scale=False)
    torch.testing.assert_close(unscaled, expected * model.cfg.d_head**0.5, atol=1e-3, rtol=1e-4)


def test_full_ov_and_direct_path_shapes_and_values(model):
    ov = circuits.full_ov(model)
    assert tuple(ov.shape) == (64, 64)
    torch.testing.assert_close(ov.AB, model.W_E @ model.W_V[0, 0] @ model.W_O[0, 0] @ model.W_U, atol=1e-4, rtol=1e-4)
    # the direct path is what the logits are with the head's output removed, less position and bias
    tokens = torch.arange(model.cfg.d_vocab)[:, None]  # every token alone at position 0
    with torch.no_grad():
        no_head = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_attn_out", lambda x, hook: torch.zeros_like(x))])
    expected = no_head[:, 0] - model.W_pos[0] @ model.W_U - model.b_U
    torch.testing.assert_close(circuits.direct_path(model), expected, atol=1e-4, rtol=1e-4)


def test_direct_path_and_head_terms_add_up_to_the_logits(model):
    tokens = torch.randint(0, 64, (64, 4))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        direct = circuits.direct_path_logits(model, tokens)
        head = cache["attn_out", 0][:, -1] @ model.W_U
        torch.testing.assert_close(direct + head, logits[:, -1], atol=1e-4, rtol=1e-4)
        boost_direct, boost_head = circuits.logit_boosts(model, tokens)
        answer = tokens.max(-1).values[:, None]
        expected = (head.gather(-1, answer).squeeze(-1) - head.mean(-1)).mean().item()
        assert boost_head == pytest.approx(expected, abs=1e-4)
        # mean ablation: the head's term stays, the direct path becomes its mean over the batch
        ablated = circuits.logits_without_direct_path(model, tokens)
        torch.testing.assert_close(ablated, head + direct.mean(0), atol=1e-4, rtol=1e-4)


def test_copying_score_range_and_known_answers(model):
    assert circuits.copying_score(torch.eye(8)) == pytest.approx(1.0)
    assert circuits.copying_score(-torch.eye(8)) == pytest.approx(-1.0)
    rotation = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # eigenvalues +-i: no copying
    assert abs(circuits.copying_score(rotation)) < 1e-6
    score = circuits.copying_score(circuits.full_ov(model))
    assert -1.0 <= score <= 1.0
    assert score > 0.9  # the max_of_list head copies the token it attends to


def test_frozen_pattern_reproduces_logits_and_makes_them_linear(model, run):
    tokens, cache = run
    pattern = cache["pattern", 0]
    torch.testing.assert_close(circuits.logits_with_frozen_pattern(model, tokens, pattern), model(tokens))
    other = tokens.roll(1, dims=0)
    # with the pattern frozen, the logits are linear in the token embeddings: the logits of a
    # 50/50 mix of two inputs' embeddings are the mean of their logits
    freeze = ("blocks.0.attn.hook_pattern", lambda _, hook: pattern)
    logits_a = model.run_with_hooks(tokens, fwd_hooks=[freeze])
    logits_b = model.run_with_hooks(other, fwd_hooks=[freeze])
    mix = 0.5 * (model.W_E[tokens] + model.W_E[other])
    logits_mix = model.run_with_hooks(tokens, fwd_hooks=[freeze, ("hook_embed", lambda _, hook: mix)])
    torch.testing.assert_close(logits_mix, 0.5 * (logits_a + logits_b), atol=1e-4, rtol=1e-4)
    # without freezing, the same mix is not linear (the pattern depends on the tokens)
    free_mix = model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda _, hook: mix)])
    assert (free_mix - 0.5 * (model(tokens) + model(other))).abs().max() > 1e-2


def test_fraction_ordered_known_answers():
    assert circuits.fraction_ordered(torch.arange(5.0).repeat(3, 1)) == 1.0
    assert circuits.fraction_ordered(-torch.arange(5.0).repeat(3, 1)) == 0.0
    assert circuits.fraction_ordered(torch.zeros(2, 4)) == 0.0  # ties are not "larger"


def test_positional_qk_is_ordered_for_every_useful_pair(model):
    for q in range(1, 6):
        for k in range(q + 1):
            assert circuits.fraction_ordered(circuits.full_qk_positional(model, q, k)) == 1.0, (q, k)


def test_explorer_parses_lists_and_rejects_bad_input(model):
    from utils import widgets

    assert widgets.parse_token_list("3, 41 7", 64, 6) == [3, 41, 7]
    for bad, words in [("", "at least one"), ("1 2 3 4 5 6 7", "at most 6"), ("3, x", "whole numbers"),
                       ("64", "between 0 and 63")]:
        with pytest.raises(ValueError, match=words):
            widgets.parse_token_list(bad, 64, 6)
    box = widgets.qk_explorer(model)
    text, out = box.children[1], box.children[2]
    assert [o["output_type"] for o in out.outputs] == ["display_data"] * 3  # QK map, pattern, logits
    assert all("application/vnd.plotly.v1+json" in o["data"] for o in out.outputs)
    text.value = "1, 2, 99"  # out of range: the explorer says so instead of raising
    [message] = out.outputs
    assert message["output_type"] == "stream" and "between 0 and 63" in message["text"]
    text.value = "5, 9"  # shorter than the query position: it says which pair it shows, then the three figures
    assert "showing query position 1" in out.outputs[0]["text"] and len(out.outputs) == 4


# ===================================================================== chapters 05-06: MLP effective weights
# On the shipped addition and fibonacci checkpoints (one layer, one head, an MLP of 128 neurons).


def _with_cache(name: str, tokens: torch.Tensor, targets: torch.Tensor):
    """The shipped model, its data and a cache of the attention pattern and the MLP pre-activations."""
    model = models.load_model(name)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.attn.hook_pattern", "blocks.0.mlp.hook_pre"])
    return model, tokens, targets, cache


@pytest.fixture(scope="module")
def addition():
    return _with_cache("addition", *tasks.addition_pairs())


@pytest.fixture(scope="module")
def fibonacci():
    return _with_cache("fibonacci", *tasks.fibonacci_sequences())


@pytest.mark.parametrize("which", ["addition", "fibonacci"])
def test_neuron_inputs_rebuild_the_cached_pre_activations(which, request):
    model, tokens, targets, cache = request.getfixturevalue(which)
    with torch.no_grad():
        pre = circuits.neuron_inputs(model, tokens, cache["pattern", 0])
        assert pre.shape == cache["pre", 0].shape == (tokens.shape[0], tokens.shape[1], model.cfg.d_mlp)
        assert (pre - cache["pre", 0]).abs().max().item() < 1e-3
        assert circuits.accuracy_with_neuron_inputs(model, tokens, targets, pre) == 1.0
        # the identity transform changes nothing
        same = circuits.neuron_inputs(model, tokens, cache["pattern", 0], transform=lambda m: m)
        torch.testing.assert_close(same, pre)


def test_neuron_inputs_depend_on_the_pattern(addition):
    """A wrong pattern gives other pre-activations: the rebuild really uses the attention it is given."""
    model, tokens, targets, cache = addition
    pattern = cache["pattern", 0]
    flipped = torch.zeros_like(pattern)
    flipped[..., 0] = 1.0  # every query attends only to position 0
    with torch.no_grad():
        pre = circuits.neuron_inputs(model, tokens, flipped)
        assert (pre - cache["pre", 0])[:, 1].abs().max().item() > 1.0
        torch.testing.assert_close(pre[:, 0], cache["pre", 0][:, 0], atol=1e-3, rtol=1e-4)  # q = 0 sees only key 0 anyway
        assert circuits.accuracy_with_neuron_inputs(model, tokens, targets, pre) < 0.5


def test_accuracy_with_zeroed_neuron_inputs_is_low(addition):
    model, tokens, targets, cache = addition
    with torch.no_grad():
        acc = circuits.accuracy_with_neuron_inputs(model, tokens, targets, torch.zeros_like(cache["pre", 0]))
    assert acc < 0.1


def _keeping(freqs):
    return lambda m: fourier.keep_frequencies(m, list(freqs))


def _removing(freqs):
    return lambda m: fourier.remove_frequencies(m, list(freqs))


def test_keeping_every_frequency_keeps_full_accuracy(addition):
    model, tokens, targets, _ = addition
    with torch.no_grad():
        assert circuits.accuracy_with_maps_replaced(model, tokens, targets, _keeping(range(1, 65))) == 1.0
        # removing nothing is the same
        assert circuits.accuracy_with_maps_replaced(model, tokens, targets, _removing([])) == 1.0


def test_key_frequencies_carry_much_but_not_all_of_addition(addition):
    model, tokens, targets, _ = addition
    with torch.no_grad():
        maps = torch.cat([circuits.token_to_neuron(model, k) for k in range(2)], dim=1)
        key = fourier.key_frequencies(maps, coverage=0.9)
        kept = circuits.accuracy_with_maps_replaced(model, tokens, targets, _keeping(key))
        removed = circuits.accuracy_with_maps_replaced(model, tokens, targets, _removing(key))
        kept_tol = circuits.accuracy_with_maps_replaced(model, tokens, targets, _keeping(key), tolerance=2)
    chance = 1 / model.cfg.d_vocab
    assert 0.2 < kept < 0.7, kept
    assert kept > 10 * chance
    assert removed < 0.05, removed
    assert kept_tol > kept, (kept_tol, kept)
    assert kept_tol <= 1.0


def test_tolerance_counts_near_misses(addition):
    """tolerance=t accepts predictions within t of the target: accuracy never decreases with t."""
    model, tokens, targets, cache = addition
    with torch.no_grad():
        pre = circuits.neuron_inputs(model, tokens, cache["pattern", 0], lambda m: fourier.keep_frequencies(m, [1, 2]))
        accs = [circuits.accuracy_with_neuron_inputs(model, tokens, targets, pre, tolerance=t) for t in (0, 1, 3, 200)]
    assert accs == sorted(accs)
    assert accs[0] < accs[2]
    assert accs[-1] == 1.0  # every prediction is within 200 of the target


def test_addition_token_to_neuron_maps_use_a_few_low_key_frequencies(addition):
    """Chapter 05's claim, for any seed: at most six frequencies, all among 1-8, carry 90 % of the variance."""
    model = addition[0]
    with torch.no_grad():
        maps = torch.cat([circuits.token_to_neuron(model, 0), circuits.token_to_neuron(model, 1)], dim=1)
    assert maps.shape == (model.cfg.d_vocab, 2 * model.cfg.d_mlp)
    keys = fourier.key_frequencies(maps, coverage=0.9)
    assert len(keys) <= 6 and max(keys) <= 8, keys
    assert fourier.explained_variance(maps, keys) >= 0.9


def test_effective_weight_shapes_and_values(addition):
    model = addition[0]
    vocab, d_mlp = model.cfg.d_vocab, model.cfg.d_mlp
    with torch.no_grad():
        for pos in (0, 1):
            t2n = circuits.token_to_neuron(model, pos)
            assert t2n.shape == (vocab, d_mlp)
            expected = (model.W_E + model.W_pos[pos]) @ model.W_V[0, 0] @ model.W_O[0, 0] @ model.W_in[0]
            torch.testing.assert_close(t2n, expected, atol=1e-3, rtol=1e-4)
            d2n = circuits.direct_to_neuron(model, pos)
            assert d2n.shape == (vocab, d_mlp)
            torch.testing.assert_close(d2n, (model.W_E + model.W_pos[pos]) @ model.W_in[0], atol=1e-4, rtol=1e-4)
        assert not torch.allclose(circuits.token_to_neuron(model, 0), circuits.token_to_neuron(model, 1))
        n2l = circuits.neuron_to_logit(model)
        assert n2l.shape == (d_mlp, vocab)
        torch.testing.assert_close(n2l, model.W_out[0] @ model.W_U, atol=1e-4, rtol=1e-4)


def test_token_to_neuron_matches_the_cached_head_output(addition):
    """With the pattern frozen at all attention on source position k, row x_k of token_to_neuron(k) is what
    the head adds to the neuron inputs (biases are zero in the shipped models)."""
    model, tokens, _, cache = addition
    sample = tokens[:64]
    with torch.no_grad():
        _, c = model.run_with_cache(sample, names_filter="blocks.0.attn.hook_z")
        head_to_neurons = (c["z", 0][:, 1, 0] @ model.W_O[0, 0]) @ model.W_in[0]
        pattern = cache["pattern", 0][:64, 0, 1]  # [batch, key]: query position 1
        expected = sum(pattern[:, k, None] * circuits.token_to_neuron(model, k)[sample[:, k]] for k in (0, 1))
    torch.testing.assert_close(head_to_neurons, expected, atol=1e-3, rtol=1e-3)


# --------------------------------------------------------------------- positions in the fibonacci model
def test_positional_qk_scores_shape_and_formula(fibonacci):
    model = fibonacci[0]
    with torch.no_grad():
        scores = circuits.positional_qk_scores(model)
        n = model.cfg.n_ctx
        assert scores.shape == (n, n)
        expected = model.W_pos @ model.W_Q[0, 0] @ model.W_K[0, 0].T @ model.W_pos.T / model.cfg.d_head**0.5
        torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("q", [2, 3, 4])
def test_fibonacci_positions_favour_the_two_latest_keys(fibonacci, q):
    model = fibonacci[0]
    with torch.no_grad():
        row = circuits.positional_qk_scores(model)[q, :q + 1]
    assert set(row.topk(2).indices.tolist()) == {q - 1, q}, row


def test_attention_on_recent_known_answer():
    n = 4
    on_self = torch.eye(n)
    on_first = torch.zeros(n, n)
    on_first[:, 0] = 1.0
    pattern = torch.stack([on_self, on_first])[:, None]  # [batch 2, head 1, q, k]
    torch.testing.assert_close(circuits.attention_on_recent(pattern), torch.tensor([1.0, 1.0, 0.5, 0.5]))
    torch.testing.assert_close(circuits.attention_on_recent(pattern, window=1), torch.tensor([1.0, 0.5, 0.5, 0.5]))
    torch.testing.assert_close(circuits.attention_on_recent(pattern, window=3), torch.tensor([1.0, 1.0, 1.0, 0.5]))
    # half on the previous position, half on position 0
    half = 0.5 * on_first
    half[1:, :] += 0.5 * torch.eye(n)[:-1]  # row q gets 0.5 on key q - 1
    half[0, 0] = 1.0
    torch.testing.assert_close(circuits.attention_on_recent(half[None, None]), torch.tensor([1.0, 1.0, 0.5, 0.5]))
    # the head argument picks the head
    two_heads = torch.stack([on_self, on_first])[None]  # [batch 1, head 2, q, k]
    torch.testing.assert_close(circuits.attention_on_recent(two_heads, head=1), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(circuits.attention_on_recent(two_heads, head=0), torch.ones(n))


def test_fibonacci_attends_to_the_two_latest_positions(fibonacci):
    _, _, _, cache = fibonacci
    recent = circuits.attention_on_recent(cache["pattern", 0])
    assert recent.shape == (5,)
    assert (recent[1:] >= 0.75).all(), recent
    assert (recent <= 1 + 1e-5).all()
    # much more than a uniform pattern over the keys would give (2 / (q + 1))
    uniform = torch.tensor([min(2, q + 1) / (q + 1) for q in range(5)])
    assert (recent[3:] > uniform[3:] + 0.2).all(), recent


# --------------------------------------------------------------------- neuron explorer
def test_neuron_explorer_builds_and_redraws(addition):
    import ipywidgets

    from utils import widgets

    model = addition[0]
    box = widgets.neuron_explorer(model, neuron=3)
    assert isinstance(box, ipywidgets.VBox)
    sliders = [c for c in box.children if isinstance(c, ipywidgets.IntSlider)]
    labels = [c for c in box.children if isinstance(c, ipywidgets.Label)]
    assert len(sliders) == 1 and len(labels) == 1
    slider, summary = sliders[0], labels[0]
    assert (slider.min, slider.max, slider.value) == (0, model.cfg.d_mlp - 1, 3)
    assert summary.value.startswith("neuron 3: frequency ")
    out = box.children[-1]
    assert [o["output_type"] for o in out.outputs] == ["display_data"] * 3  # input curve, spectrum, logits
    assert all(o["data"]["application/vnd.plotly.v1+json"]["data"] for o in out.outputs)
    for neuron in (17, model.cfg.d_mlp - 1):
        slider.value = neuron  # redraws
        with torch.no_grad():
            curves = torch.stack([circuits.token_to_neuron(model, k)[:, neuron] for k in range(2)], dim=1)
        top = int(fourier.variance_fractions(curves).argmax())
        assert summary.value.startswith(f"neuron {neuron}: frequency {top} "), summary.value


@pytest.mark.parametrize("name", ["addition", "fibonacci"])
def test_neuron_inputs_include_the_biases(name):
    """The shipped models have every bias at zero; on a random model with non-zero biases the rebuild must
    still match (b_in, and the head's b_V W_O + b_O pushed through W_in)."""
    seed = 7
    state = models.build_model(name, seed=seed).state_dict()
    g = torch.Generator().manual_seed(seed)
    for key in state:
        if key.endswith("bias") and key != "unembed.bias":
            state[key] = 0.3 * torch.randn(state[key].shape, generator=g)
    model = models.model_from_state(dict(models.spec(name).config, seed=seed), state)
    tokens = torch.randint(0, model.cfg.d_vocab, (32, model.cfg.n_ctx), generator=g)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        pre = circuits.neuron_inputs(model, tokens, cache["pattern", 0])
    assert model.b_in[0].abs().max() > 0.1 and model.b_V[0].abs().max() > 0.1
    torch.testing.assert_close(pre, cache["pre", 0], atol=1e-3, rtol=1e-4)


def test_neuron_inputs_transform_reaches_every_map(addition):
    """`transform` is applied to every [vocab, d_mlp] map, the direct (skip) path included: the neuron
    inputs are linear in the maps, so doubling every map doubles them and zeroing them leaves only the
    biases (all zero in the shipped model)."""
    model, tokens, _, cache = addition
    sample, pattern = tokens[::16], cache["pattern", 0][::16]
    assert all(b.abs().max() == 0 for b in (model.b_in[0], model.b_V[0], model.b_O[0]))
    with torch.no_grad():
        doubled = circuits.neuron_inputs(model, sample, pattern, transform=lambda m: 2 * m)
        zeroed = circuits.neuron_inputs(model, sample, pattern, transform=torch.zeros_like)
        seen = []
        circuits.neuron_inputs(model, sample, pattern, transform=lambda m: seen.append(tuple(m.shape)) or m)
    torch.testing.assert_close(doubled, 2 * cache["pre", 0][::16], atol=2e-3, rtol=1e-4)
    assert zeroed.abs().max().item() == 0
    # one direct map per query position and one head map per source position
    assert seen == [(model.cfg.d_vocab, model.cfg.d_mlp)] * (2 * model.cfg.n_ctx)


# ===================================================================== chapter 07: paths
def test_one_layer_path_expansion_adds_up_to_the_logits():
    model = models.load_model("max_of_list")
    tokens = torch.randint(0, 64, (256, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        terms = residual_paths.one_layer_path_logits(model, tokens, cache["pattern", 0])
    assert set(terms) == {"direct", "head 0"}
    assert (sum(terms.values()) - logits).abs().max() < 1e-3
    assert (terms["head 0"] - logits).abs().max() > 1.0  # the direct path matters, so dropping it shows


def test_head_pieces_and_the_naive_path_sum_on_addition(addition):
    model, tokens, targets, _ = addition
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        pieces = residual_paths.head_pieces(model, cache)
        naive = residual_paths.naive_path_logits(model, cache)
        x = cache["hook_embed"] + cache["hook_pos_embed"]
        mlp_whole = residual_paths.mlp_output(model, x + cache["attn_out", 0])
    assert pieces.shape == (2, len(tokens), 2, model.cfg.d_model)
    assert (pieces.sum(0) - cache["attn_out", 0]).abs().max() < 1e-3
    assert (mlp_whole - cache["mlp_out", 0]).abs().max() < 1e-3  # the MLP on its whole input: exact
    naive_accuracy = (naive[:, 1].argmax(-1) == targets[:, 1]).float().mean().item()
    assert naive_accuracy < 0.2  # splitting the MLP over its inputs' paths breaks addition


def test_memory_management_cosines_known_answers():
    state = models.build_model("addition", seed=0).state_dict()
    # nn.Linear stores [out, in]: neuron n reads row n of mlp.in.weight and writes column n of mlp.out.weight
    state["blocks.0.mlp.out.weight"][:, 0] = -3 * state["blocks.0.mlp.in.weight"][0]
    state["blocks.0.mlp.out.weight"][:, 1] = state["blocks.0.mlp.in.weight"][1]
    model = models.model_from_state(dict(models.spec("addition").config, seed=0), state)
    with torch.no_grad():
        cosines = residual_paths.memory_management_cosines(model)
    assert cosines.shape == (model.cfg.d_mlp,)
    assert torch.isclose(cosines[0], torch.tensor(-1.0), atol=1e-5) and torch.isclose(cosines[1], torch.tensor(1.0), atol=1e-5)
    assert cosines[2:].abs().max() < 0.5  # random directions in 128 dimensions are nearly orthogonal


def test_offsets_and_induction_attention_on_hand_made_patterns():
    n, half = 8, 4
    previous = torch.zeros(1, 1, n, n)
    previous[0, 0, 0, 0] = 1
    previous[0, 0, torch.arange(1, n), torch.arange(n - 1)] = 1
    induction = torch.zeros(1, 1, n, n)
    induction[0, 0, torch.arange(half), torch.arange(half)] = 1
    induction[0, 0, torch.arange(half, n), torch.arange(1, half + 1)] = 1
    both = torch.cat([previous, induction], dim=1)  # [1, 2 heads, n, n]
    assert residual_paths.attention_to_offset(both, 1).tolist() == [1.0, 0.0]
    assert residual_paths.induction_attention(both, half).tolist() == [0.0, 1.0]


def test_composition_score_known_values_and_transformer_lens():
    assert abs(residual_paths.composition_score(torch.eye(4), torch.eye(4)) - 0.5) < 1e-6  # sqrt(4) / (2 * 2)
    a, b = torch.tensor([[1.0, 0.0]]).T, torch.tensor([[0.0, 1.0]])
    assert residual_paths.composition_score(b, a) == 0.0  # b reads nothing a writes
    model = models.load_model("induction")
    with torch.no_grad():
        library = model.all_composition_scores("K").scores
        for h0 in range(2):
            for h1 in range(2):
                ov = model.W_V[0, h0] @ model.W_O[0, h0]
                qk = model.W_Q[1, h1] @ model.W_K[1, h1].T
                assert abs(residual_paths.composition_score(ov, qk.T) - library[0, h0, 1, h1].item()) < 1e-4
