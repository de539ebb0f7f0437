"""Plotly figures for the course: one call per figure, axes in the learner's terms."""

from __future__ import annotations

import time
from typing import Sequence

import plotly.express as px
import plotly.graph_objects as go
from utils import runtime  # noqa: F401  (one torch thread; freed memory back after every cell)
import torch
from torch import Tensor

from utils import tasks

_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=60, b=50))


def _np(x: Tensor | Sequence) -> object:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else x


def attention_pattern(pattern: Tensor, tokens: Sequence[int], title: str = "Attention pattern") -> go.Figure:
    """Heatmap of one head's pattern [query_pos, key_pos] with each axis labelled 'position: token'."""
    labels = [f"{i}: {int(t)}" for i, t in enumerate(tokens)]
    fig = px.imshow(_np(pattern), x=labels, y=labels, zmin=0, zmax=1, color_continuous_scale="Blues",
                    labels=dict(x="key (position: token)", y="query (position: token)", color="attention"),
                    text_auto=".2f", title=title)
    fig.update_xaxes(side="top", type="category")
    fig.update_yaxes(type="category")
    # the key axis and its label sit on top: room for them between the title and the grid
    return fig.update_layout(**dict(_LAYOUT, margin=dict(_LAYOUT["margin"], t=110)), width=max(520, 48 * len(labels) + 140),
                             height=max(480, 40 * len(labels) + 170), title_y=0.97)


def loss_curve(losses: Sequence[float], title: str = "Training loss") -> go.Figure:
    """Training loss against step on a log scale."""
    fig = go.Figure(go.Scatter(y=list(losses), mode="lines", name="loss"))
    fig.update_layout(**_LAYOUT, title=title, xaxis_title="training step", yaxis_title="cross-entropy loss (nats)",
                      yaxis_type="log", width=640, height=360)
    return fig


class LiveLoss:
    """A loss curve that redraws in place while a model trains.

    Pass ``live.update`` as ``on_step`` to ``utils.train.train``; it redraws at most every
    `every` seconds, and ``live.close()`` draws the final curve.
    """

    def __init__(self, title: str = "Training loss (live)", every: float = 1.0) -> None:
        from IPython.display import display

        self.title, self.every, self.losses = title, every, []
        self._last = 0.0
        self._handle = display(loss_curve([], title), display_id=True)

    def update(self, step: int, loss: float) -> None:
        self.losses.append(loss)
        if time.perf_counter() - self._last >= self.every:
            self._redraw()

    def _redraw(self) -> None:
        self._last = time.perf_counter()
        if self._handle is not None:
            self._handle.update(loss_curve(self.losses, self.title))

    def close(self) -> None:
        self._redraw()


def accuracy_by_length(accuracies: dict[int, float], title: str = "Accuracy by list length") -> go.Figure:
    """Bar chart of accuracy (per cent) against list length."""
    lengths = list(accuracies)
    values = [100 * accuracies[n] for n in lengths]
    fig = go.Figure(go.Bar(x=[str(n) for n in lengths], y=values, text=[f"{v:.2f} %" for v in values],
                           textposition="outside"))
    fig.update_layout(**_LAYOUT, title=title, xaxis_title="list length", yaxis_title="accuracy (%)",
                      yaxis_range=[min(values + [90]) - 2, 101.5], width=560, height=360)
    return fig


def _pair_grid(values: Tensor, max_sum: int) -> Tensor:
    """[max_sum + 1, max_sum + 1] grid over (a, b) from per-pair values in addition_pairs order; NaN where a + b > max_sum."""
    grid = torch.full((max_sum + 1, max_sum + 1), float("nan"))
    a, b = torch.meshgrid(torch.arange(max_sum + 1), torch.arange(max_sum + 1), indexing="ij")
    grid[(a + b) <= max_sum] = values.float()
    return grid


def addition_grid(correct: Tensor, max_sum: int = tasks.ADDITION_MAX, title: str = "Which sums the model gets right") -> go.Figure:
    """Map over (a, b): 1 = correct, 0 = wrong, blank where a + b > max_sum. `correct` is [n_pairs] in addition_pairs order."""
    fig = px.imshow(_np(_pair_grid(correct, max_sum)), origin="lower", zmin=0, zmax=1,
                    color_continuous_scale=[[0, "#d62728"], [1, "#2ca02c"]],
                    labels=dict(x="b (second token)", y="a (first token)", color="correct"), title=title)
    return fig.update_layout(**_LAYOUT, width=520, height=480)


def pair_map(values: Tensor, title: str, color_label: str, max_sum: int = tasks.ADDITION_MAX) -> go.Figure:
    """Map of one number per addition pair over (a, b), blank where a + b > max_sum; `values` in addition_pairs order."""
    fig = px.imshow(_np(_pair_grid(values, max_sum)), origin="lower", color_continuous_scale="Viridis",
                    labels=dict(x="b (second token)", y="a (first token)", color=color_label), title=title)
    return fig.update_layout(**_LAYOUT, width=560, height=480)


def heatmap(values: Tensor, x_label: str, y_label: str, title: str, color_label: str = "value",
            x: Sequence | None = None, y: Sequence | None = None, symmetric: bool = True) -> go.Figure:
    """A general heatmap [rows = y, columns = x]; diverging colours centred on zero when `symmetric`."""
    v = _np(values)
    kwargs = dict(color_continuous_scale="RdBu", color_continuous_midpoint=0.0) if symmetric else {}
    fig = px.imshow(v, x=x, y=y, labels=dict(x=x_label, y=y_label, color=color_label), title=title,
                    aspect="auto", **kwargs)
    return fig.update_layout(**_LAYOUT, width=600, height=520)


def bars(values: dict[str, float], x_label: str, y_label: str, title: str, log_y: bool = False) -> go.Figure:
    """Bar chart of named values."""
    fig = go.Figure(go.Bar(x=list(values), y=list(values.values()),
                           text=[f"{v:.3g}" for v in values.values()], textposition="outside"))
    fig.update_layout(**_LAYOUT, title=title, xaxis_title=x_label, yaxis_title=y_label, width=600, height=380)
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def logits(values: Tensor, title: str, highlight: int | None = None) -> go.Figure:
    """Bar chart of one position's logits over the vocabulary, with one token highlighted."""
    v = _np(values)
    colors = ["#d62728" if i == highlight else "#1f77b4" for i in range(len(v))]
    fig = go.Figure(go.Bar(x=list(range(len(v))), y=v, marker_color=colors))
    fig.update_layout(**_LAYOUT, title=title, xaxis_title="output token", yaxis_title="logit", width=640, height=320)
    return fig


def lines(curves: dict[str, Tensor], x_label: str, y_label: str, title: str, x: Sequence | None = None,
          log_x: bool = False) -> go.Figure:
    """One line per named curve, all against the same x (default 0, 1, 2, ...); given x values get markers."""
    fig = go.Figure()
    for name, values in curves.items():
        v = _np(values)
        fig.add_trace(go.Scatter(x=list(range(len(v))) if x is None else list(x), y=v, name=name,
                                 mode="lines" if x is None else "lines+markers"))
    fig.update_layout(**_LAYOUT, title=title, xaxis_title=x_label, yaxis_title=y_label, width=680, height=360)
    if log_x:
        fig.update_xaxes(type="log", tickvals=list(x) if x is not None else None)
    return fig


def spectrum(fractions: Tensor, title: str, highlight: Sequence[int] = (), n_tokens: int | None = None,
             y_label: str = "fraction of variance") -> go.Figure:
    """Bar chart of variance by frequency 1 .. n/2 (entry 0, the constant, is left out), `highlight`ed frequencies in red.

    The hover text gives each frequency's period in tokens (n_tokens / f).
    """
    v = _np(fractions)[1:]
    n_tokens = n_tokens or 2 * (len(v))
    freqs = list(range(1, len(v) + 1))
    colors = ["#d62728" if f in set(highlight) else "#1f77b4" for f in freqs]
    fig = go.Figure(go.Bar(x=freqs, y=v, marker_color=colors,
                           hovertext=[f"frequency {f}: period {n_tokens / f:.1f} tokens" for f in freqs]))
    fig.update_layout(**_LAYOUT, title=title, xaxis_title="frequency (cycles over the token values)",
                      yaxis_title=y_label, width=680, height=340)
    return fig


def grouped_bars(groups: dict[str, dict[str, float]], x_label: str, y_label: str, title: str) -> go.Figure:
    """Bars side by side: one colour per group (e.g. per model), one position per shared key."""
    fig = go.Figure([go.Bar(name=name, x=list(values), y=list(values.values())) for name, values in groups.items()])
    fig.update_layout(**_LAYOUT, barmode="group", title=title, xaxis_title=x_label, yaxis_title=y_label,
                      width=680, height=380)
    return fig


# ---- chapter 00
def histogram(values: Tensor | Sequence[float], x_label: str, title: str, marks: dict[str, float] | None = None,
              bins: int = 40, y_label: str = "count", log_y: bool = False) -> go.Figure:
    """Histogram of `values` in `bins` equal bins, with a dashed vertical line at each named value of `marks`
    (e.g. what a baseline would give). The bins are counted here, so the figure holds `bins` bars however many
    values there are (a million raw values in a figure would cost the kernel hundreds of MB)."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    low, high = v.min().item(), v.max().item()
    high = high if high > low else low + 1.0
    counts = torch.histc(v, bins=bins, min=low, max=high)
    width = (high - low) / bins
    centres = low + width * (torch.arange(bins, dtype=torch.float64) + 0.5)
    fig = go.Figure(go.Bar(x=_np(centres), y=_np(counts), width=width, name=x_label))
    for name, at in (marks or {}).items():
        fig.add_vline(x=at, line_dash="dash", line_color="#d62728", annotation_text=name,
                      annotation_position="top right")
    fig.update_layout(**_LAYOUT, title=title, xaxis_title=x_label, yaxis_title=y_label, width=640, height=360)
    if log_y:
        fig.update_yaxes(type="log")
    return fig


# ---- chapter 04
def term_heatmaps(terms: dict[str, Tensor], x_label: str, y_label: str, title: str,
                  color_label: str = "attention score") -> go.Figure:
    """One heatmap per named map [rows = y, columns = x], side by side on one diverging colour scale centred on zero,
    so that their sizes compare at a glance."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(terms), subplot_titles=list(terms), shared_yaxes=True,
                        horizontal_spacing=0.02)
    for col, (name, values) in enumerate(terms.items(), start=1):
        fig.add_trace(go.Heatmap(z=_np(values), coloraxis="coloraxis", name=name,
                                 hovertemplate=f"{x_label} %{{x}}, {y_label} %{{y}}: %{{z:.2f}}<extra>{name}</extra>"),
                      row=1, col=col)
        fig.update_xaxes(title_text=x_label, row=1, col=col)
    fig.update_yaxes(autorange="reversed")  # row 0 at the top, as in the other heatmaps
    fig.update_yaxes(title_text=y_label, row=1, col=1)
    fig.update_layout(**_LAYOUT, title=title, width=240 * len(terms) + 120, height=360,
                      coloraxis=dict(colorscale="RdBu", cmid=0.0, colorbar_title=color_label))
    return fig


def share_against_need(need: Tensor, share: Tensor, right: Tensor, title: str) -> go.Figure:
    """One point per list: the share of attention on the maximum (y) against the share it needs (x), coloured by
    whether the model answers the list right; the dashed diagonal is share = need, so points below it get less than
    the worst case asks for. A need above 1 (no share is sure to win) is drawn at 1."""
    need, right = need.clamp(max=1.0), right.bool()
    fig = go.Figure()
    for label, keep, colour in (("answered right", right, "#1f77b4"), ("answered wrong", ~right, "#d62728")):
        fig.add_trace(go.Scattergl(x=_np(need[keep]), y=_np(share[keep]), mode="markers", name=label,
                                   marker=dict(size=4, color=colour, opacity=0.5)))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="share = need",
                             line=dict(dash="dash", color="grey")))
    fig.update_layout(**_LAYOUT, title=title, xaxis_title="attention the maximum needs (worst case over positions)",
                      yaxis_title="attention the maximum gets", xaxis_range=[0, 1], yaxis_range=[0, 1.02],
                      width=620, height=480)
    return fig


# ---- chapter 02
def log_ratio_scatter(true: Tensor, estimates: dict[str, Tensor], title: str) -> go.Figure:
    """Each estimate of a transition table against the true one: one point per (current, next) transition,
    x = the true probability (log scale), y = log(estimated / true) in nats; above zero is made too likely.

    `true` is [vocab (current), vocab (next)] probabilities; each estimate is the same shape in
    log-probabilities (what a model's log_softmax gives).
    """
    current, following = torch.meshgrid(torch.arange(true.shape[0]), torch.arange(true.shape[1]), indexing="ij")
    hover = [f"{int(c)} → {int(n)}" for c, n in zip(current.flatten(), following.flatten())]
    fig = go.Figure()
    for name, log_estimate in estimates.items():
        ratio = log_estimate.detach() - true.log()
        fig.add_trace(go.Scatter(x=_np(true.flatten()), y=_np(ratio.flatten()), mode="markers", name=name,
                                 text=hover, hovertemplate="%{text}: true %{x:.2g}, log ratio %{y:.2f}",
                                 marker=dict(size=6, opacity=0.7)))
    fig.add_hline(y=0.0, line_dash="dash", line_color="grey")
    fig.update_layout(**_LAYOUT, title=title, xaxis_title="true P(next | current) (log scale)",
                      yaxis_title="log(estimated / true) (nats)", xaxis_type="log", width=680, height=400)
    return fig


# ---- chapter 03
def eigenvalue_planes(eigenvalues: dict[str, Tensor | Sequence[Tensor]], title: str,
                      notes: dict[str, str] | None = None) -> go.Figure:
    """One panel per named circuit: its eigenvalues in the complex plane, each set divided by its largest |λ|,
    with the unit circle; a panel given several sets (several heads) shows them all. `notes` (e.g. a
    panel's copying score) go under the panel titles."""
    from plotly.subplots import make_subplots

    names = list(eigenvalues)
    titles = [f"{name}<br>{notes[name]}" if notes and name in notes else name for name in names]
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=titles, shared_yaxes=True, horizontal_spacing=0.04)
    angle = torch.linspace(0, 2 * torch.pi, 181)
    for col, name in enumerate(names, start=1):
        sets = eigenvalues[name]
        sets = [sets] if isinstance(sets, Tensor) else list(sets)
        scaled = torch.cat([(s.detach() / s.detach().abs().max()).flatten() for s in sets])
        fig.add_trace(go.Scatter(x=_np(angle.cos()), y=_np(angle.sin()), mode="lines", showlegend=False,
                                 line=dict(color="lightgrey", width=1), hoverinfo="skip"), row=1, col=col)
        fig.add_trace(go.Scatter(x=_np(scaled.real), y=_np(scaled.imag), mode="markers", name=name, showlegend=False,
                                 marker=dict(size=6, opacity=0.6), hovertemplate="%{x:.2f} + %{y:.2f}i"),
                      row=1, col=col)
        fig.update_xaxes(title_text="real part / largest |λ|", range=[-1.15, 1.15], row=1, col=col)
    fig.update_yaxes(title_text="imaginary part / largest |λ|", range=[-1.15, 1.15], row=1, col=1)
    fig.update_layout(**_LAYOUT, title=title, width=330 * len(names), height=400)
    fig.update_layout(margin=dict(t=100))
    return fig
