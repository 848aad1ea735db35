"""GPU smoke test and figures for one node: FSDP2, bf16 with fp32 masters, FlexAttention window scoring,
the LM-head loss kernels, and tokens/s/GPU and peak memory of a training step at 8k, 16k and 32k tokens.

Run it first on a new cluster or after an upgrade of torch, Lightning or transformers::

    python benchmarks/gpu_smoke.py --out gpu_smoke.json                       # one GPU, a 1B-shaped Llama
    torchrun --nproc_per_node 8 benchmarks/gpu_smoke.py --model meta-llama/Meta-Llama-3-8B --out gpu_smoke.json
    python benchmarks/gpu_smoke.py --hidden 2048 --layers 16 --vocab 128256 --lengths 8192 16384

``--model`` takes a hub id or a local directory (its config; the weights too with ``--weights``; timing
does not depend on the values, so random weights are the default). Without ``--model`` the model is a
Llama built from ``--hidden/--layers/--heads/--vocab``. On a machine without CUDA the script exits with
status 2 and says so; any failed check exits with status 1. ``--cpu-check`` runs the same code on the CPU
(gloo, a tiny model, the CPU's kernels): a test of this script, whose figures mean nothing. Every rank
builds its model on its GPU and shards it at once with lctw's own plan
(:func:`lctw.training.distributed.shard_model`, what ``trainer=fsdp`` runs).

Checks (each "ok" or "FAILED" with its numbers):

* ``fsdp2``: every decoder layer and the root are FSDP2 modules; the parameters are float32 DTensor shards;
* ``fp32_masters``: one AdamW step at lr 2e-5 under bf16 compute changes > 99% of the weights (pure bf16
  weights leave most of them unchanged: the update is below half a bf16 ulp);
* ``loss_kernels``: the chunked LM-head loss against full logits, and each installed fused kernel
  (cut-cross-entropy, Liger) against the chunked one: values and gradients, bf16 hidden states;
* ``flex_window``: window scoring with FlexAttention against the sdpa window kernel on the sharded θ.

Figures, for each length and for ``scorer=none``, ``self`` (window mode, FlexAttention) and ``frozen``
(θ0 sharded like θ, chunked mode as in the paper): median step time, tokens/s/GPU, peak memory, and the
step time relative to ``scorer=none``. A step is what ``TokenWeightingLM.training_step`` does (one sequence
per GPU), then backward and AdamW, with activation checkpointing unless ``--no-checkpointing``.

Out of memory: after every step the ranks agree, over a gloo group of their own, on which of them ran out
of memory, before any rank starts another collective; each rank going its own way would pair one rank's
all-gathers with another's next step and hang in NCCL until its timeout. The figure becomes an
``{"oom": true, "oom_ranks": [...]}`` row on every rank. Measuring goes on when the ranks' collectives
are known to be matched (one GPU, or some rank finished the step, so every collective of it completed);
when every rank ran out of memory they may have stopped at different collectives, so the remaining rows
are ``skipped``. A rank whose peers never reach the agreement (they wait in a collective of the failed
step) gives up after ``--oom-timeout`` seconds: it writes its report (rank 0 to ``--out``, rank r to
``<out stem>.rank<r>.json``) and exits with status 3 at once, and torchrun then stops the others.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda"  # "cpu" under --cpu-check


def sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="hub id or local dir (default: a Llama from the shape flags)")
    p.add_argument("--weights", action="store_true", help="load --model's weights (default: random init)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768], help="N (tokens per sequence)")
    p.add_argument("--n-ratio", type=int, default=4, help="n = N / this (default 4: 8k -> 32k)")
    p.add_argument("--scorers", default="none,self,frozen", help="comma-separated")
    p.add_argument("--steps", type=int, default=5, help="timed steps per length and scorer")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    p.add_argument("--loss", default="auto", help="the training loss kernel: auto | chunked | cce | liger")
    p.add_argument("--no-checkpointing", action="store_true", help="no activation checkpointing")
    p.add_argument("--out", default=None, help="write the results as JSON here (rank 0)")
    p.add_argument("--cpu-check", action="store_true", help="run this script's code on the CPU (tests it)")
    p.add_argument("--oom-timeout", type=float, default=300.0,
                   help="seconds a rank waits for the others to agree on an out-of-memory step before it gives up\n"
                        "(exit 3); more than one step takes, less than NCCL's 10-minute timeout")
    return p.parse_args(argv)


class PeersStuck(RuntimeError):
    """The other ranks did not reach the agreement after a step: they wait in one of its collectives."""

    def __init__(self, failed: bool, message: str):
        super().__init__(message)
        self.failed = failed  # whether this rank's own step ran out of memory


def setup_distributed(oom_timeout: float):
    """One process per GPU: torchrun's environment, or a single-rank group for a plain ``python`` run.

    Also returns a gloo group for agreeing on out-of-memory steps (``agree``): its messages never queue
    behind the step's NCCL kernels nor pair with its collectives, and its timeout is ``oom_timeout``.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo")
    control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=oom_timeout))
    return init_device_mesh(DEVICE, (dist.get_world_size(),)), dist.get_rank(), dist.get_world_size(), control


def agree(failed: bool, group) -> list[int]:
    """The ranks whose step ran out of memory, the same list on every rank (``PeersStuck`` on a timeout)."""
    import torch.distributed as dist

    flags: list = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(flags, bool(failed), group=group)
    except RuntimeError as e:  # gloo's timeout, or a peer that has exited
        raise PeersStuck(failed, f"no agreement: {e}") from e
    return [rank for rank, flag in enumerate(flags) if flag]


def recover(module) -> None:
    """After an out-of-memory step every rank agreed on: no gradients, no gathered parameters, no cache."""
    import torch
    from torch.distributed.fsdp import FSDPModule

    module.zero_grad(set_to_none=True)
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def build(args, max_len: int, seed: int):
    """θ in float32 on this rank's GPU (the fp32 masters), random init unless ``--weights``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    if args.model and args.weights:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, device_map=DEVICE)
    if args.model:
        config = AutoConfig.from_pretrained(args.model)
    else:
        config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                             num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                             intermediate_size=int(3.5 * args.hidden), tie_word_embeddings=False)
    config.max_position_embeddings = max(max_len, getattr(config, "max_position_embeddings", 0) or 0)
    config._attn_implementation = "sdpa"
    with torch.device(DEVICE):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def shard(model, mesh, checkpointing: bool):
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from lctw.training.distributed import shard_model

    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return shard_model(model, mesh, policy)


def check_fsdp2(model) -> dict:
    import torch
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from lctw.training.distributed import decoder_layers

    layers = decoder_layers(model)
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    ok = (isinstance(model, FSDPModule) and all(isinstance(m, FSDPModule) for m in layers)
          and all(isinstance(p, DTensor) for p in model.parameters()) and dtypes == [str(torch.float32)])
    return {"ok": ok, "decoder_layers": len(layers), "layer_class": type(layers[0]).__name__, "param_dtypes": dtypes}


def random_batch(vocab: int, length: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, length), generator=g)
    ids[:, 0] = 1
    return {"input_ids": ids.to(DEVICE), "mask": torch.ones(1, length - 1, dtype=torch.bool, device=DEVICE)}


def check_fp32_masters(module, batch) -> dict:
    """One optimizer step at the paper's lr: the fraction of this rank's weight elements that moved. The
    input embedding is left out: rows of tokens absent from the batch get no gradient at all."""
    import torch

    embedding = module.model.get_input_embeddings().weight
    params = [p for p in module.model.parameters() if p.requires_grad and p is not embedding]
    before = [p.detach().to_local().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=2e-5, betas=(0.9, 0.95), weight_decay=0.0)
    (module.training_step(batch, 0)["loss"] / batch["mask"].sum()).backward()  # Σ w·CE -> mean: no Trainer
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    changed = sum(int((p.detach().to_local() != b).sum()) for p, b in zip(params, before, strict=True))
    total = sum(b.numel() for b in before)
    return {"ok": changed / total > 0.99, "changed_fraction": changed / total}


# The LM-head kernels are checked at a realistic vocabulary whatever the smoke model's: CCE's bf16
# accumulation of the hidden states' gradient grows with V (relative L2 error 3.1e-2 at 32k, 5.6e-2 at 128k
# in an emulation) while exact accumulation stays near one bf16 rounding (1.7e-3 to 2.3e-3).
KERNEL_VOCAB = 128256
# Relative L2 error of a fused kernel's log-probs and gradients against the chunked fp32 path: above one
# bf16 rounding of the inputs, below what bf16 accumulation gives at 128k.
KERNEL_TOL = 1e-2


def check_loss_kernels(hidden: int, vocab: int, tokens: int = 8192) -> dict:
    """Chunked vs full logits, and each installed fused kernel vs chunked: relative L2 errors of the
    log-probs and of the gradients w.r.t. the hidden states and the head, at a vocabulary of at least
    :data:`KERNEL_VOCAB`. Tolerances: the chunked path reduces in fp32 like full logits (1e-3); the fused
    kernels multiply bf16 inputs (:data:`KERNEL_TOL`)."""
    import torch

    from lctw.method.kernels import kernel_problem, token_logprobs

    vocab = max(vocab, KERNEL_VOCAB)
    torch.manual_seed(0)
    h = (torch.randn(1, tokens, hidden, device=DEVICE) / hidden**0.5).bfloat16().requires_grad_()
    w = (torch.randn(vocab, hidden, device=DEVICE) * 0.02 * hidden**0.5).requires_grad_()
    t = torch.randint(0, vocab, (1, tokens), device=DEVICE)
    g = torch.rand(1, tokens, device=DEVICE)

    def run(kernel, chunk_size=4096):
        h.grad = w.grad = None
        sync()
        reset_peak()
        start = time.perf_counter()
        lp = token_logprobs(h, w, t, chunk_size=chunk_size, kernel=kernel)
        (lp * g).sum().backward()
        sync()
        return {"lp": lp.detach().float(), "dh": h.grad.float(), "dw": w.grad.float(),
                "ms": 1e3 * (time.perf_counter() - start), "peak_gib": peak_gib()}

    def compare(ref, other, tol):
        diff = {k: float((ref[k] - other[k]).norm() / ref[k].norm().clamp_min(1e-12)) for k in ("lp", "dh", "dw")}
        return {"rel_l2_error": diff, "ok": all(v < tol for v in diff.values()), "ms": other["ms"],
                "peak_gib": other["peak_gib"]}

    run("chunked")  # warm-up
    chunked, full = run("chunked"), run("chunked", chunk_size=None)
    out = {"tokens": tokens, "hidden": hidden, "vocab": vocab, "chunked_vs_full": compare(full, chunked, 1e-3)}
    out["chunked_vs_full"].update(full_ms=full["ms"], full_peak_gib=full["peak_gib"])
    for kernel in ("cce", "liger"):
        problem = kernel_problem(kernel, DEVICE)
        if problem:
            out[kernel] = {"skipped": problem}
            continue
        run(kernel)
        out[kernel] = compare(chunked, run(kernel), KERNEL_TOL)
    out["ok"] = all(v.get("ok", True) for v in out.values() if isinstance(v, dict))
    return out


def check_flex_window(model, vocab: int, length: int = 4096, n: int = 1024) -> dict:
    """Window scoring (every target sees exactly its last n tokens) with FlexAttention vs the sdpa kernel.
    Both run bf16 attention; they differ by summation order only (max |Δ log p| well under 0.05 nats)."""

    from lctw.method.scoring import ShortContext

    ids = random_batch(vocab, length, 1)["input_ids"]
    out = {}
    for kernel in ("flex", "sdpa"):
        short = ShortContext(n, length, mode="window", attention=kernel)
        short.logprobs(model, ids)
        sync()
        start = time.perf_counter()
        out[kernel] = short.logprobs(model, ids)
        sync()
        out[f"{kernel}_ms"] = 1e3 * (time.perf_counter() - start)
    diff = float((out.pop("flex") - out.pop("sdpa")).abs().nan_to_num(0).max())
    return {"ok": diff < 0.05, "max_abs_diff_nats": diff, "length": length, "n": n, **out}


def time_steps(module, batch, optimizer, steps: int, warmup: int, control) -> dict:
    """Median step time, tokens/s/GPU and peak memory, or ``{"oom": True, "oom_ranks": [...]}`` when a rank
    ran out of memory in a step (agreed on by every rank before the next step's collectives)."""
    import torch

    reset_peak()
    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        failed = False
        try:
            optimizer.zero_grad(set_to_none=True)
            (module.training_step(batch, i)["loss"] / batch["mask"].sum()).backward()
            optimizer.step()
            sync()
        except torch.OutOfMemoryError:
            failed = True
        elapsed = time.perf_counter() - start
        oom_ranks = agree(failed, control)
        if oom_ranks:
            return {"oom": True, "oom_ranks": oom_ranks}
        if i >= warmup:
            times.append(elapsed)
    med = statistics.median(times)
    length = batch["input_ids"].shape[1]
    return {"median_s": med, "tokens_per_s_per_gpu": length / med,
            "peak_gib": peak_gib()}


def main(argv=None) -> int:
    global DEVICE
    args = parse(argv)
    import torch

    if args.cpu_check:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("gpu_smoke.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine. The CPU paths "
              "are covered by the test suite (make test); run this script on a GPU node.", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO_ROOT))
    import warnings

    import torch.distributed as dist

    from lctw.method.scorers import FrozenScorer, NoScorer, SelfScorer
    from lctw.method.weighting import Dense, Uniform
    from lctw.training.module import TokenWeightingLM

    warnings.filterwarnings("ignore")  # self.log() outside a Trainer warns once per call site
    mesh, rank, world, control = setup_distributed(args.oom_timeout)
    max_len = max(args.lengths)
    theta = shard(build(args, max_len, seed=0).train(), mesh, not args.no_checkpointing)
    vocab = theta.config.vocab_size
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    report = {"setup": {"gpus": world, "gpu": gpu, "torch": torch.__version__,
                        "model": args.model or "llama (from config)", "weights": args.weights,
                        "params": sum(p.numel() for p in theta.parameters()), "loss": args.loss,
                        "activation_checkpointing": not args.no_checkpointing},
              "checks": {}, "figures": []}
    checks = report["checks"]
    checks["fsdp2"] = check_fsdp2(theta)
    n0 = min(args.lengths) // args.n_ratio
    uniform = TokenWeightingLM(theta, NoScorer(n0, min(args.lengths)), Uniform(), n=n0, loss=args.loss)
    checks["fp32_masters"] = check_fp32_masters(uniform, random_batch(vocab, 1024, 0))
    checks["loss_kernels"] = check_loss_kernels(theta.config.hidden_size, vocab, min(8192, max_len))
    checks["flex_window"] = check_flex_window(theta, vocab, min(4096, max_len), min(1024, max_len // 4))
    theta0 = None
    if "frozen" in args.scorers:  # θ0: the same initial weights, sharded the same way, never trained
        theta0 = shard(build(args, max_len, seed=0).eval().requires_grad_(False), mesh, False)
    optimizer = torch.optim.AdamW([p for p in theta.parameters() if p.requires_grad], lr=1e-7)
    stopped = None  # why the remaining figures are skipped
    for length in args.lengths:
        n = length // args.n_ratio
        scorers = {"none": (NoScorer(n, length), Uniform()),
                   "self": (SelfScorer(n, length, mode="window", attention="auto"), Dense(0.75)),
                   "frozen": (FrozenScorer(n, length).use(theta0) if theta0 is not None else None, Dense(0.75))}
        batch = random_batch(vocab, length, 2)
        base = None
        for name in args.scorers.split(","):
            where = {"N": length, "n": n, "scorer": name}
            if stopped:
                report["figures"].append({**where, "skipped": stopped})
                continue
            scorer, weighting = scorers[name]
            module = TokenWeightingLM(theta, scorer, weighting, n=n, loss=args.loss)
            try:
                row = time_steps(module, batch, optimizer, args.steps, args.warmup, control)
            except PeersStuck as e:
                report["figures"].append({**where, "oom": e.failed, "oom_ranks": [rank] if e.failed else [],
                                          "agreement": str(e)})
                give_up(report, rank, world, args)
            if row.get("oom"):
                if world > 1 and len(row["oom_ranks"]) == world:
                    stopped = (f"every rank ran out of memory at N={length}, scorer={name}, possibly at different "
                               "collectives; measure the rest in a separate run (--lengths, --scorers)")
                else:
                    recover(module)
            base = row if name == "none" else base
            if base and "median_s" in row and "median_s" in base:
                row["vs_none"] = row["median_s"] / base["median_s"]
            report["figures"].append({**where, **row})
    if rank == 0:
        print_report(report)
        write_report(report, args.out)
    if not stopped:  # NCCL's teardown could wait on a collective that some rank never issued
        dist.destroy_process_group()
    return 0 if all(c["ok"] for c in checks.values()) else 1


def print_report(report: dict) -> None:
    print(json.dumps(report["setup"]))
    for name, result in report["checks"].items():
        print(f"{name:<14}{'ok' if result['ok'] else 'FAILED'}  {json.dumps(result)}")
    print(f"{'N':>6} {'n':>6} {'scorer':<8}{'step s':>9}{'tok/s/GPU':>11}{'peak GiB':>10}{'vs none':>9}")
    for f in report["figures"]:
        if "median_s" not in f:
            status = [f"out of memory on rank(s) {f['oom_ranks']}"] if f.get("oom") else []
            status += ["the other ranks did not agree"] if "agreement" in f else []
            status += [f"skipped: {f['skipped']}"] if "skipped" in f else []
            print(f"{f['N']:>6} {f['n']:>6} {f['scorer']:<8}  {'; '.join(status)}")
        else:
            print(f"{f['N']:>6} {f['n']:>6} {f['scorer']:<8}{f['median_s']:>9.3f}{f['tokens_per_s_per_gpu']:>11.0f}"
                  f"{f['peak_gib']:>10.1f}{f.get('vs_none', 1.0):>9.3f}")


def write_report(report: dict, out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))


def give_up(report: dict, rank: int, world: int, args) -> None:
    """The other ranks wait in a collective this rank will never join: write what this rank has and exit
    at once (status 3) without tearing down the process group, which could wait on that collective too;
    torchrun stops the other ranks when one exits with an error."""
    f = report["figures"][-1]
    what = "out of memory" if f["oom"] else "waiting for the others"
    print(f"rank {rank}/{world}: {what} at N={f['N']}, scorer={f['scorer']}; the other ranks did not "
          f"reach the agreement within --oom-timeout={args.oom_timeout:g} s (they wait in a collective of the "
          "failed step): exiting with status 3", file=sys.stderr, flush=True)
    print_report(report)
    out = args.out if rank == 0 or not args.out else str(Path(args.out).with_suffix(f".rank{rank}.json"))
    write_report(report, out)
    sys.stdout.flush()
    os._exit(3)


if __name__ == "__main__":
    sys.exit(main())
