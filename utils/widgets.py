"""ipywidgets explorers: controls on the left, figures that redraw when a control changes."""

from __future__ import annotations

import plotly.graph_objects as go
from utils import runtime  # noqa: F401  (one torch thread; freed memory back after every cell)
import torch

from utils import circuits, plots


def parse_token_list(text: str, vocab: int, n_ctx: int) -> list[int]:
    """'3, 41, 7' -> [3, 41, 7]; raises ValueError with a readable message on bad input."""
    parts = [p for p in text.replace(",", " ").split() if p]
    if not parts:
        raise ValueError("type at least one number")
    if len(parts) > n_ctx:
        raise ValueError(f"at most {n_ctx} numbers (the model's context), got {len(parts)}")
    try:
        tokens = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"only whole numbers, separated by commas or spaces: {text!r}") from None
    if not all(0 <= t < vocab for t in tokens):
        raise ValueError(f"every number must be between 0 and {vocab - 1}")
    return tokens


def show(out, items) -> None:
    """Make an ipywidgets Output show `items` (strings as text, anything else displayed), in one update.

    It sets the widget's outputs directly instead of `with out: clear_output(); display(...)`,
    whose capture of display messages stalls a headless run (nbclient, the benchmark) until
    the cell times out; the frontend also redraws once, without flicker.
    """
    import json

    from IPython.core.formatters import format_display_data

    outputs = []
    for item in items:
        if isinstance(item, str):
            outputs.append({"output_type": "stream", "name": "stdout", "text": item + "\n"})
            continue
        if isinstance(item, go.Figure):  # plotly's own formatter displays as a side effect and returns nothing
            data = {"application/vnd.plotly.v1+json": json.loads(item.to_json()), "text/plain": "<plotly figure>"}
            metadata = {}
        else:
            data, metadata = format_display_data(item)
        outputs.append({"output_type": "display_data", "data": data, "metadata": metadata})
    out.outputs = tuple(outputs)


def qk_explorer(model, tokens: tuple[int, ...] = (12, 3, 40, 7, 39, 2)):
    """Explorer for a one-layer model: pick a query and a key position and type a list.

    Shows the position-aware QK map (W_E + W_pos[q]) W_Q W_K^T (W_E + W_pos[k])^T with the
    list's own (query, key) pair marked, the list's attention pattern, and the logits at the
    query position.
    """
    import ipywidgets as widgets

    n_ctx, vocab = model.cfg.n_ctx, model.cfg.d_vocab
    query = widgets.IntSlider(value=n_ctx - 1, min=0, max=n_ctx - 1, description="query pos")
    key = widgets.IntSlider(value=0, min=0, max=n_ctx - 1, description="key pos")
    text = widgets.Text(value=", ".join(map(str, tokens)), description="your list", continuous_update=False)
    out = widgets.Output()

    def redraw(_=None) -> None:
        try:
            toks = parse_token_list(text.value, vocab, n_ctx)
        except ValueError as err:
            show(out, [f"Cannot read the list: {err}."])
            return
        q = min(query.value, len(toks) - 1)
        k = min(key.value, q)
        note = ([] if (q, k) == (query.value, key.value) else
                [f"showing query position {q}, key position {k} (a query sees only keys at or before it, "
                 f"inside a list of {len(toks)})"])
        with torch.no_grad():
            scores = circuits.full_qk_positional(model, q, k)
            logits, cache = model.run_with_cache(torch.tensor([toks]))
        fig = plots.heatmap(scores, f"key token at position {k}", f"query token at position {q}",
                            f"QK scores, query position {q} vs key position {k}", "attention score")
        fig.add_trace(go.Scatter(x=[toks[k]], y=[toks[q]], mode="markers", name="your list",
                                 marker=dict(symbol="x", size=14, color="black")))
        show(out, [*note, fig, plots.attention_pattern(cache["pattern", 0][0, 0], toks, title="Attention pattern on your list"),
                   plots.logits(logits[0, q], f"Logits at query position {q} (answer: {max(toks[:q + 1])})",
                                highlight=max(toks[:q + 1]))])

    for control in (query, key, text):
        control.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([query, key]), text, out])


def neuron_explorer(model, neuron: int = 0):
    """Scrub through the MLP neurons of a one-layer model with an MLP.

    For the chosen neuron: its input curve (what each token at each source position adds to the
    neuron's pre-activation with all the attention, from token_to_neuron), the spectrum of those
    curves with the dominant frequency marked, and what the neuron writes to every output logit
    (neuron_to_logit).
    """
    import ipywidgets as widgets

    from utils import fourier

    with torch.no_grad():
        maps = torch.stack([circuits.token_to_neuron(model, k) for k in range(model.cfg.n_ctx)])  # [pos, vocab, d_mlp]
        out_map = circuits.neuron_to_logit(model)  # [d_mlp, vocab]
    d_mlp = maps.shape[-1]
    slider = widgets.IntSlider(value=neuron, min=0, max=d_mlp - 1, description="neuron", continuous_update=False)
    summary = widgets.Label()
    out = widgets.Output()

    def redraw(_=None) -> None:
        n = slider.value
        curves = maps[:, :, n].T  # [vocab, pos]
        fractions = fourier.variance_fractions(curves).nan_to_num(0.0)  # NaN for a flat curve
        top = int(fractions.argmax())
        # a Label, not print(): text printed into an Output widget can stall a headless run (nbclient, nbval)
        if top == 0:
            summary.value = f"neuron {n}: its input does not depend on the tokens (flat curves, no frequency)"
        else:
            summary.value = (f"neuron {n}: frequency {top} (period {curves.shape[0] / top:.1f} tokens) explains "
                             f"{fractions[top]:.0%} of its input curves' variance")
        show(out, [plots.lines({f"token at position {k}": curves[:, k] for k in range(curves.shape[1])},
                               "token value", "added to the neuron's input", f"Neuron {n}: input curve"),
                   plots.spectrum(fractions, f"Neuron {n}: spectrum of its input curves", highlight=[top] if top else []),
                   plots.lines({"logit": out_map[n]}, "output token", "added to the logit per unit of activation",
                               f"Neuron {n}: what it writes to the logits")])

    slider.observe(redraw, names="value")
    redraw()
    return widgets.VBox([slider, summary, out])
