"""Chapter 03's plot helper returns the figure the chapter shows."""

from __future__ import annotations

import torch

from utils import plots


def test_eigenvalue_planes_has_a_panel_per_circuit_with_every_set_scaled_to_the_unit_disc():
    one = torch.linalg.eigvals(torch.randn(6, 6))
    several = [torch.linalg.eigvals(10 * torch.randn(6, 6)) for _ in range(3)]
    fig = plots.eigenvalue_planes({"trained": one, "untrained": several}, "title", notes={"trained": "score 1.0"})
    points = [trace for trace in fig.data if trace.mode == "markers"]
    assert [trace.name for trace in points] == ["trained", "untrained"]
    assert len(points[0].x) == 6 and len(points[1].x) == 18
    assert all((trace.x ** 2 + trace.y ** 2).max() <= 1 + 1e-6 for trace in points)
    assert "score 1.0" in fig.layout.annotations[0].text
