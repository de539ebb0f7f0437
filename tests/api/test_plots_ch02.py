"""Chapter 02's plot helper returns the figure the chapter shows."""

from __future__ import annotations

import torch

from utils import plots


def test_log_ratio_scatter_has_one_trace_of_every_transition_per_estimate():
    true = torch.softmax(torch.randn(4, 4), dim=-1)
    estimates = {"model": torch.log_softmax(torch.randn(4, 4), dim=-1), "counting": true.log()}
    fig = plots.log_ratio_scatter(true, estimates, "title")
    assert [trace.name for trace in fig.data] == ["model", "counting"]
    assert all(len(trace.x) == len(trace.y) == 16 for trace in fig.data)
    assert abs(fig.data[1].y).max() < 1e-6  # the truth against itself: on the zero line
    assert fig.layout.xaxis.type == "log"
