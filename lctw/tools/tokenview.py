"""Which tokens get weight: one sequence's scores s_i and weights w_i, as an HTML page and a PNG.

Why: the method stands or falls with which tokens get high scores. :func:`token_view` runs the
configured parts themselves on one sequence (θ's long log-probs with :func:`lctw.method.scoring.model_logprobs`,
the scorer's short log-probs, the weighting's weights), so what is shown is what training computes.
``python -m lctw.tools.view`` writes the view of a text file; :class:`lctw.training.callbacks.TokenWeights` logs
it to W&B at each validation.
"""

from __future__ import annotations

import copy
import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lctw.method.scoring import model_logprobs


@dataclass
class TokenView:
    """Per target x_2 … x_T of one sequence: its text, log-probs, the weighting's score s_i and weight.

    Index j is the target at position j + 1, which has j + 1 tokens before it: beyond n iff j >= n.
    """

    tokens: list[str]
    long: np.ndarray
    short: np.ndarray
    score: np.ndarray
    weight: np.ndarray
    n: int
    title: str

    def top(self, k: int) -> list[int]:
        """Indices of the k highest scores, highest first (ties: earlier position first)."""
        return [int(j) for j in np.argsort(-self.score, kind="stable")[:k]]


def token_view(theta, scorer, weighting, input_ids: torch.Tensor, tokenizer, n: int, title: str = "",
               chunk_size: int | None = 1024) -> TokenView:
    """The view of ``input_ids`` (1, T). The weighting is a copy with its own generator, so that sparse
    tie-breaking here never moves training's random stream."""
    if scorer is None or not scorer.produces_scores:
        raise ValueError("the token view needs a scorer that produces scores (not scorer=none)")
    weighting = copy.copy(weighting)
    if getattr(weighting, "generator", None) is not None:
        weighting.generator = torch.Generator().manual_seed(weighting.seed)
    ids = input_ids[:1]
    mask = torch.ones(1, ids.shape[1] - 1, dtype=torch.bool, device=ids.device)
    with torch.no_grad():
        long = model_logprobs(theta, ids, chunk_size).float()
        short = scorer(theta, {"input_ids": ids, "mask": mask}, long).float()
        weights = weighting(long, short, mask)
        scores = weighting.scores(long, short)
    tokens = [tokenizer.decode([t]) for t in ids[0, 1:].tolist()]
    as_np = lambda x: x[0].detach().cpu().numpy().astype(np.float64)  # noqa: E731
    return TokenView(tokens, as_np(long), as_np(short), as_np(scores), as_np(weights), n, title)


def _colour(value: float, top: float, rgb: tuple[int, int, int]) -> str:
    alpha = 0.0 if top <= 0 else min(1.0, max(0.0, value / top))
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{alpha:.2f})"


def _spans(view: TokenView, values: np.ndarray, rgb: tuple[int, int, int]) -> str:
    # colour scale up to the 99th percentile, so that one outlier does not wash out the rest
    top = float(np.quantile(values, 0.99)) if len(values) else 0.0
    out = []
    for j, token in enumerate(view.tokens):
        if j == view.n:
            out.append('<span class="n">| n</span>')
        tip = (f"position {j + 1}: s={view.score[j]:.3f} w={view.weight[j]:.3f} "
               f"log p long={view.long[j]:.3f} short={view.short[j]:.3f}")
        text = html.escape(token).replace("\n", "↵<br>")
        out.append(f'<span style="background:{_colour(values[j], top, rgb)}" title="{tip}">{text}</span>')
    return "".join(out)


def visible(token: str) -> str:
    """A token for a table cell: whitespace shown (``␣``, ``↵``), HTML escaped."""
    return html.escape(token).replace(" ", "␣").replace("\n", "↵")


def to_html(view: TokenView, top_k: int = 20) -> str:
    """A self-contained page: the text coloured by score, then by weight, then the top-scored tokens."""
    rows = []
    for rank, j in enumerate(view.top(top_k), 1):
        before = html.escape("".join(view.tokens[max(0, j - 8) : j]))
        rows.append(f"<tr><td>{rank}</td><td>{j + 1}</td><td>{before}<b>{visible(view.tokens[j])}</b></td>"
                    f"<td>{view.long[j]:.3f}</td><td>{view.short[j]:.3f}</td><td>{view.score[j]:.3f}</td>"
                    f"<td>{view.weight[j]:.3f}</td></tr>")
    beyond = view.weight[view.n :].sum() / max(view.weight.sum(), 1e-12)
    return f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(view.title)}</title><style>
body {{ font-family: sans-serif; max-width: 60em; margin: 1em auto; }}
.text {{ font-family: monospace; white-space: pre-wrap; line-height: 1.6; border: 1px solid #ccc; padding: .5em; }}
.n {{ color: #888; font-weight: bold; }} table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: .2em .5em; text-align: right; }} td:nth-child(3) {{ text-align: left; }}
</style></head><body>
<h2>{html.escape(view.title)}</h2>
<p>{len(view.tokens)} targets, n = {view.n} (marked "| n"); s_i = |log p_short − log p_long|,
mean {view.score.mean():.4f}; weights mean {view.weight.mean():.4f}, max {view.weight.max():.4f},
mass beyond n {beyond:.3f}. Hover a token for its numbers.</p>
<h3>Coloured by score s_i (red)</h3><div class="text">{_spans(view, view.score, (220, 40, 40))}</div>
<h3>Coloured by weight w_i (blue)</h3><div class="text">{_spans(view, view.weight, (40, 90, 220))}</div>
<h3>Top {top_k} tokens by score</h3>
<table><tr><th>rank</th><th>position</th><th>token (after its context)</th><th>log p long</th><th>log p short</th>
<th>s_i</th><th>w_i</th></tr>
{"".join(rows)}</table></body></html>
"""


def save_png(view: TokenView, path: Path, top_k: int = 10) -> Path:
    """Scores and weights along the sequence (n marked), the top-scored tokens annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos = np.arange(1, len(view.tokens) + 1)
    fig, (ax_s, ax_w) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True)
    ax_s.bar(pos, view.score, width=1.0, color="tab:red")
    for j in view.top(top_k):
        ax_s.annotate(repr(view.tokens[j].strip() or view.tokens[j]), (j + 1, view.score[j]), fontsize=7,
                      rotation=30, xytext=(2, 2), textcoords="offset points")
    ax_s.set_ylabel("score s_i (nats)")
    ax_w.bar(pos, view.weight, width=1.0, color="tab:blue")
    ax_w.set_ylabel("weight w_i")
    ax_w.set_xlabel("target position (tokens before it)")
    for ax in (ax_s, ax_w):
        ax.axvline(view.n + 0.5, color="grey", linestyle="--", linewidth=1)
    ax_s.set_title(view.title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
