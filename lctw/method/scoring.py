"""Step 1 of the method: short-context log-probs and the scorers that produce them.

``short_context_logprobs(model, input_ids, n, mode)`` returns log p(x_i | at most n preceding tokens)
for every target x_2 … x_T, in one of two modes:

* ``chunked`` (paper parity): windows of n tokens every ``stride`` tokens (``unfold``), the first
  token of every window replaced by BOS when the sequence starts with BOS; the first window gives
  targets 2 … n, every later window its last ``stride`` targets. A target sees n - stride … n tokens.
  When (T - n) is not a multiple of the stride, one extra window ending at T covers the rest.
  Exactly equal to running each window on its own (tested against that brute force).
* ``window`` (one pass, sliding-window attention, :mod:`lctw.method.attention`): in every layer, the query
  that predicts x_i sees only the n positions before x_i (keys q - n < k <= q). ``sink`` adds the
  row's first token (BOS): ``true`` at its true distance (position 0); ``in_range`` right before a
  window of n - 2 tokens, so each target is predicted exactly as the last target of an n-token
  training window [BOS, x_{i-n+2} … x_{i-1}, x_i] (positions 0 … n - 1): the model is never asked
  about a distance it was not trained on (with one layer, ``in_range`` equals ``chunked`` at
  stride 1). With one layer every variant *is* each target on its own window, because RoPE depends
  only on relative distance (tested against brute force). With L layers it is not: hidden states of
  the window's positions already carry information from up to n - 1 positions further back, so x_i's
  prediction can depend on the last L·(n - 1) + 1 tokens. No single pass of length T can be exact for
  L > 1 (each window needs its own hidden states: T·n of them); ``window`` is instead exactly the
  model run with sliding-window attention of width n (tested against transformers' Mistral
  sliding-window implementation with the same weights). The first :func:`shared_targets` targets are
  exact in every mode. ``attention`` picks the kernel (``auto``: FlexAttention on CUDA, blocked sdpa
  elsewhere; ``dense``: the model's attention with a (T, T) mask).

The scorers that use these functions (``none``, ``self``, ``frozen``, ``small``) are in :mod:`lctw.method.scorers`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lctw.method.attention import check_attention, check_sink, windowed
from lctw.method.kernels import token_logprobs

LOGPROBS_METHOD = "lctw_logprobs"  # the FSDP forward method of a sharded model (lctw.training.distributed)

MODES = ("chunked", "window")


def logprobs_of(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[targets] in float32; logits (B, T, V), targets (B, T) -> (B, T)."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def model_logprobs(model, input_ids: Tensor, chunk_size: int | None = 1024, skip: int = 0, kernel: str = "chunked",
                   **kwargs) -> Tensor:
    """Log-probs of ``input_ids[:, 1:]`` under ``model`` given everything before them: (B, T-1) float32.

    With ``chunk_size`` the LM head runs in chunks of rows (:func:`lctw.method.kernels.token_logprobs`), so no
    (T, V) logits tensor exists in forward or backward; ``None`` takes the model's full logits. Models
    that post-process logits (soft-capping, a logit scale) always take the full logits. ``skip`` > 0
    skips the LM head for that many leading targets (NaN in the result). ``kernel`` picks the LM-head kernel
    (:func:`lctw.method.kernels.resolve_kernel`: chunked, or a fused CUDA kernel).
    """
    method = getattr(model, LOGPROBS_METHOD, None)  # an FSDP-sharded model (lctw.training.distributed)
    if method is not None:
        return method(input_ids, chunk_size, skip, kernel=kernel, **kwargs)
    return logprobs_in_forward(model, input_ids, chunk_size, skip, kernel=kernel, **kwargs)


def logprobs_in_forward(model, input_ids: Tensor, chunk_size: int | None = 1024, skip: int = 0,
                        kernel: str = "chunked", **kwargs) -> Tensor:
    """:func:`model_logprobs`'s computation; :mod:`lctw.training.distributed` registers it as an FSDP forward
    method of a sharded model, so that the LM head's parameters are gathered for it."""
    head = model.get_output_embeddings()
    post = any(getattr(model.config, k, None) for k in ("final_logit_softcapping", "logit_scale"))
    if chunk_size is None or head is None or post or not hasattr(head, "weight"):
        # inside an FSDP forward method the root's hooks have run: call forward itself, not the hooks again
        call = model.forward if hasattr(model, LOGPROBS_METHOD) else model
        logits = call(input_ids=input_ids, use_cache=False, **kwargs).logits[:, :-1]
        out = logprobs_of(logits, input_ids[:, 1:])
        out[:, :skip] = float("nan")
        return out
    hidden = model.base_model(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state[:, skip:-1]
    bias = getattr(head, "bias", None)
    out = token_logprobs(hidden, head.weight, input_ids[:, skip + 1 :], bias, chunk_size, kernel)
    return F.pad(out, (skip, 0), value=float("nan")) if skip else out


def default_stride(n: int, max_len: int) -> int:
    """The paper's stride (1 - n/N)·n, giving N/n extra window passes (6144 for 8192 -> 32768)."""
    return max(1, int(round((1 - n / max_len) * n)))


def check_scoring_args(n: int, mode: str, stride: int | None, sink=False, attention: str = "auto") -> None:
    """Plain errors about the arguments of :func:`short_context_logprobs` (the config layer adds the key)."""
    check_sink(sink)
    check_attention(attention)
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not allowed: choose one of {list(MODES)}")
    if n < 2:
        raise ValueError(f"n={n} is out of range: the short context needs n >= 2 tokens")
    if mode == "window" and sink == "in_range" and n < 3:
        raise ValueError(f"sink=in_range needs n >= 3 (BOS, a token, the target), got n={n}")
    if mode == "window" and sink == "in_range" and attention == "dense":
        raise ValueError("sink=in_range needs attention in ['auto', 'flex', 'sdpa'] "
                         "(the dense mask cannot move the sink); got 'dense'")
    if stride is not None and not 1 <= stride <= n - 1:
        raise ValueError(
            f"stride={stride} does not fit windows of n={n} tokens: allowed 1 … {n - 1} "
            "(a window of n tokens holds n - 1 targets), or null for the paper's (1 - n/N)·n"
        )


class ShortContext:
    """How "at most n preceding tokens" is computed: n, mode, stride (chunked), sink and kernel (window).

    Every scorer with a model holds one; ``logprobs`` scores in eval mode and restores the model's mode.
    Eval mode: the short-context log-prob is a property of θ' (dropout off), the same for every scorer
    and for the cache. The paper's code scores ``self`` in train mode; the two differ only on models
    with dropout, where train mode would add a dropout sample's noise to every score.
    """

    def __init__(self, n: int, max_len: int, mode: str = "chunked", stride: int | None = None,
                 sink: bool | str = False, attention: str = "auto"):
        check_scoring_args(n, mode, stride, sink=sink, attention=attention)
        if n >= max_len:
            raise ValueError(f"n={n} must be smaller than max_len={max_len} (the short context is a part of the long)")
        self.n, self.max_len, self.mode, self.sink = int(n), int(max_len), mode, check_sink(sink)
        self.attention = attention
        self.stride = int(stride) if stride is not None else default_stride(n, max_len)

    def logprobs(self, model, input_ids: Tensor, skip_shared: bool = False) -> Tensor:
        """:func:`short_context_logprobs` of ``model`` with these settings, in eval mode, no grad."""
        was_training = model.training
        model.eval()
        try:
            return short_context_logprobs(model, input_ids, self.n, self.mode, self.stride, self.sink,
                                          skip_shared=skip_shared, attention=self.attention)
        finally:
            model.train(was_training)

    def identity(self) -> dict:
        """The settings that change the numbers (the score cache's fingerprint)."""
        return {"n": self.n, "mode": self.mode,
                "stride": self.stride if self.mode == "chunked" else None,  # irrelevant in window mode
                "sink": self.sink if self.mode == "window" else None}  # irrelevant in chunked mode


def short_context_logprobs(
    model,
    input_ids: Tensor,
    n: int,
    mode: str = "chunked",
    stride: int | None = None,
    sink: bool | str = False,
    bos_token_id: int | None = None,
    skip_shared: bool = False,
    attention: str = "auto",
) -> Tensor:
    """log p(x_i | at most n preceding tokens) for ``input_ids[:, 1:]``: (B, T-1) float32, no grad.

    ``stride`` (chunked) defaults to the paper's rule for N = T. ``sink`` (window) is False, True or
    "in_range"; ``attention`` (window) the kernel, see :mod:`lctw.method.attention`. ``bos_token_id``
    defaults to the model config's. ``skip_shared=True`` does not compute the first
    :func:`shared_targets` targets (their context equals the full one) and leaves them as NaN.
    """
    check_scoring_args(n, mode, stride, sink=sink, attention=attention)
    t = input_ids.shape[1]
    if bos_token_id is None:
        bos_token_id = getattr(model.config, "bos_token_id", None)
    skip = shared_targets(mode, n, sink) if skip_shared else 0
    with torch.no_grad():
        if mode == "window" and t - 1 <= shared_targets(mode, n, sink):
            out = model_logprobs(model, input_ids)  # every target already sees at most n tokens
        elif mode == "window":
            out = _window(model, input_ids, n, sink, attention, skip)
        else:
            out = _chunked(model, input_ids, n, stride or default_stride(n, t), bos_token_id, skip)
    out[:, :skip] = float("nan")
    return out


def shared_targets(mode: str, n: int, sink: bool | str = False) -> int:
    """How many leading targets see exactly the full context in ``mode`` (their score is 0).

    window: targets x_2 … x_{n+1} see all their min(i - 1, n) = i - 1 predecessors. chunked and window
    with the in-range sink: the first window is the sequence's own first n tokens, so targets x_2 … x_n.
    """
    return n if mode == "window" and sink != "in_range" else n - 1


def window_width(n: int, sink: bool | str = False) -> int:
    """Keys per query in window mode: n, or n - 2 before the in-range sink (the n-token window's BOS)."""
    return n - 2 if sink == "in_range" else n


def _chunked(model, ids: Tensor, n: int, stride: int, bos: int | None, skip: int) -> Tensor:
    """Windows of n tokens every ``stride``; ``skip`` (0 or the n - 1 shared targets) leaves out the first window."""
    b, t = ids.shape
    if t <= n:
        return model_logprobs(model, ids)
    starts = list(range(0, t - n + 1, stride))
    remainder = (t - n) - starts[-1]
    if remainder:
        starts.append(t - n)
    windows = torch.stack([ids[:, s : s + n] for s in starts], dim=1).clone()  # (B, W, n)
    if bos is not None:
        has_bos = ids[:, 0] == bos
        windows[:, :, 0] = torch.where(has_bos[:, None], torch.full_like(windows[:, :, 0], bos), windows[:, :, 0])
    first = 1 if skip else 0  # the first window's n - 1 targets are the shared ones
    lp = model_logprobs(model, windows[:, first:].reshape(-1, n)).view(b, len(starts) - first, n - 1)
    pieces = [torch.full((b, n - 1), float("nan"), device=ids.device)] if skip else [lp[:, 0]]
    for w in range(1, len(starts)):
        keep = remainder if (remainder and w == len(starts) - 1) else stride
        pieces.append(lp[:, w - first, n - 1 - keep :])
    return torch.cat(pieces, dim=1)


def window_mask(t: int, n: int, sink: bool, device=None) -> Tensor:
    """(T, T) bool: query q may see key k iff q - n < k <= q (n keys), or k = 0 with a sink."""
    q = torch.arange(t, device=device)[:, None]
    k = torch.arange(t, device=device)[None, :]
    allowed = (k <= q) & (q - k < n)
    if sink:
        allowed |= k == 0
    return allowed


def _window(model, ids: Tensor, n: int, sink: bool | str, attention: str, skip: int) -> Tensor:
    if attention != "dense":  # windowed() resolves auto itself (and may fall back from flex to sdpa)
        with windowed(model, ids.shape[1], window_width(n, sink), sink, attention, ids.device) as kwargs:
            out = model_logprobs(model, ids, skip=skip, **kwargs)
        return out
    allowed = window_mask(ids.shape[1], n, sink, ids.device)[None, None]
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if impl == "eager":  # eager attention adds the mask to the scores
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=ids.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    elif impl == "sdpa":
        mask = allowed
    else:
        raise ValueError(
            f"scorer.mode=window needs model.attn_implementation in ['sdpa', 'eager'], got {impl!r}; "
            "use scorer.attention=sdpa or flex, or scorer.mode=chunked"
        )
    return model_logprobs(model, ids, skip=skip, attention_mask=mask)
