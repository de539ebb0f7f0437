"""The plot helpers chapter 00 added: one figure per call, with the traces the chapter relies on."""

from __future__ import annotations

import torch

from utils import plots


def test_histogram_has_one_trace_of_counted_bins_and_a_line_per_mark():
    values = torch.rand(200)
    fig = plots.histogram(values, "attention on the maximum", "a title", marks={"uniform": 1 / 6, "half": 0.5},
                          log_y=True)
    [trace] = fig.data
    assert trace.type == "bar" and len(trace.x) == 40 and sum(trace.y) == 200  # 40 bins holding every value
    assert min(trace.x) > 0 and max(trace.x) < 1
    assert [shape.x0 for shape in fig.layout.shapes] == [1 / 6, 0.5]
    assert fig.layout.xaxis.title.text == "attention on the maximum" and fig.layout.yaxis.type == "log"
