"""Memory-light per-token log-probabilities of the LM head, and the token-weighted loss.

Why not just ``log_softmax(lm_head(hidden))``? At long context the LM head dominates activation memory.
With T = 32k tokens and V = 128k vocabulary the naive path holds, in float32,

* the logits (T x V, 16 GiB),
* the ``log_softmax`` output, saved for its backward (another 16 GiB),
* and during backward the gradient w.r.t. that output and w.r.t. the logits (16 GiB or more each),

i.e. several T x V float buffers that dwarf the rest of the model's activations. But the loss only needs
one number per token: ``log p(target) = logit[target] - logsumexp(logits)``.

:class:`_ChunkedTokenLogprobs` therefore processes the flattened ``B*T`` rows in chunks. Forward computes one
chunk's logits, keeps only its logsumexp (one float per row) and target logit, and drops the logits. Backward
recomputes each chunk's logits (one extra matmul, the usual recompute-for-memory trade) and turns them, in
place, into ``dL/dlogits = g * (onehot(target) - softmax)``, which it immediately contracts into the
gradients of ``hidden``, ``weight`` and ``bias``. At most one (chunk, V) float32 buffer is alive at a time,
plus float32 copies of ``weight`` (a no-op when it is already float32, e.g. under bf16-mixed) and its
gradient accumulator: O(chunk*V + V*D) instead of O(T*V).

Numerics: the matmul, softmax and all accumulations run in float32 (float64 if the inputs are float64, which
lets ``torch.autograd.gradcheck`` verify the hand-written backward); autocast is disabled inside so a
surrounding ``bf16-mixed`` context cannot silently drop the logits to bf16. Gradients are returned in the
inputs' dtypes. Plain eager code: ``torch.compile`` is not assumed to be available.

Fused kernels (the ``loss`` option): on CUDA, two packages on the index compute the same per-token
log-probs in Triton without a (T, V) buffer and faster than the eager chunks: Apple's
``cut-cross-entropy`` (``loss=cce``) and LinkedIn's Liger fused linear cross-entropy (``loss=liger``).
``loss=auto`` takes the first one installed when the hidden states are on CUDA and the chunked path
otherwise; an explicitly requested kernel that cannot run is an error, never a silent fallback.

Both are called exactly, so they agree with the chunked path to rounding (``benchmarks/gpu_smoke.py``
measures that on a GPU, at a 128k vocabulary, against stated tolerances):

* CCE without its gradient filtering (``filter_eps=None``) and with exact accumulation of the gradient
  of the hidden states (:func:`_cce_exact`). Its default implementation adds each vocabulary block's
  partial gradient into a bf16 buffer: emulated, that is a relative L2 error of 3.1e-2 at V = 32k and
  5.6e-2 at V = 128k, against 2.3e-3 with Kahan summation and 1.7e-3 for one bf16 rounding.
* Liger with fp32 accumulation (``accum_dtype``). Its logits are bf16 under bf16 weights, so its
  log-probs carry bf16 rounding: against the fp32 short-context pass that is a score noise of
  0.005 nats on average, 0.016 at the 99th percentile (measured on SmolLM2-135M), far below the scores
  the weightings rank (tenths of a nat and more), but not zero; ``loss=chunked`` is exact in fp32.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["KERNELS", "resolve_kernel", "token_logprobs", "weighted_loss"]

# loss option -> the package that provides it (None: part of lctw)
KERNELS = {"auto": None, "chunked": None, "cce": "cut_cross_entropy", "liger": "liger_kernel"}
IGNORE = -100  # the ignore index both fused kernels use for padding targets


def kernel_problem(kernel: str, device: str = "cuda", bias: bool = False) -> str | None:
    """Why ``kernel`` cannot run on ``device`` ('cpu', 'cuda', ...) for an LM head with or without a
    ``bias``, or None when it can (a sentence that follows ``loss=<kernel>``)."""
    if kernel not in KERNELS:
        return f"is not a loss kernel: choose one of {list(KERNELS)}"
    if kernel == "cce" and bias:
        return "has no LM-head bias (this model's head has one, e.g. Phi-2): use loss=liger, chunked or auto"
    package = KERNELS[kernel]
    if package is None:
        return None
    if importlib.util.find_spec(package) is None:
        pip = {"cut_cross_entropy": "cut-cross-entropy", "liger_kernel": "liger-kernel"}[package]
        return f"needs the {pip} package (pip install 'lctw[gpu]')"
    if not device.startswith("cuda"):
        return f"is a Triton kernel that needs CUDA, not {device!r}: use loss=chunked or auto"
    return None


def check_loss(kernel: str, accelerator: str) -> None:
    """An explicitly chosen fused kernel must be installed and run on ``accelerator`` (the trainer's)."""
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    problem = kernel_problem(kernel, "cuda" if cuda else str(accelerator))
    if kernel != "auto" and problem:
        raise ValueError(f"loss={kernel} {problem}")


def resolve_kernel(kernel: str, device: str, bias: bool = False) -> str:
    """The kernel that runs: ``auto`` is the first installed fused kernel that can run on ``device`` for this
    head (CCE has no bias), else ``chunked``."""
    if kernel == "auto":
        return next((k for k in ("cce", "liger") if kernel_problem(k, device, bias) is None), "chunked")
    problem = kernel_problem(kernel, device, bias)
    if problem:
        raise ValueError(f"loss={kernel} {problem}")
    return kernel


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float32 for half/bf16/float32 inputs; float64 only if some input is float64."""
    is_double = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if is_double else torch.float32


def _safe_targets(targets: Tensor, vocab_size: int) -> Tensor:
    """Flattened int64 targets with out-of-range ids (e.g. the -100 padding id) replaced by 0.

    The log-prob returned for such rows is meaningless; the caller masks them (its upstream grad is 0).
    """
    targets = targets.reshape(-1).long()
    return targets.masked_fill((targets < 0) | (targets >= vocab_size), 0)


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log p(target | hidden) for rows of ``hidden`` (N, D), never holding more than one chunk of logits.

    Saves only the inputs and the per-row logsumexp (N floats), not the logits.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, chunk_size: int):
        dtype = _compute_dtype(hidden, weight, bias)
        n = hidden.shape[0]
        out = torch.empty(n, dtype=dtype, device=hidden.device)
        lse = torch.empty(n, dtype=dtype, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                logits = _logits(hidden[s:e].to(dtype), w, b)  # (c, V): the only large buffer
                target_logit = logits.gather(1, targets[s:e, None]).squeeze(1)
                # logsumexp in place, so no second (c, V) temporary is allocated.
                row_max = logits.amax(dim=1)
                logits.sub_(row_max[:, None]).exp_()
                lse[s:e] = row_max + logits.sum(dim=1).log()
                out[s:e] = target_logit - lse[s:e]
                del logits
        ctx.save_for_backward(hidden, weight, targets, bias, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        hidden, weight, targets, bias, lse = ctx.saved_tensors
        need_h, need_w, _, need_b, _ = ctx.needs_input_grad
        dtype = lse.dtype
        n = hidden.shape[0]
        g = grad_out.reshape(-1).to(dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            # Accumulate over chunks in the compute dtype even when weight is bf16: summing thousands of
            # per-chunk contributions in bf16 would lose most of the gradient's precision.
            grad_w = torch.zeros_like(w, dtype=dtype) if need_w else None
            grad_b = torch.zeros_like(b, dtype=dtype) if need_b else None
            for s in range(0, n, ctx.chunk_size):
                e = min(s + ctx.chunk_size, n)
                h = hidden[s:e].to(dtype)
                # Recompute the logits and turn them in place into dL/dlogits = g * (onehot - softmax).
                grad_logits = _logits(h, w, b)
                grad_logits.sub_(lse[s:e, None]).exp_().mul_(-g[s:e, None])
                grad_logits.scatter_add_(1, targets[s:e, None], g[s:e, None])
                if need_h:
                    grad_h[s:e] = grad_logits @ w  # cast to hidden's dtype on copy
                if need_w:
                    grad_w.addmm_(grad_logits.t(), h)
                if need_b:
                    grad_b += grad_logits.sum(dim=0)
                del grad_logits
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, None, grad_b, None


def _naive_token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None) -> Tensor:
    """Reference path: full (N, V) logits and log_softmax, differentiated by autograd."""
    dtype = _compute_dtype(hidden, weight, bias)
    with torch.autocast(hidden.device.type, enabled=False):
        logits = _logits(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
        return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def _fused_token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None,
                          kernel: str) -> Tensor:
    """log p(target) of rows ``hidden`` (M, D) through a fused CUDA kernel: minus its per-token loss."""
    targets = targets.masked_fill((targets < 0) | (targets >= weight.shape[0]), IGNORE)
    if kernel == "cce":
        from cut_cross_entropy import linear_cross_entropy

        options, dtype = _cce_exact(linear_cross_entropy, hidden.dtype)
        # Same dtype for both operands, as autocast would give a matmul; fp32 masters get their grad back.
        nll = linear_cross_entropy(hidden.to(dtype), weight.to(dtype), targets, ignore_index=IGNORE,
                                   reduction="none", filter_eps=None, **options)
    else:  # reduction="none" folds the per-token gradient in before the weight gradient from 0.8.5 on (pinned)
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        nll = liger_fused_linear_cross_entropy(hidden, weight.to(hidden.dtype), targets,
                                               None if bias is None else bias.to(hidden.dtype),
                                               ignore_index=IGNORE, reduction="none", accum_dtype=torch.float32)
    return -nll.float()


@functools.cache  # the installed release does not change: inspect it once, not at every chunk
def _cce_exact(linear_cross_entropy, dtype: torch.dtype) -> tuple[dict, torch.dtype]:
    """(options, operand dtype) that make CCE accumulate the hidden states' gradient exactly, by what the
    installed release offers: the Kahan-summed ``impl="cce_exact"``, or the fp32 accumulation flags, or
    (25.1.x, which has neither) fp32 operands, whose gradient buffer is then fp32 as well."""
    import inspect

    from cut_cross_entropy import LinearCrossEntropyImpl

    if "CCE_EXACT" in LinearCrossEntropyImpl.__members__:
        return {"impl": "cce_exact"}, dtype
    parameters = inspect.signature(linear_cross_entropy).parameters
    if "accum_e_fp32" in parameters:
        return {k: True for k in ("accum_e_fp32", "accum_c_fp32") if k in parameters}, dtype
    return {}, torch.float32


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    chunk_size: int | None = 1024,
    kernel: str = "chunked",
) -> Tensor:
    """Per-token ``log p(target | hidden)`` under the LM head ``logits = hidden @ weight.T + bias``.

    Args:
        hidden: (B, T, D) final hidden states, any float dtype (e.g. bf16).
        weight: (V, D) LM-head weight.
        targets: (B, T) int64 token ids. Ids outside [0, V) (e.g. -100 padding) are scored as id 0; the
            caller must mask those positions (see :func:`weighted_loss`).
        bias: optional (V,) LM-head bias.
        chunk_size: rows of the flattened B*T per chunk; peak extra memory is ~chunk_size * V floats.
            ``None`` selects the naive full-logits path (reference for tests and benchmarks).
        kernel: ``chunked`` (this module), ``cce`` or ``liger`` (fused CUDA kernels), or ``auto``
            (see :func:`resolve_kernel`); ``chunk_size`` only matters for ``chunked``.

    Returns:
        (B, T) float32 log-probabilities (float64 if the inputs are float64), differentiable w.r.t.
        ``hidden``, ``weight`` and ``bias``.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    batch_shape = hidden.shape[:-1]
    if targets.shape != batch_shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} != hidden.shape[:-1] {tuple(batch_shape)}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    kernel = resolve_kernel(kernel, hidden.device.type, bias is not None)
    if kernel != "chunked":
        out = _fused_token_logprobs(flat_hidden, weight, targets.reshape(-1).long(), bias, kernel)
        return out.reshape(batch_shape)
    flat_targets = _safe_targets(targets, weight.shape[0])
    if chunk_size is None:
        out = _naive_token_logprobs(flat_hidden, weight, flat_targets, bias)
    else:
        out = _ChunkedTokenLogprobs.apply(flat_hidden, weight, flat_targets, bias, chunk_size)
    return out.reshape(batch_shape)


def weighted_loss(logprobs: Tensor, weights: Tensor | None, mask: Tensor, reduction: str = "mean") -> Tensor:
    """Token-weighted NLL: ``sum(mask * w * -logprobs)``, divided by ``mask.sum()`` for ``reduction="mean"``.

    Args:
        logprobs: (B, T) log p(target), e.g. from :func:`token_logprobs`.
        weights: (B, T) per-token weights, or ``None`` for uniform weights (plain mean NLL). They are
            detached: weights are a fixed importance signal, not something to optimise, so no gradient
            flows into whatever computed them.
        mask: (B, T) bool or 0/1 tensor, true/1 for positions that count.
        reduction: ``mean`` over valid targets, or ``sum`` (the training step normalises a whole
            optimizer step's sum by its targets, :class:`lctw.training.module.TokenWeightingLM`).

    Masked positions are excluded with ``torch.where`` rather than only multiplied by 0, so a garbage value
    there (e.g. -inf log-prob of a padding target or a NaN weight) can't turn the loss or its gradient into
    NaN. The denominator is clamped to 1 so an all-masked batch gives 0 instead of NaN.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} is not allowed: choose one of ['mean', 'sum']")
    valid = mask != 0
    mask_f = mask.to(torch.float32)
    scale = mask_f  # per-token factor mask * w, zero (never NaN) at masked positions
    if weights is not None:
        scale = scale * torch.where(valid, weights.detach().to(torch.float32), 0.0)
    logprobs = torch.where(valid, logprobs.to(torch.float32), 0.0)
    total = -(scale * logprobs).sum()
    return total if reduction == "sum" else total / mask_f.sum().clamp(min=1.0)
