"""Test oracles: the slow, obviously correct references the fast paths are checked against.

Also imported by ``benchmarks/window_fidelity.py`` (which adds ``tests/`` to its path).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from lctw.method.scorers import FrozenScorer
from lctw.method.scoring import logprobs_of, window_width


def frozen_copy(model: torch.nn.Module, n: int, max_len: int, **options) -> FrozenScorer:
    """A frozen scorer over a copy of an in-memory model."""
    return FrozenScorer(n, max_len, **options).use(copy.deepcopy(model))


def brute_force_logprobs(model, input_ids: Tensor, n: int, sink: bool | str = False,
                         targets: list[int] | None = None) -> Tensor:
    """The reference: one forward pass per target on its own context of at most n tokens.

    ``sink=True`` prepends the first token at position 0 (true distance); ``"in_range"`` prepends it to
    the last n - 2 tokens and numbers them 0 … n - 2 (an n-token training window, without its target).
    ``targets`` (indices into the (B, T-1) result) computes only those; the rest is NaN.
    """
    b, t = input_ids.shape
    dev = input_ids.device
    out = torch.full((b, t - 1), float("nan"))
    width = window_width(n, sink)
    with torch.no_grad():
        for i in (range(1, t) if targets is None else [j + 1 for j in targets]):
            lo = max(0, i - width)
            ctx, pos = input_ids[:, lo:i], torch.arange(lo, i, device=dev)
            if sink and lo > 0:
                ctx = torch.cat([input_ids[:, :1], ctx], dim=1)
                first = torch.zeros(1, dtype=torch.long, device=dev)
                pos = torch.arange(len(pos) + 1, device=dev) if sink == "in_range" else torch.cat([first, pos])
            # An explicit causal mask: transformers reads a jump in position_ids as a packed-sequence
            # boundary and would otherwise hide the sink from the window.
            causal = torch.ones(len(pos), len(pos), dtype=torch.bool, device=dev).tril()[None, None]
            logits = model(input_ids=ctx, position_ids=pos[None].expand(b, -1), attention_mask=causal,
                           use_cache=False).logits
            out[:, i - 1] = logprobs_of(logits[:, -1:], input_ids[:, i : i + 1])[:, 0].cpu()
    return out
