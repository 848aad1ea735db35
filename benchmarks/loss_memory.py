"""Peak memory and time of the LM head + weighted loss (forward + backward): naive vs chunked log-probs.

Each variant runs in a fresh interpreter (``--worker``) so that neither the other variant nor this parent
process can leak into its memory high-water mark. Usage::

    python benchmarks/loss_memory.py --T 8192 --V 32768 --D 256 --chunk-size 1024 --repeats 3 \
        --out results.json

How peak memory is measured on the CPU: torch's CPU allocator keeps no peak statistics (there is no
counterpart of ``torch.cuda.max_memory_allocated``), so we read the kernel's resident-set high-water mark
``VmHWM`` from ``/proc/self/status`` (Linux only). Before the measured step the worker resets it to the
current RSS by writing ``5`` to ``/proc/self/clear_refs``; peak extra memory = VmHWM after the step minus
VmRSS before it. We do not use ``getrusage(RUSAGE_SELF).ru_maxrss``: it cannot be reset, and a child
started by ``subprocess`` (vfork + exec) inherits the parent's high-water mark, so a worker launched from
a big process (e.g. pytest with torch loaded) reports the parent's peak and hides its own. The workers run
with ``MALLOC_MMAP_THRESHOLD_`` = 1 MiB so every sizeable tensor is mmap'ed and unmapped on free; RSS then
tracks live tensor bytes instead of glibc arena fragmentation. All tensors involved are written in full,
so their pages are resident while alive.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("naive", "chunked")
MIB = 2**20


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the RSS high-water mark to the current RSS; return the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_kib("VmRSS") * 1024


def _peak_rss() -> int:
    return _proc_status_kib("VmHWM") * 1024


def run_worker(args: argparse.Namespace) -> dict:
    """Time and measure forward + backward of one variant in this (fresh) process."""
    sys.path.insert(0, str(REPO_ROOT))  # this checkout's lctw, even if another one is pip-installed
    import torch

    from lctw.method.kernels import token_logprobs, weighted_loss

    chunk_size = None if args.worker == "naive" else args.chunk_size
    dtype = getattr(torch, args.dtype)

    def make_inputs(T: int):
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(args.B, T, args.D, generator=g).to(dtype).requires_grad_()
        weight = (torch.randn(args.V, args.D, generator=g) / args.D**0.5).to(dtype).requires_grad_()
        targets = torch.randint(0, args.V, (args.B, T), generator=g)
        targets[:, -max(1, T // 20) :] = -100  # some padding the loss masks out
        weights = torch.rand(args.B, T, generator=g) * 2
        return hidden, weight, targets, weights

    def step(hidden, weight, targets, weights) -> float:
        hidden.grad = weight.grad = None
        start = time.perf_counter()
        logprobs = token_logprobs(hidden, weight, targets, chunk_size=chunk_size)
        weighted_loss(logprobs, weights, targets != -100).backward()
        return time.perf_counter() - start

    step(*make_inputs(64))  # warm-up: lazily initialised kernels and thread pools
    inputs = make_inputs(args.T)
    peak = 0
    times = []
    for _ in range(args.repeats):
        base = _reset_peak_rss()
        times.append(step(*inputs))
        peak = max(peak, _peak_rss() - base)
    return {
        "variant": args.worker,
        "peak_bytes": peak,
        "times_s": times,
        "median_s": statistics.median(times),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    """Run one variant in a fresh interpreter and return its result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant]
    for name in ("B", "T", "V", "D", "chunk_size", "repeats", "dtype"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MIB)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} worker failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--B", type=int, default=1, help="batch size (rows = B*T)")
    p.add_argument("--T", type=int, default=8192, help="sequence length")
    p.add_argument("--V", type=int, default=32768, help="vocabulary size")
    p.add_argument("--D", type=int, default=256, help="hidden size")
    p.add_argument("--chunk-size", type=int, default=1024, help="rows per chunk of the chunked path")
    p.add_argument("--repeats", type=int, default=3, help="timed forward+backward runs per variant")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="input dtype")
    p.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return None
    if not os.path.exists("/proc/self/clear_refs"):
        sys.exit("needs Linux /proc (VmHWM, clear_refs) to measure CPU peak memory")

    results = {v: run_variant(v, args) for v in VARIANTS}
    naive, chunked = results["naive"], results["chunked"]
    logits_bytes = args.B * args.T * args.V * 4
    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "worker")},
        "env": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "full_logits_fp32_bytes": logits_bytes,
        "chunk_logits_fp32_bytes": args.chunk_size * args.V * 4,
        "results": results,
        "peak_ratio_chunked_over_naive": chunked["peak_bytes"] / naive["peak_bytes"],
        "time_ratio_chunked_over_naive": chunked["median_s"] / naive["median_s"],
    }

    print(
        f"B={args.B} T={args.T} V={args.V} D={args.D} chunk={args.chunk_size} dtype={args.dtype} "
        f"repeats={args.repeats}; one full fp32 logits tensor = {logits_bytes / MIB:.0f} MiB"
    )
    print(f"{'variant':<10}{'peak MiB':>12}{'peak / logits':>15}{'median s':>11}")
    for v, r in results.items():
        peak = r["peak_bytes"]
        print(f"{v:<10}{peak / MIB:>12.1f}{peak / logits_bytes:>15.2f}{r['median_s']:>11.3f}")
    ratio = report["peak_ratio_chunked_over_naive"]
    print(
        f"chunked/naive: peak {ratio:.3f} (target <= 0.25: {'OK' if ratio <= 0.25 else 'MISSED'}), "
        f"time {report['time_ratio_chunked_over_naive']:.2f}x"
    )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
