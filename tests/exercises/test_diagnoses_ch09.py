"""Chapter 09's checkers accept other right answers, and the course's own functions behave as the chapter says."""

from __future__ import annotations

import pytest
import torch

from utils import checks, circuits, models, superposition


def rank_by_loop(singular_values, share=0.99):
    total, running = float((singular_values ** 2).sum()), 0.0
    for count, value in enumerate(singular_values.tolist(), start=1):
        running += value ** 2
        if running >= share * total:
            return count
    return len(singular_values)


def replaced_key_by_key(model, lists, ov):
    with torch.no_grad():
        logits, cache = model.run_with_cache(lists)
        pattern = cache["blocks.0.attn.hook_pattern"][:, 0]
        change = ov - model.W_E @ model.OV[0, 0].AB @ model.W_U
        for k in range(lists.shape[1]):
            logits += pattern[:, :, k, None] * change[lists[:, k]][:, None, :]
    targets = torch.stack([lists[:, : i + 1].max(-1).values for i in range(lists.shape[1])], dim=1)
    return (logits.argmax(-1) == targets)[:, 1:].float().mean().item()


def toy_by_einsum(W, b, x):
    hidden = torch.einsum("mn,bn->bm", W, x)
    return torch.nn.functional.relu(torch.einsum("mn,bm->bn", W, hidden) + b)


def dimensionality_by_loops(W):
    n = W.shape[1]
    out = torch.zeros(n)
    for i in range(n):
        length = W[:, i].norm()
        if length == 0:
            continue
        unit = W[:, i] / length
        out[i] = length ** 2 / sum(float(unit @ W[:, j]) ** 2 for j in range(n))
    return out


def alignment_column_by_column(acts):
    values = []
    for column in acts.T:
        centred = column - column.mean()
        variance = (centred ** 2).mean()
        if variance > 0:
            values.append(float((centred ** 4).mean() / variance ** 2 - 3))
    return float(torch.tensor(values).median()) if len(values) % 2 else float(torch.tensor(values).sort().values[len(values) // 2 - 1])


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("check, solution", [
    (checks.check_rank_for_share, rank_by_loop),
    (checks.check_accuracy_with_ov_replaced, replaced_key_by_key),
    (checks.check_toy_model_output, toy_by_einsum),
    (checks.check_feature_dimensionality, dimensionality_by_loops),
    (checks.check_basis_alignment, alignment_column_by_column),
], ids=lambda x: getattr(x, "__name__", x))
def test_other_right_answers_pass(check, solution, seed, capsys):
    torch.manual_seed(seed)
    check(solution)
    assert capsys.readouterr().out.startswith("✓"), solution.__name__


def test_the_best_rank_r_cut_beats_any_other_of_that_rank_and_the_full_rank_puts_the_model_back():
    torch.manual_seed(0)
    matrix = torch.randn(12, 9)
    for r in (1, 3, 5):
        best = (matrix - superposition.best_rank_r(matrix, r)).norm()
        other = (matrix - torch.randn(12, r) @ torch.linalg.lstsq(torch.randn(12, r), matrix).solution).norm()
        assert torch.linalg.matrix_rank(superposition.best_rank_r(matrix, r)) == r and best <= other
    model = models.load_model("max_of_list")
    lists = torch.randint(0, 64, (2000, 5))
    own = circuits.full_ov(model).AB.detach()
    logits = model(lists)
    plain = (logits.argmax(-1) == lists.cummax(-1).values)[:, 1:].float().mean().item()
    assert superposition.accuracy_with_ov(model, lists, own) == pytest.approx(plain, abs=1e-6)
    assert superposition.accuracy_with_ov(model, lists, torch.zeros(64, 64)) < plain - 0.3  # the head's copying matters


def test_dimensionality_of_known_arrangements():
    pentagon = torch.stack([torch.cos(torch.arange(5) * 2 * torch.pi / 5), torch.sin(torch.arange(5) * 2 * torch.pi / 5)])
    assert torch.allclose(superposition.feature_dimensionality(pentagon), torch.full((5,), 0.4), atol=1e-5)
    pair = torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(superposition.feature_dimensionality(pair), torch.tensor([0.5, 0.5, 0.0]))
    assert superposition.features_represented(pair) == 2


def test_dense_toy_models_keep_as_many_features_as_dimensions_and_sparse_ones_more():
    W, b, loss = superposition.train_toy_models([0.0, 0.99], n_features=5, d_hidden=2, steps=1500, progress=False)
    assert W.shape == (2, 2, 5) and b.shape == (2, 5) and loss.shape == (2,)
    assert superposition.features_represented(W[0]) == 2 and superposition.features_represented(W[1]) == 5


def test_kurtosis_and_the_rotation_null():
    g = torch.Generator().manual_seed(0)
    gaussian = torch.randn(20_000, 4, generator=g)
    assert abs(superposition.basis_alignment(gaussian)) < 0.15
    sparse = torch.relu(torch.randn(20_000, 6, generator=g) - 1.5)  # heavy tails along the basis only
    rotated = superposition.rotated_alignments(sparse, superposition.basis_alignment, rotations=5)
    assert superposition.basis_alignment(sparse) > max(rotated) + 1
    R = superposition.random_rotation(6, g)
    assert torch.allclose(R @ R.T, torch.eye(6), atol=1e-5)
    dead = torch.cat([torch.randn(100, 2), torch.zeros(100, 1)], dim=1)
    assert torch.isnan(superposition.excess_kurtosis(dead)[2])


def test_angular_span():
    points = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert superposition.angular_span(points) == pytest.approx(torch.pi / 2, abs=1e-5)
    around = torch.stack([torch.cos(torch.arange(8) * torch.pi / 4), torch.sin(torch.arange(8) * torch.pi / 4)], 1)
    assert superposition.angular_span(around) == pytest.approx(2 * torch.pi - torch.pi / 4, abs=1e-5)


def test_width_models_are_the_shipped_recipe_at_other_widths():
    for width in models.WIDTHS:
        spec = models.spec(f"max_of_list_d{width}")
        assert spec.config == dict(models.spec("max_of_list").config, d_model=width, d_head=width)
        assert spec.recipe == models.spec("max_of_list").recipe and not spec.timed
