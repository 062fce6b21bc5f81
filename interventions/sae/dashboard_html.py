"""What a feature dashboard holds, and how it is written out: one static HTML page, and
Neuronpedia-compatible JSON. :func:`interventions.sae.dashboard.harvest_features` fills it.

The page needs no server and loads nothing: CSS, SVG histograms and a few lines of JS
(hover text and the example count) are inline. Each token of an example is coloured by
its activation relative to the feature's maximum.

The JSON follows the feature fields of Neuronpedia's batch upload format (as written by
SAEDashboard's Neuronpedia runner): per feature ``feature_index``, ``maxActApprox``,
``frac_nonzero``, ``pos_str``/``pos_values`` and ``neg_str``/``neg_values`` (top and bottom
logits), ``freq_hist_data_bar_heights``/``freq_hist_data_bar_values`` (counts and bin
centres, parallel arrays of one length), ``logits_hist_data_bar_heights``/
``logits_hist_data_bar_values``, and ``activations``: one entry per example with ``tokens``,
``values``, ``bin_min``, ``bin_max``, ``bin_contains`` and ``qualifying_token_index``; the
batch wraps them as ``{"model_id", "layer", "sae_set", "features"}``. Fields this package
does not compute (correlated neurons, decoder weight distributions, UMAP) are left out.

>>> card = FeatureCard(3, 2.0, 0.5, 1, (0.0, 1.0, 2.0), (0, 1),
...                    (Example(0, 1, ("a", "b"), (0.0, 2.0), 1),), (("x", 1.0),), (("y", -1.0),),
...                    (), ())
>>> dash = FeatureDashboard("resid_pre[0]", "gpt2", 1, 2, (card,))
>>> batch = neuronpedia_batch(dash)
>>> feature = batch["features"][0]
>>> batch["layer"], feature["freq_hist_data_bar_heights"], feature["freq_hist_data_bar_values"]
(0, [0, 1], [0.5, 1.5])
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["Example", "FeatureCard", "FeatureDashboard", "neuronpedia_batch", "render_html"]


@dataclass(frozen=True)
class Example:
    """One max-activating prompt: a window of tokens around its strongest token."""

    prompt: int  # index of the prompt in the dataset
    position: int  # position of the strongest token in the prompt
    tokens: tuple[str, ...]
    values: tuple[float, ...]  # the feature's activation at each token of the window
    centre: int  # index of the strongest token in ``tokens``

    @property
    def max_value(self) -> float:
        return self.values[self.centre]


@dataclass(frozen=True)
class FeatureCard:
    """What a dashboard shows of one feature."""

    index: int
    max_activation: float
    density: float  # fraction of tokens where the feature is non-zero
    n_nonzero: int
    hist_edges: tuple[float, ...]  # len(hist_counts) + 1 edges of the non-zero activations
    hist_counts: tuple[int, ...]
    examples: tuple[Example, ...]  # strongest first
    top_logits: tuple[tuple[str, float], ...]  # tokens the feature promotes most
    bottom_logits: tuple[tuple[str, float], ...]  # tokens it suppresses most
    logit_hist_edges: tuple[float, ...]
    logit_hist_counts: tuple[int, ...]


@dataclass(frozen=True)
class FeatureDashboard:
    """Harvested features of one SAE over a dataset (see :func:`harvest_features`)."""

    where: str
    model_name: str | None
    n_prompts: int
    n_tokens: int
    features: tuple[FeatureCard, ...]
    sae_id: str | None = None

    def to_html(self) -> str:
        """One self-contained HTML page (inline CSS, SVG and a few lines of JS)."""
        return render_html(self)

    def to_neuronpedia(self) -> dict[str, Any]:
        """The features as a Neuronpedia batch (the fields are listed in the module docstring)."""
        return neuronpedia_batch(self)

    def save(self, directory: str) -> tuple[str, str]:
        """Write ``dashboard.html`` and ``neuronpedia.json`` into ``directory``; their paths."""
        import json
        from pathlib import Path

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        html, js = out / "dashboard.html", out / "neuronpedia.json"
        html.write_text(self.to_html(), encoding="utf-8")
        js.write_text(json.dumps(self.to_neuronpedia(), indent=1), encoding="utf-8")
        return str(html), str(js)


def _np_feature(card: FeatureCard) -> dict[str, Any]:
    edges = card.hist_edges
    centres = [(edges[i] + edges[i + 1]) / 2 for i in range(len(card.hist_counts))]
    lcentres = [
        (card.logit_hist_edges[i] + card.logit_hist_edges[i + 1]) / 2
        for i in range(len(card.logit_hist_counts))
    ]
    return {
        "feature_index": card.index,
        "maxActApprox": card.max_activation,
        "frac_nonzero": card.density,
        "pos_str": [t for t, _ in card.top_logits],
        "pos_values": [v for _, v in card.top_logits],
        "neg_str": [t for t, _ in card.bottom_logits],
        "neg_values": [v for _, v in card.bottom_logits],
        "freq_hist_data_bar_heights": list(card.hist_counts),
        "freq_hist_data_bar_values": centres,
        "logits_hist_data_bar_heights": list(card.logit_hist_counts),
        "logits_hist_data_bar_values": lcentres,
        "activations": [
            {
                "tokens": list(ex.tokens),
                "values": list(ex.values),
                "bin_min": -1,
                "bin_max": card.max_activation,
                "bin_contains": -1,
                "qualifying_token_index": ex.centre,
            }
            for ex in card.examples
        ],
    }


def neuronpedia_batch(dash: FeatureDashboard) -> dict[str, Any]:
    """The dashboard as a Neuronpedia batch ``{"model_id", "layer", "sae_set", "features"}``
    (each example has ``bin_min`` = ``bin_contains`` = -1: top activations, not a quantile bin)."""
    match = re.search(r"\[(\d+)\]", dash.where)
    return {
        "model_id": dash.model_name,
        "layer": int(match.group(1)) if match else None,
        "sae_set": dash.sae_id or dash.where,
        "n_prompts_total": dash.n_prompts,
        "n_tokens_total": dash.n_tokens,
        "features": [_np_feature(card) for card in dash.features],
    }


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:70em}
h2{margin-top:1.6em;border-top:1px solid #ccc;padding-top:.6em}
.stats span{margin-right:1.5em}
.ex{font-family:ui-monospace,monospace;white-space:pre-wrap;margin:.25em 0;line-height:1.6}
.tok{border-radius:2px}
.tok.centre{outline:1px solid #d35400}
.meta{color:#777;font-size:.85em;margin-right:.6em}
table.logits{border-collapse:collapse;display:inline-table;margin-right:2em;vertical-align:top}
table.logits td{padding:0 .5em;font-family:ui-monospace,monospace}
svg{margin-right:2em}
"""

_JS = """
(function(){
  var n = document.querySelectorAll('.ex').length;
  document.getElementById('summary').textContent = n + ' examples shown';
  document.querySelectorAll('.tok').forEach(function(t){
    t.title = 'activation ' + Number(t.dataset.act).toFixed(3);
  });
})();
"""


def _colour(value: float, top: float) -> str:
    share = 0.0 if top <= 0 else max(0.0, min(1.0, value / top))
    return f"rgba(230,126,34,{share:.3f})"


def _example(ex: Example, top: float) -> str:
    spans = []
    for i, (tok, val) in enumerate(zip(ex.tokens, ex.values, strict=True)):
        cls = "tok centre" if i == ex.centre else "tok"
        spans.append(
            f'<span class="{cls}" data-act="{val:.6g}" style="background:{_colour(val, top)}">'
            f"{html.escape(tok)}</span>"
        )
    meta = f'<span class="meta">prompt {ex.prompt} pos {ex.position} max {ex.max_value:.3f}</span>'
    return f'<div class="ex">{meta}{"".join(spans)}</div>'


def _svg(edges: tuple[float, ...], counts: tuple[int, ...], title: str) -> str:
    if not counts:
        return f"<p>{html.escape(title)}: no non-zero values</p>"
    w, h, most = 320, 110, max(counts) or 1
    bar = w / len(counts)
    rects = "".join(
        f'<rect x="{i * bar:.2f}" y="{h - 90 * c / most:.2f}" width="{max(bar - 1, 1):.2f}" '
        f'height="{90 * c / most:.2f}" fill="#e67e22"><title>{edges[i]:.3g}..{edges[i + 1]:.3g}'
        f": {c}</title></rect>"
        for i, c in enumerate(counts)
    )
    return (
        f'<svg width="{w}" height="{h + 20}" role="img" aria-label="{html.escape(title)}">'
        f'<text x="0" y="12" font-size="11">{html.escape(title)}</text>{rects}'
        f'<text x="0" y="{h + 16}" font-size="10">{edges[0]:.3g}</text>'
        f'<text x="{w - 40}" y="{h + 16}" font-size="10">{edges[-1]:.3g}</text></svg>'
    )


def _logit_table(rows: tuple[tuple[str, float], ...], title: str) -> str:
    body = "".join(f"<tr><td>{html.escape(repr(t))}</td><td>{v:+.3f}</td></tr>" for t, v in rows)
    return f'<table class="logits"><tr><th colspan="2">{title}</th></tr>{body}</table>'


def _card(card: FeatureCard) -> str:
    examples = "".join(_example(ex, card.max_activation) for ex in card.examples)
    logits = (
        _logit_table(card.top_logits, "promotes") + _logit_table(card.bottom_logits, "suppresses")
        if card.top_logits
        else "<p>no logits (the decoder does not write the residual stream)</p>"
    )
    return (
        f'<section class="feature" id="f{card.index}"><h2>Feature {card.index}</h2>'
        f'<div class="stats"><span>max activation {card.max_activation:.4g}</span>'
        f"<span>density {card.density:.4%} ({card.n_nonzero} tokens)</span></div>"
        f"{_svg(card.hist_edges, card.hist_counts, 'non-zero activations')}"
        f"{_svg(card.logit_hist_edges, card.logit_hist_counts, 'logit effects')}"
        f"<div>{logits}</div><h3>Top activations</h3>"
        f"{examples or '<p>the feature never fired</p>'}</section>"
    )


def render_html(dash: FeatureDashboard) -> str:
    """The dashboard as one self-contained HTML page."""
    title = f"SAE features at {dash.where}" + (f" of {dash.model_name}" if dash.model_name else "")
    body = "".join(_card(card) for card in dash.features)
    data = json.dumps(neuronpedia_batch(dash)).replace("</", "<\\/")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{dash.n_prompts} prompts, {dash.n_tokens} tokens; "
        f'<span id="summary"></span></p>{body}'
        f"<script>{_JS}</script>"
        f'<script type="application/json" id="data">'
        f"{data}</script>"
        "</body></html>"
    )
