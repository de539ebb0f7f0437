"""Chapter 10's checkers: a rule is checked against the model, an explanation by putting it in the model's place.

The explanation checker passes each model's right explanation (written here, not the course's), fails the
nearest wrong story and both nulls, and refuses an explanation that runs the model or reads its weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from utils import checks, explanations, models, mysteries
from utils.tasks import IGNORE


# ------------------------------------------------------------------ right answers, written independently
def pointed_by_loop(tokens):
    return torch.tensor([row[row[-1]] for row in tokens.tolist()])


def sorted_by_python(tokens):
    return torch.tensor([sorted(row[:5]) for row in tokens.tolist()])


def distance_by_where(tokens):
    a, b = tokens.unbind(1)
    return torch.where(a > b, a - b, b - a)


def _even(batch, n):
    rows = [torch.cat([torch.full((q + 1,), 1.0 / (q + 1)), torch.zeros(n - q - 1)]) for q in range(n)]
    return torch.stack(rows).expand(batch, n, n).clone()


def pattern_pointer_by_loop(tokens):
    pattern = _even(len(tokens), tokens.shape[1])
    for i, row in enumerate(tokens.tolist()):
        pattern[i, -1] = 0.0
        pattern[i, -1, row[-1]] = 1.0
    return pattern


def pattern_sorting_by_loop(tokens):
    pattern = _even(len(tokens), tokens.shape[1])
    for i, row in enumerate(tokens.tolist()):
        values = row[:5]
        for k, value in enumerate(sorted(values)):
            pattern[i, 5 + k] = 0.0
            pattern[i, 5 + k, values.index(value)] = 1.0
    return pattern


def signed_difference_key(tokens):
    return tokens[:, 1] - tokens[:, 0]  # the other sign, and finer than needed: still the right story


RIGHT = [(checks.check_what_it_computes_a, pointed_by_loop), (checks.check_what_it_computes_b, sorted_by_python),
         (checks.check_what_it_computes_c, distance_by_where), (checks.check_explanation_a, pattern_pointer_by_loop),
         (checks.check_explanation_b, pattern_sorting_by_loop), (checks.check_mlp_key_c, distance_by_where),
         (checks.check_mlp_key_c, signed_difference_key)]


@pytest.mark.parametrize("check, solution", RIGHT, ids=lambda x: getattr(x, "__name__", x))
def test_right_answers_written_another_way_pass(check, solution, capsys):
    check(solution)
    out = capsys.readouterr().out
    assert out.startswith("✓"), out


# ------------------------------------------------------------------ the nearest wrong stories, named
def _shifted(tokens):
    pattern = _even(len(tokens), tokens.shape[1])
    pattern[:, -1] = F.one_hot((tokens[:, -1] + 1).clamp(max=tokens.shape[1] - 1), tokens.shape[1]).float()
    return pattern


def pattern_closest_value(tokens):
    pattern = _even(len(tokens), tokens.shape[1])
    for i, row in enumerate(tokens.tolist()):
        for q in range(5, 10):
            distances = [abs(v - row[q]) for v in row[:5]]
            pattern[i, q] = 0.0
            pattern[i, q, distances.index(min(distances))] = 1.0
    return pattern


WRONG = [
    (checks.check_what_it_computes_a, lambda t: t[:, -1], "the last token itself", "the last token is"),
    (checks.check_what_it_computes_b, lambda t: t[:, :5].sort(-1, descending=True).values, "largest first", "position"),
    (checks.check_what_it_computes_c, lambda t: t[:, 0] - t[:, 1], "the difference with its sign",
     "the first token is the smaller"),
    (checks.check_explanation_a, _shifted, "counted from 1", "recovers"),
    (checks.check_explanation_b, pattern_closest_value, "closest in value", "recovers"),
    (checks.check_mlp_key_c, lambda t: t.sum(1) * 3, "the sum of the tokens", "recovers"),
    (checks.check_mlp_key_c, lambda t: torch.div((t[:, 0] - t[:, 1]).abs(), 2, rounding_mode="floor"), "coarser",
     "recovers"),
]


@pytest.mark.parametrize("check, wrong, named, where", WRONG, ids=lambda x: getattr(x, "__name__", None))
def test_the_nearest_wrong_story_fails_and_is_named(check, wrong, named, where):
    with pytest.raises(checks.CheckFailed) as failure:
        check(wrong)
    message = failure.value.args[0]
    assert named in message and where in message, message


def test_a_rule_that_is_right_only_sometimes_is_told_where_it_disagrees():
    def right_unless_pointer_is_4(tokens):
        answer = tokens.gather(1, tokens[:, -1:]).squeeze(1)
        return torch.where(tokens[:, -1] == 4, tokens[:, 3], answer)

    with pytest.raises(checks.CheckFailed) as failure:
        checks.check_what_it_computes_a(right_unless_pointer_is_4)
    message = failure.value.args[0]
    assert "the last token is 4" in message and "for example on" in message, message


# ------------------------------------------------------------------ the nulls fail
def even_attention(tokens):
    return _even(len(tokens), tokens.shape[1])


def fixed_position(position):
    def pattern(tokens):
        out = _even(len(tokens), tokens.shape[1])
        out[:, 5:] = F.one_hot(torch.full((len(tokens), tokens.shape[1] - 5), position), tokens.shape[1]).float()
        return out
    return pattern


@pytest.mark.parametrize("check, null", [
    (checks.check_explanation_a, even_attention), (checks.check_explanation_a, fixed_position(2)),
    (checks.check_explanation_b, even_attention), (checks.check_explanation_b, fixed_position(0)),
    (checks.check_mlp_key_c, lambda t: torch.zeros(len(t))), (checks.check_mlp_key_c, lambda t: t[:, 0]),
])
def test_the_nulls_fail(check, null):
    with pytest.raises(checks.CheckFailed, match="recovers"):
        check(null)


@pytest.mark.parametrize("name", ["mystery_a", "mystery_b"])
def test_the_reports_nulls_fail_and_the_mechanism_passes(name):
    tokens, targets = mysteries.fresh_inputs(name, 2000, torch.Generator().manual_seed(5))
    explanation = mysteries.pointer_pattern if name == "mystery_a" else mysteries.sorting_pattern
    report = explanations.grade_pattern(models.load_model(name), explanation, tokens, targets, mysteries.READ[name])
    assert explanations.passes(report)
    assert not explanations.passes(report, "even attention") and not explanations.passes(report, "best fixed position")
    assert report["even attention"]["recovered"] == 0.0 and report["model"]["recovered"] == 1.0


# ------------------------------------------------------------------ an explanation must predict, not copy
def runs_the_model(tokens):
    SHARED["model"](tokens)
    return pattern_pointer_by_loop(tokens)


def runs_a_copy_of_the_model(tokens):
    return copy.deepcopy(SHARED["model"]).run_with_cache(tokens)[1]["blocks.0.attn.hook_pattern"][:, 0]


def reads_the_weights(tokens):
    model = SHARED["model"]
    scores = (model.W_E[tokens] + model.W_pos) @ model.W_Q[0, 0] @ ((model.W_E[tokens] + model.W_pos) @ model.W_K[0, 0]).transpose(1, 2)
    return torch.softmax(scores.masked_fill(torch.triu(torch.ones(6, 6, dtype=torch.bool), 1), -1e9), -1)


SHARED: dict = {}


def loads_and_runs_the_model(tokens):
    models.load_model("mystery_a")(tokens)
    return pattern_pointer_by_loop(tokens)


@pytest.mark.parametrize("cheat, why", [(runs_the_model, "ran the model"), (loads_and_runs_the_model, "the model"), (runs_a_copy_of_the_model, "the model"),
                                        (reads_the_weights, "read the model's weights")])
def test_an_explanation_that_uses_the_model_is_refused(cheat, why):
    SHARED["model"] = models.load_model("mystery_a")
    with pytest.raises(checks.CheckFailed) as failure:
        checks.check_explanation_a(cheat)
    assert "refused" in failure.value.args[0] and why in failure.value.args[0], failure.value.args[0]
    # and the model works again afterwards
    assert models.load_model("mystery_a")(torch.zeros(1, 6, dtype=torch.long)).shape == (1, 6, 64)


def test_an_invalid_pattern_or_key_is_refused_with_the_reason():
    with pytest.raises(checks.CheckFailed, match="later positions"):
        checks.check_explanation_b(lambda t: torch.ones(len(t), 10, 10) / 10)
    with pytest.raises(checks.CheckFailed, match="shape"):
        checks.check_explanation_b(lambda t: torch.ones(len(t), 10))
    with pytest.raises(checks.CheckFailed, match="at most 128"):
        checks.check_mlp_key_c(lambda t: t[:, 0] * 64 + t[:, 1])  # the tokens themselves explain nothing


def test_the_key_grader_averages_within_classes():
    model = models.load_model("mystery_c")
    pairs, targets = mysteries.fresh_inputs("mystery_c", 0)
    every_pair_alone = torch.arange(len(pairs))
    same = explanations.logits_with_mlp_by_key(model, pairs, every_pair_alone)
    assert torch.allclose(same, model(pairs), atol=1e-4)  # one class per input changes nothing
    assert (targets[:, 0] == IGNORE).all() and torch.equal(targets[:, 1], mysteries.distance(pairs))


def test_the_mystery_models_meet_their_targets_and_the_formats_name_no_task():
    for name in mysteries.READ:
        report = models.evaluate(models.load_model(name), name)
        assert models.meets_target(name, report), (name, report)
        assert not any(word in mysteries.FORMATS[name] for word in ("sort", "distance", "point", "differen"))
