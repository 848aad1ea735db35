"""Tests for lctw.method.kernels: chunked LM-head log-probs match the naive path, the weighted loss, and peak memory."""

from __future__ import annotations

import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lctw.method.kernels import token_logprobs, weighted_loss

REPO_ROOT = Path(__file__).resolve().parents[1]

# Tolerances. Both paths compute the same float32 math and differ only in summation order (logsumexp over V,
# the grad_weight reduction over rows split into chunks, BLAS blocking for different matrix shapes). Such
# reordering errors are O(sqrt(n) * eps32) relative to the magnitudes summed, eps32 = 1.2e-7; we observe
# <= 1e-6 relative to each tensor's max. FP32_RTOL = 1e-5 leaves a 10x margin while any real bug (missing
# upstream grad, wrong sign, dropped or double-counted chunk) gives O(1) relative errors. atol is scaled to
# the tensor's max magnitude because near-zero entries (e.g. cancelling gradient sums) carry absolute,
# not relative, rounding error.
FP32_RTOL = 1e-5
# bf16 inputs: both paths still compute in float32 (log-probs keep FP32_RTOL) but return gradients in bf16.
# The final rounding of two nearly equal float32 values can land on neighbouring bf16 numbers: one bf16 ulp
# is up to 2**-7 = 7.8e-3 relative, so allow 2 ulp (torch's own bf16 default rtol).
BF16_RTOL = 1.6e-2


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    atol = rtol * expected.detach().abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def make_inputs(B, T, D, V, dtype=torch.float32, bias=True, n_masked=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g) / D**0.5 * 3).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[:, :n_masked] = -100  # padding / prompt positions the caller masks out
    weights = torch.rand(B, T, generator=g) * 2
    return hidden, weight, b, targets, weights, targets != -100


def forward_backward(hidden, weight, bias, targets, weights, mask, chunk_size):
    """Log-probs and grads of the weighted loss w.r.t. (hidden, weight[, bias])."""
    logprobs = token_logprobs(hidden, weight, targets, bias, chunk_size=chunk_size)
    loss = weighted_loss(logprobs, weights, mask)
    params = [hidden, weight] + ([bias] if bias is not None else [])
    return logprobs, torch.autograd.grad(loss, params)


@pytest.mark.parametrize(
    "B, T, D, V, chunk_size, bias",
    [
        (1, 37, 16, 50, 8, True),  # T not divisible by the chunk
        (3, 100, 32, 257, 64, True),  # B > 1: chunks straddle sequence boundaries
        (2, 64, 16, 100, 32, False),  # no bias, chunk divides B*T exactly
        (2, 10, 8, 30, 1000, True),  # one chunk larger than B*T
        (1, 9, 8, 30, 1, True),  # one row per chunk
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_matches_naive(B, T, D, V, chunk_size, bias, dtype):
    inputs = make_inputs(B, T, D, V, dtype=dtype, bias=bias)
    lp_naive, grads_naive = forward_backward(*inputs, chunk_size=None)
    lp_chunk, grads_chunk = forward_backward(*inputs, chunk_size=chunk_size)

    assert lp_chunk.shape == (B, T) and lp_chunk.dtype == torch.float32
    assert_close_scaled(lp_chunk, lp_naive, FP32_RTOL)  # computed in float32 whatever the input dtype
    grad_rtol = FP32_RTOL if dtype == torch.float32 else BF16_RTOL
    params = [p for p in inputs[:3] if p is not None]
    for g_chunk, g_naive, param in zip(grads_chunk, grads_naive, params, strict=True):
        assert g_chunk.dtype == param.dtype and g_chunk.shape == param.shape
        assert_close_scaled(g_chunk, g_naive, grad_rtol)
    # Masked rows get exactly zero gradient w.r.t. hidden.
    assert torch.all(grads_chunk[0][~inputs[5]] == 0)


def test_naive_path_is_log_softmax():
    hidden, weight, bias, targets, _, mask = make_inputs(2, 20, 8, 40)
    expected = torch.log_softmax(hidden @ weight.T + bias, dim=-1)
    expected = expected.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    for chunk_size in (None, 7):
        lp = token_logprobs(hidden, weight, targets, bias, chunk_size=chunk_size)
        assert_close_scaled(lp[mask], expected[mask], FP32_RTOL)


def test_chunked_gradcheck_float64():
    """The hand-written backward against finite differences (inputs in float64 -> computed in float64)."""
    hidden, weight, bias, targets, _, _ = make_inputs(2, 7, 5, 11, dtype=torch.float64, n_masked=1)
    fn = lambda h, w, b: token_logprobs(h, w, targets, b, chunk_size=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_weighted_loss_hand_worked():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -4.0]], requires_grad=True)
    weights = torch.tensor([[2.0, 1.0, 0.5, 3.0]])
    mask = torch.tensor([[True, True, True, False]])
    # (2*1 + 1*2 + 0.5*3) / 3 = 5.5 / 3; the masked 4th token contributes nothing.
    loss = weighted_loss(logprobs, weights, mask)
    torch.testing.assert_close(loss, torch.tensor(5.5 / 3))
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-2.0, -1.0, -0.5, 0.0]]) / 3)
    # Uniform weights: (1 + 2 + 3) / 3 = 2; a 0/1 float mask behaves like the bool mask.
    torch.testing.assert_close(weighted_loss(logprobs, None, mask), torch.tensor(2.0))
    torch.testing.assert_close(weighted_loss(logprobs, None, mask.float()), torch.tensor(2.0))


def test_weighted_loss_ignores_garbage_at_masked_positions():
    logprobs = torch.tensor([[-1.0, -float("inf"), float("nan")]], requires_grad=True)
    weights = torch.tensor([[1.0, float("nan"), 2.0]])
    mask = torch.tensor([[True, False, False]])
    loss = weighted_loss(logprobs, weights, mask)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(1.0))
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.0, 0.0, 0.0]]))
    # All-masked batch: 0, not NaN.
    assert weighted_loss(logprobs, weights, torch.zeros_like(mask)).item() == 0.0


def test_weights_carry_no_gradient():
    hidden, weight, bias, targets, weights, mask = make_inputs(2, 16, 8, 32)
    weights.requires_grad_()
    loss = weighted_loss(token_logprobs(hidden, weight, targets, bias, chunk_size=5), weights * 1.0, mask)
    loss.backward()
    assert weights.grad is None
    assert hidden.grad is not None and weight.grad is not None


@pytest.mark.parametrize("chunk_size", [None, 6])
def test_uniform_weights_equal_cross_entropy(chunk_size):
    hidden, weight, bias, targets, _, mask = make_inputs(2, 25, 8, 40)
    logprobs = token_logprobs(hidden, weight, targets, bias, chunk_size=chunk_size)
    expected = F.cross_entropy((hidden @ weight.T + bias).flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert_close_scaled(weighted_loss(logprobs, torch.ones_like(logprobs), mask), expected, FP32_RTOL)
    assert_close_scaled(weighted_loss(logprobs, None, mask), expected, FP32_RTOL)


def _load_benchmark():
    """benchmarks/loss_memory.py holds the (subtle) peak-memory measurement; reuse it rather than copy it."""
    spec = importlib.util.spec_from_file_location("loss_memory", REPO_ROOT / "benchmarks" / "loss_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS via Linux /proc only")
def test_chunked_peak_memory_far_below_naive():
    """Peak extra memory of forward+backward, each variant in a fresh process (see the benchmark's docstring:
    VmHWM reset via /proc/self/clear_refs; ru_maxrss would inherit this pytest process's high-water mark)."""
    bench = _load_benchmark()
    T, V, chunk = 2048, 16384, 256  # about a second of compute per variant
    args = bench.parse_args(
        ["--T", str(T), "--V", str(V), "--D", "64", "--chunk-size", str(chunk), "--repeats", "1"]
    )
    # The two workers only need to be isolated from each other, not serialised: run them concurrently.
    with ThreadPoolExecutor(max_workers=2) as pool:
        naive, chunked = pool.map(lambda v: bench.run_variant(v, args)["peak_bytes"], ["naive", "chunked"])
    logits_bytes = T * V * 4  # 128 MiB: one full float32 logits tensor
    # Sanity check of the measurement itself: the naive path holds >= 2 (in practice 3) T x V buffers at once.
    assert naive >= 2 * logits_bytes, f"naive peak {naive / 2**20:.0f} MiB: measurement not capturing"
    # Chunked holds ~one (chunk, V) buffer (16 MiB) plus O(V*D); any full T x V tensor kept alive (e.g. logits
    # saved for backward) would break both bounds.
    assert chunked < 0.25 * naive, f"chunked {chunked / 2**20:.0f} MiB vs naive {naive / 2**20:.0f} MiB"
    assert chunked < 0.5 * logits_bytes


# ---- the loss option: chunked here, fused Triton kernels on CUDA -------------------------------------------


def test_auto_kernel_is_chunked_without_cuda():
    from lctw.method.kernels import resolve_kernel

    assert resolve_kernel("auto", "cpu") == "chunked"
    assert resolve_kernel("chunked", "cpu") == "chunked"
    h, w = torch.randn(2, 5, 8, requires_grad=True), torch.randn(11, 8)
    t = torch.randint(0, 11, (2, 5))
    torch.testing.assert_close(token_logprobs(h, w, t, kernel="auto"), token_logprobs(h, w, t, kernel="chunked"))


@pytest.mark.parametrize("kernel,package", [("cce", "cut_cross_entropy"), ("liger", "liger_kernel")])
def test_fused_kernel_on_cpu_is_an_error_not_a_fallback(kernel, package):
    from lctw.method.kernels import resolve_kernel

    expected = "needs the" if importlib.util.find_spec(package) is None else "needs CUDA"
    with pytest.raises(ValueError, match=rf"loss={kernel} .*{expected}"):
        resolve_kernel(kernel, "cpu")
    with pytest.raises(ValueError, match="not a loss kernel: choose one of"):
        resolve_kernel("fused", "cpu")


def test_auto_never_picks_cce_for_a_head_with_a_bias():
    from lctw.method.kernels import kernel_problem

    assert "no LM-head bias" in kernel_problem("cce", "cuda", bias=True)
    assert kernel_problem("chunked", "cpu", bias=True) is None


def test_fused_kernel_on_cpu_trainer_is_a_config_error(hydra_conf):
    from lctw.config import ConfigError, validate
    from tests.conftest import compose

    with pytest.raises(ConfigError, match=r"^loss=cce (needs the cut-cross-entropy package|is a Triton kernel)"):
        validate(compose(["loss=cce", "trainer=cpu"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernels are Triton kernels: CUDA only")
@pytest.mark.parametrize("kernel", ["cce", "liger"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernel_matches_chunked_on_cuda(kernel, dtype):
    """Values and gradients of a fused kernel against the chunked path, fp32 masters with bf16 or fp32
    hidden states. Tolerance: both reduce in fp32, so they differ by summation order (fp32) or by the
    kernel's bf16 matmul inputs (bf16: ~1e-2 relative, the bf16 epsilon times sqrt(D))."""
    from lctw.method.kernels import kernel_problem

    if kernel_problem(kernel, "cuda"):
        pytest.skip(kernel_problem(kernel, "cuda"))
    torch.manual_seed(0)
    B, T, D, V = 2, 512, 256, 4096
    h = (torch.randn(B, T, D, device="cuda") / D**0.5).to(dtype).requires_grad_()
    w = (torch.randn(V, D, device="cuda") * 0.5).requires_grad_()
    t = torch.randint(0, V, (B, T), device="cuda")
    t[0, :3] = -100
    g = torch.rand(B, T, device="cuda")
    out = {}
    for k in ("chunked", kernel):
        h.grad = w.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            lp = token_logprobs(h, w, t, chunk_size=256, kernel=k)
        (lp * g).masked_fill(t < 0, 0).sum().backward()
        out[k] = (lp.detach().masked_fill(t < 0, 0), h.grad.clone(), w.grad.clone())
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    for a, b in zip(out["chunked"], out[kernel], strict=True):
        torch.testing.assert_close(b.float(), a.float(), **tol)



def _fake_cce(monkeypatch, members: tuple[str, ...], flags: tuple[str, ...] = ()):
    """A stand-in ``cut_cross_entropy`` with the given API (impl enum members, accumulation flags) that
    records how it was called and computes the true per-token NLL, so the call is testable on the CPU."""
    import enum
    import inspect
    import sys
    import types

    calls = []

    def linear_cross_entropy(e, c, targets, ignore_index=-100, softcap=None, reduction="mean", shift=False,
                             filter_eps="high", impl="cce", **extra):
        calls.append({"dtype": e.dtype, "c_dtype": c.dtype, "impl": impl, "filter_eps": filter_eps, **extra})
        logits = e.float() @ c.float().T
        nll = torch.logsumexp(logits, -1) - logits.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
        return nll.masked_fill(targets == ignore_index, 0)

    params = list(inspect.signature(linear_cross_entropy).parameters.values())
    params = [p for p in params if p.kind != p.VAR_KEYWORD]
    params += [inspect.Parameter(f, inspect.Parameter.KEYWORD_ONLY, default=False) for f in flags]
    linear_cross_entropy.__signature__ = inspect.Signature(params)
    module = types.ModuleType("cut_cross_entropy")
    module.linear_cross_entropy = linear_cross_entropy
    module.LinearCrossEntropyImpl = enum.IntEnum("LinearCrossEntropyImpl", members)
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", module)
    return calls


@pytest.mark.parametrize("members, flags, expected", [
    (("CCE", "TORCH_COMPILE", "CCE_EXACT"), (), {"impl": "cce_exact", "dtype": torch.bfloat16}),
    (("CCE", "TORCH_COMPILE"), ("accum_e_fp32", "accum_c_fp32"),
     {"accum_e_fp32": True, "accum_c_fp32": True, "dtype": torch.bfloat16}),
    (("CCE", "TORCH_COMPILE"), (), {"impl": "cce", "dtype": torch.float32, "c_dtype": torch.float32}),  # 25.1.x
])
def test_cce_is_called_with_exact_gradient_accumulation(monkeypatch, members, flags, expected):
    """CCE's default accumulates the hidden states' gradient in bf16 (a 5.6e-2 relative error at V = 128k):
    whatever the installed release offers for exact accumulation is used, or fp32 operands where it offers
    none. The values stay the per-token log-probs."""
    from lctw.method.kernels import _fused_token_logprobs

    calls = _fake_cce(monkeypatch, members, flags)
    torch.manual_seed(0)
    h, w = torch.randn(6, 8).to(torch.bfloat16), torch.randn(16, 8)
    t = torch.tensor([1, 2, 3, -100, 5, 15])
    lp = _fused_token_logprobs(h, w, t, None, "cce")
    (call,) = calls
    assert call["filter_eps"] is None
    assert {k: call[k] for k in expected} == expected
    ref = torch.log_softmax(h.to(call["dtype"]).float() @ w.to(call["dtype"]).float().T, -1)
    torch.testing.assert_close(lp[t >= 0], ref[t >= 0].gather(-1, t[t >= 0][:, None])[:, 0])
