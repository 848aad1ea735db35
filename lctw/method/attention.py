"""Sliding-window (+ sink) attention for one-pass ``window`` scoring (:mod:`lctw.method.scoring`).

In every layer the query at position q sees the ``width`` keys q - width < k <= q and, with a sink,
the first token of the row once it has left that window (q >= width). Where the sink is seen:

* ``sink=True``: at its true position 0 (distance q), as a model run on the whole row would;
* ``sink="in_range"``: right before the window, at position q - width (distance ``width``). With
  RoPE only distances enter attention, so each query then sees exactly what it would see as the
  last token of its own window [sink, x_{q-width+1} … x_q] at positions 0 … width: a model never
  trained on distances beyond its short context scores in range.

Kernels (``scorer.attention``), all exact to float rounding (tested against each other and against
brute force):

* ``flex``: FlexAttention with a sliding-window block mask (only the blocks within the window are
  computed, O(T·n)); the in-range sink is a ``score_mod`` that swaps in its re-rotated logit.
  Compiled on the GPU; on the CPU it runs as written (forward only, slow, for checks).
* ``sdpa``: blocked sliding window through ``scaled_dot_product_attention`` (its fused kernel):
  each block of queries attends to the ``width`` keys before it and its own (O(T·n) memory and
  time) plus one sink column; the in-range sink's per-query logit s rides in one extra head
  dimension ([q, s/scale]·[0, 1] = s).
* ``dense``: the model's own attention with an explicit (T, T) mask (any attention implementation
  that takes a 4D mask); the reference, O(T²). No in-range sink.
* ``auto``: ``flex`` on CUDA when FlexAttention is available, else ``sdpa``; should FlexAttention
  fail (an old GPU, a compiler problem), a warning is logged and ``sdpa`` is used from then on.

The kernels replace the model's attention through transformers' ``AttentionInterface`` for one
forward pass (:func:`windowed`), with no mask built by transformers.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.models.llama.modeling_llama import rotate_half  # the split-half rotation in_range assumes

from lctw.method.context import head_dim

ATTENTION = ("auto", "flex", "sdpa", "dense")  # the windowed-attention implementations (scorer.attention)
SINKS = (False, True, "in_range")
NAME = "lctw_window"
_FLEX_FAILED: list[str] = []  # errors of FlexAttention under ``auto``: the process falls back to sdpa
log = logging.getLogger(__name__)


def check_sink(sink) -> bool | str:
    """``sink`` as one of :data:`SINKS` (None counts as False); a clear error for anything else."""
    if sink is None or sink is False or sink is True or sink == "in_range":
        return bool(sink) if sink != "in_range" else sink
    raise ValueError(f"sink={sink!r} is not allowed: choose one of {list(SINKS)}")


def check_attention(attention: str) -> str:
    if attention not in ATTENTION:
        raise ValueError(f"attention={attention!r} is not allowed: choose one of {list(ATTENTION)}")
    return attention


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_attention(attention: str, device) -> str:
    """``auto`` -> ``flex`` on CUDA with FlexAttention (unless it failed in this process), else ``sdpa``."""
    check_attention(attention)
    if attention != "auto":
        return attention
    return "flex" if torch.device(device).type == "cuda" and flex_available() and not _FLEX_FAILED else "sdpa"


class Window:
    """What one windowed forward pass needs: window width, sink, kernel and (in range) the sink's RoPE.

    A plain class, not a dataclass, on purpose: it travels through the model's forward kwargs, and FSDP2's
    pre-forward hooks rebuild every dataclass among a module's inputs (and cast its tensors to the compute
    dtype), so each sharded layer would count its calls and cache its masks on a copy.
    """

    def __init__(self, width: int, sink: bool | str, kernel: str, rope: tuple[Tensor, Tensor] | None = None,
                 block: int | None = None, auto: bool = False):
        self.width = width
        self.sink = sink  # False | True | "in_range"
        self.kernel = kernel
        self.rope = rope  # (cos, sin) (T, D) rotating the raw sink key to q - width
        self.block = block  # sdpa: queries per block (None: max(128, width / 4), at most width)
        self.auto = auto  # chosen by ``auto``: a failing flex falls back to sdpa instead of raising
        self.calls = 0  # attention layers that ran the window kernel in this pass
        self.cache: dict = {}  # per pass, shared by the layers: the masks


def sink_rope(model, t: int, width: int, device) -> tuple[Tensor, Tensor]:
    """cos/sin that move the raw sink key from position 0 to max(0, q - width), for every q < t.

    Taken from the model's own rotary embedding (so every RoPE variant and its attention factor
    apply), divided by its value at position 0 to undo the attention factor already in the key.
    Assumes the split-half rotation of the Llama family (Llama, Mistral, Qwen, SmolLM2).
    """
    rotary = getattr(model.base_model, "rotary_emb", None)
    if rotary is None:
        raise ValueError(
            f"scorer.sink=in_range needs a RoPE model with a shared rotary embedding; "
            f"{type(model).__name__} has none: use scorer.sink=true or false"
        )
    # The same positions as the forward pass: RoPE variants whose frequencies depend on the length
    # (dynamic NTK, LongRoPE) then rotate the sink exactly as they rotate the queries.
    probe = torch.zeros(1, dtype=torch.float32, device=device)
    try:
        cos, sin = rotary(probe, torch.arange(t, device=device)[None])
    except TypeError as err:  # e.g. per-layer-type rotary embeddings
        raise ValueError(f"scorer.sink=in_range cannot use {type(rotary).__name__} ({err}): use scorer.sink=true "
                         "or false") from err
    cos, sin = cos[0].float(), sin[0].float()
    whole = head_dim(model.config)
    if cos.shape[-1] != whole:
        raise ValueError(
            f"scorer.sink=in_range needs RoPE on the whole head ({whole} dims); this model rotates "
            f"{cos.shape[-1]} (partial rotary): use scorer.sink=true or false"
        )
    pos = (torch.arange(t, device=device) - width).clamp(min=0)
    factor = cos[:1]  # position 0: cos = attention factor, sin = 0
    return cos[pos] / factor, sin[pos] / factor


def sink_logits(query: Tensor, key: Tensor, window: Window, scaling: float, chunk: int = 4096) -> Tensor:
    """(B, H, T) float32: each query's logit for the sink key moved to its in-range position
    max(0, q - width); in chunks of queries, so no (B, H, T, D) float32 temporaries exist."""
    b, h, t, _ = query.shape
    k0 = key[:, :, 0].float().repeat_interleave(h // key.shape[1], dim=1)[:, :, None]  # (B, H, 1, D), position 0
    k0_rot = rotate_half(k0)
    cos, sin = window.rope
    out = torch.empty(b, h, t, dtype=torch.float32, device=query.device)
    for s in range(0, t, chunk):
        e = min(t, s + chunk)
        moved = k0 * cos[s:e] + k0_rot * sin[s:e]  # (B, H, chunk, D)
        out[:, :, s:e] = (query[:, :, s:e].float() * moved).sum(-1) * scaling
    return out


def block_mask(w: int, bs: int, nb: int, sink: bool, b: int, dtype, device) -> Tensor:
    """(B·nb, 1, bs, w + bs [+ 1]) additive mask of the blocked window: 0 where allowed, -inf elsewhere.

    Float, so that sdpa does not convert a boolean mask again in every layer."""
    qq = torch.arange(bs, device=device)[:, None]
    kk = torch.arange(w + bs, device=device)[None, :]
    j = torch.arange(nb, device=device)[:, None, None]
    allowed = (qq < kk) & (kk <= qq + w) & (kk >= w - j * bs)  # (nb, bs, span): causal, in the window, real
    if sink:
        allowed = torch.cat([allowed, (j * bs + qq >= w).expand(nb, bs, 1)], dim=-1)  # the sink left the window
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    return mask[None].expand(b, *mask.shape).reshape(b * nb, 1, bs, -1)


def sdpa_window(query: Tensor, key: Tensor, value: Tensor, window: Window, scaling: float) -> Tensor:
    """Blocked sliding-window attention: (B, H, T, D) -> (B, T, H, D).

    Each block of ``bs`` queries attends to the ``width + bs`` keys before and in it (masked to the
    window) and, with a sink, one more key column: O(T·(width + bs)) instead of O(T²). Smaller
    blocks compute fewer masked-out scores but copy more keys; ``bs = max(128, width / 4)`` (at most
    ``width``; ``Window.block`` overrides it) was fastest on the CPU from n = 256 to 1024. Every
    tensor is written once, in the layout ``scaled_dot_product_attention`` takes: (B·blocks, heads,
    rows, head size).
    """
    b, h, t, d = query.shape
    hk, w = key.shape[1], window.width
    bs = max(1, min(window.block or min(w, max(128, w // 4)), t))
    nb = -(-t // bs)
    pad = nb * bs - t
    sink, in_range = bool(window.sink), window.sink == "in_range"
    dd = d + in_range  # in range, the sink's per-query logit s rides in one extra dimension: [q, s/scale]·[0, 1]
    span = w + bs
    cols = span + sink

    q = query.new_empty(b, nb, h, bs, dd)
    q[..., :d] = F.pad(query, (0, 0, 0, pad)).view(b, h, nb, bs, d).transpose(1, 2)
    kb = key.new_empty(b, nb, hk, cols, dd)
    vb = value.new_empty(b, nb, hk, cols, dd)  # equal q/k/v head sizes keep the fused kernel
    for x, out in ((key, kb), (value, vb)):  # keys of block j: positions j·bs - w … j·bs + bs - 1
        out[:, :, :, :span, :d] = F.pad(x, (0, 0, w, pad)).unfold(2, span, bs).permute(0, 2, 1, 4, 3)
    if in_range:
        kb[:, :, :, :span, d] = 0
        vb[..., d] = 0
        s = F.pad(sink_logits(query, key, window, scaling) / scaling, (0, pad))
        q[..., d] = s.to(q.dtype).view(b, h, nb, bs).transpose(1, 2)
    if sink:
        vb[:, :, :, -1, :d] = value[:, None, :, 0]
        if in_range:
            kb[:, :, :, -1, :d] = 0
            kb[:, :, :, -1, d] = 1
        else:  # the sink itself, at its true position
            kb[:, :, :, -1, :d] = key[:, None, :, 0]
    mask = window.cache.get("sdpa_mask")
    if mask is None or mask.shape[0] != b * nb or mask.dtype != query.dtype:  # built once per pass, all layers
        window.cache["sdpa_mask"] = mask = block_mask(w, bs, nb, sink, b, query.dtype, query.device)
    out = F.scaled_dot_product_attention(q.view(b * nb, h, bs, dd), kb.view(b * nb, hk, cols, dd),
                                         vb.view(b * nb, hk, cols, dd), attn_mask=mask, scale=scaling,
                                         enable_gqa=hk != h)
    return out.view(b, nb, h, bs, dd)[..., :d].transpose(2, 3).reshape(b, nb * bs, h, d)[:, :t]


def flex_window(query: Tensor, key: Tensor, value: Tensor, window: Window, scaling: float) -> Tensor:
    """FlexAttention with a sliding-window (+ sink) block mask: (B, H, T, D) -> (B, T, H, D)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    t, w, sink = query.shape[2], window.width, bool(window.sink)
    if "block_mask" not in window.cache:
        def mask_mod(b, h, q, k):
            inside = (k <= q) & (q - k < w)
            return (inside | (k == 0)) if sink else inside

        # compiled on the GPU: the block mask is then built block by block, never as a (T, T) tensor
        window.cache["block_mask"] = create_block_mask(mask_mod, None, None, t, t, device=query.device,
                                                       _compile=query.is_cuda)
    score_mod = None
    if window.sink == "in_range":
        s = sink_logits(query, key, window, scaling)

        def score_mod(score, b, h, q, k):
            return torch.where((k == 0) & (q >= w), s[b, h, q], score)  # both float32

    kwargs = dict(score_mod=score_mod, block_mask=window.cache["block_mask"], scale=scaling,
                  enable_gqa=key.shape[1] != query.shape[1])
    if query.is_cuda:
        return _compiled_flex()(query, key, value, **kwargs).transpose(1, 2)
    with warnings.catch_warnings():  # on the CPU, uncompiled flex is the forward-only reference path
        warnings.filterwarnings("ignore", message=".*flex_attention.*")
        return flex_attention(query, key, value, **kwargs).transpose(1, 2)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def window_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     lctw_window: Window | None = None, **kwargs):
    """transformers' attention-function signature; returns ((B, T, H, D), None)."""
    if lctw_window is None:
        raise RuntimeError(f"attention {NAME!r} runs only inside lctw.method.attention.windowed()")
    for option in ("softcap", "s_aux"):  # options of the model's attention the window kernels do not implement
        if kwargs.get(option) is not None:
            raise ValueError(f"scorer.mode=window cannot run this model's attention ({option}): "
                             "use scorer.mode=chunked")
    own = kwargs.get("sliding_window")
    if own is not None and own < lctw_window.width:
        raise ValueError(f"this model's layers attend to {own} keys only, fewer than the scoring window "
                         f"({lctw_window.width}): use scorer.mode=chunked or a smaller n")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    lctw_window.calls += 1
    if lctw_window.kernel == "flex":
        try:
            return flex_window(query, key, value, lctw_window, scaling).contiguous(), None
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - only ``auto`` falls back; an explicit choice raises
            if not lctw_window.auto:
                raise
            _FLEX_FAILED.append(repr(err))
            log.warning("FlexAttention failed (%r); scorer.attention=auto uses sdpa from now on", err)
            lctw_window.kernel = "sdpa"
    return sdpa_window(query, key, value, lctw_window, scaling).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, window_attention)


@contextlib.contextmanager
def windowed(model, t: int, width: int, sink, kernel: str, device):
    """Run ``model`` with sliding-window attention for one pass: yields the forward kwargs to pass."""
    sink = check_sink(sink)
    auto = kernel == "auto"
    kernel = resolve_attention(kernel, device)
    if kernel == "dense":
        raise ValueError("windowed() runs the flex and sdpa kernels; dense uses the model's own attention")
    rope = sink_rope(model, t, width, device) if sink == "in_range" else None
    _register()
    config = model.config
    previous = {"": config._attn_implementation}  # sub-configs (composite models) may differ: restore each
    for sub in getattr(config, "sub_configs", {}) or {}:
        if getattr(config, sub, None) is not None:
            previous[sub] = getattr(config, sub)._attn_implementation
    config._attn_implementation = NAME
    window = Window(width, sink, kernel, rope, auto=auto)
    try:
        yield {"lctw_window": window}
    finally:
        config._attn_implementation = previous
    if window.calls == 0:
        raise ValueError(f"{type(model).__name__}'s attention does not go through transformers' AttentionInterface, "
                         "so the window kernels never ran: use scorer.attention=dense or scorer.mode=chunked")
