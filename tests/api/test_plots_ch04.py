"""Chapter 04's figures: one helper call each, with the traces the chapter relies on."""

from __future__ import annotations

import torch

from utils import plots


def test_term_heatmaps_draws_one_heatmap_per_term_on_one_colour_scale():
    terms = {"const·token": torch.randn(4, 4), "token·token": torch.randn(4, 4), "the rest": torch.zeros(4, 4)}
    fig = plots.term_heatmaps(terms, "key token", "query token", "terms")
    assert [t.type for t in fig.data] == ["heatmap"] * 3
    assert {t.coloraxis for t in fig.data} == {"coloraxis"} and fig.layout.coloraxis.cmid == 0.0
    assert [a.text for a in fig.layout.annotations] == list(terms)


def test_share_against_need_colours_the_lists_by_right_or_wrong():
    need = torch.tensor([0.2, 0.5, float("inf"), 0.7])
    share = torch.tensor([0.9, 0.4, 0.6, 0.8])
    right = torch.tensor([True, True, False, True])
    fig = plots.share_against_need(need, share, right, "gap 1")
    right_trace, wrong_trace, diagonal = fig.data
    assert (right_trace.name, wrong_trace.name) == ("answered right", "answered wrong")
    assert len(right_trace.x) == 3 and list(wrong_trace.x) == [1.0]  # a need of +inf is drawn at 1
    assert list(diagonal.x) == [0, 1] and list(diagonal.y) == [0, 1]
