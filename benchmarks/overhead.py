"""Training-step overhead of token weighting: step time with each scorer / step time with ``scorer=none``.

All variants run side by side in one process on the same θ (one shared model and optimizer: the values of
the weights do not change the time of a step), interleaved in a shuffled order every round, after warm-up
rounds; we report the median step time of each variant, the ratio of medians to ``none`` and the median of
the per-round paired ratios (robust to a machine whose speed drifts while the benchmark runs). A timed step
is what a training step costs: fetch the rows from an on-disk Arrow dataset and collate them (the cached
variant also reads its ``short_logprobs`` column and verifies the row checksums), forward, weighting,
loss, backward, AdamW step. Variants and targets::

    cache          precomputed θ0 scores read with the batch (lctw.cache)      target <= 1.05
    self-chunked   θ itself at context n, chunked windows                      target <= 1.35
    self-window    θ itself at context n, one sliding-window pass              target <= 1.35
    self-in-range  the same with the in-range sink (scorer.sink=in_range)      target <= 1.35
    small          a separate model of about 1/4 the parameters                 target <= 1.15
    frozen         θ0 in memory (reference)

Usage (CPU, the tiny model's size)::

    python benchmarks/overhead.py --threads 2 --T 1024 --n 256 --repeats 20 --out overhead.json
    python benchmarks/overhead.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16 --vocab 32000 \
        --T 8192 --n 2048

Models are built from config with random weights (no download): timing does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"cache": 1.05, "self-chunked": 1.35, "self-window": 1.35, "self-in-range": 1.35, "small": 1.15,
           "frozen": None}


def build_llama(vocab, hidden, layers, heads, kv_heads, intermediate, max_pos, dtype, device, seed):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=max_pos,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Device and model-shape options shared by the benchmarks (scoring_throughput.py uses them too)."""
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 (default float32)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; default: torch's)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_model_args(p)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--intermediate", type=int, default=None, help="default: 2.75 x hidden")
    p.add_argument("--small-hidden", type=int, default=None, help="small scorer width (default hidden/2)")
    p.add_argument("--small-layers", type=int, default=None, help="small scorer layers (default layers/2)")
    p.add_argument("--T", type=int, default=1024, help="sequence length N (default 1024)")
    p.add_argument("--n", type=int, default=None, help="short context (default T/4)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--chunk-size", type=int, default=1024, help="LM-head rows per chunk in the loss")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds (default 3)")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds (default 15)")
    p.add_argument("--attention", default="auto", help="window kernel: auto | flex | sdpa | dense (default auto)")
    p.add_argument("--variants", default=",".join(["none", *TARGETS]), help="comma-separated")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    sys.path.insert(0, str(REPO_ROOT))
    sys.path.insert(0, str(REPO_ROOT / "tests"))  # the frozen-copy helper of the tests
    import datasets
    import torch
    from oracles import frozen_copy

    from lctw.cache.scorer import CachedScorer
    from lctw.cache.store import SHORT, row_checksum
    from lctw.data import collate
    from lctw.method.attention import resolve_attention
    from lctw.method.scorers import NoScorer, SelfScorer, SmallScorer
    from lctw.method.weighting import Dense, Uniform
    from lctw.training.module import TokenWeightingLM

    warnings.filterwarnings("ignore")  # self.log() outside a Trainer warns once per call site
    datasets.disable_progress_bars()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    t, n = args.T, args.n or args.T // 4
    h, layers = args.hidden, args.layers
    kv, inter = args.kv_heads or args.heads, args.intermediate or int(2.75 * args.hidden)
    theta = build_llama(args.vocab, h, layers, args.heads, kv, inter, t, dtype, device, 0).train()
    sh, sl = args.small_hidden or h // 2, args.small_layers or max(1, layers // 2)
    small = build_llama(args.vocab, sh, sl, max(1, args.heads // 2), max(1, kv // 2), int(2.75 * sh), t, dtype,
                        device, 1).eval().requires_grad_(False)

    # rows on disk, read like training reads them; the cached variant's column holds θ0's real scores
    g = torch.Generator().manual_seed(0)
    rows = args.batch * 8
    ids = torch.randint(3, args.vocab, (rows, t), generator=g)
    ids[:, 0] = 1
    frozen_ref = frozen_copy(theta, n, t)
    with torch.no_grad():
        short = torch.cat([frozen_ref(None, {"input_ids": ids[i : i + 1].to(device)}, None).cpu()
                           for i in range(rows)])
    tmp = tempfile.mkdtemp(prefix="lctw-overhead-")
    plain = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "length": [t] * rows})
    plain.save_to_disk(f"{tmp}/plain")
    scored = plain.add_column(SHORT, short.tolist()).add_column("checksum", row_checksum(ids).tolist())
    scored.save_to_disk(f"{tmp}/scored")
    sets = {"plain": datasets.load_from_disk(f"{tmp}/plain").with_format("torch"),
            "scored": datasets.load_from_disk(f"{tmp}/scored").with_format("torch")}

    small_scorer = SmallScorer(None, n, t).use(small)
    scorers = {
        "none": (NoScorer(n, t), Uniform(), "plain"),
        "cache": (CachedScorer(frozen_ref, Path(tmp) / "scored"), Dense(0.75), "scored"),
        "self-chunked": (SelfScorer(n, t, mode="chunked"), Dense(0.75), "plain"),
        "self-window": (SelfScorer(n, t, mode="window", attention=args.attention), Dense(0.75), "plain"),
        "self-in-range": (SelfScorer(n, t, mode="window", sink="in_range", attention=args.attention), Dense(0.75),
                          "plain"),
        "small": (small_scorer, Dense(0.75), "plain"),
        "frozen": (frozen_ref, Dense(0.75), "plain"),
    }
    variants = [v for v in args.variants.split(",") if v]
    modules = {}
    for v in variants:
        scorer, weighting, data = scorers[v]
        module = TokenWeightingLM(theta, scorer, weighting, n=n, chunk_size=args.chunk_size)
        modules[v] = (module, sets[data])
    optimizer = torch.optim.AdamW(theta.parameters(), lr=1e-7)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    order = random.Random(0)

    def step(variant: str) -> float:
        module, data = modules[variant]
        idx = order.sample(range(rows), args.batch)
        sync()
        start = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in collate([data[i] for i in idx]).items()}
        optimizer.zero_grad(set_to_none=True)
        loss = module.training_step(batch, 0)["loss"] / batch["mask"].sum()  # Σ w·CE -> the mean (no Trainer)
        loss.backward()
        optimizer.step()
        sync()
        return time.perf_counter() - start

    times = {v: [] for v in variants}
    for r in range(args.warmup + args.repeats):
        shuffled = variants[:]
        order.shuffle(shuffled)
        for v in shuffled:
            dt = step(v)
            if r >= args.warmup:
                times[v].append(dt)
    base = times.get("none")
    results = {}
    for v in variants:
        med = statistics.median(times[v])
        entry = {"median_ms": 1e3 * med, "min_ms": 1e3 * min(times[v]),
                 "iqr_ms": 1e3 * (statistics.quantiles(times[v], n=4)[2] - statistics.quantiles(times[v], n=4)[0])}
        if base:
            entry["ratio_of_medians"] = med / statistics.median(base)
            entry["paired_ratio_median"] = statistics.median(a / b for a, b in zip(times[v], base, strict=True))
            entry["target"] = TARGETS.get(v)
            entry["meets_target"] = None if entry["target"] is None else entry["paired_ratio_median"] <= entry["target"]
        results[v] = entry
    report = {
        "setup": {"device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(), "T": t, "n": n,
                  "attention": resolve_attention(args.attention, device),
                  "batch": args.batch, "chunk_size": args.chunk_size, "warmup": args.warmup, "repeats": args.repeats,
                  "model": {"hidden": h, "layers": layers, "vocab": args.vocab, "params": params(theta)},
                  "small": {"hidden": sh, "layers": sl, "params": params(small),
                            "params_ratio": params(small) / params(theta)},
                  "stride": frozen_ref.short.stride, "torch": torch.__version__, "python": platform.python_version(),
                  "cpu": platform.processor() or platform.machine()},
        "results": results,
    }
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} T={t} n={n} batch={args.batch} "
          f"window attention={report['setup']['attention']} "
          f"params={params(theta):,} small={params(small):,} ({params(small) / params(theta):.2f}x) "
          f"rounds={args.repeats} (+{args.warmup} warm-up)")
    print(f"{'variant':<14}{'median ms':>11}{'IQR ms':>9}{'ratio':>8}{'paired':>8}{'target':>8}  ok")
    for v, e in results.items():
        target = e.get("target")
        print(f"{v:<14}{e['median_ms']:>11.1f}{e['iqr_ms']:>9.1f}{e.get('ratio_of_medians', 1):>8.3f}"
              f"{e.get('paired_ratio_median', 1):>8.3f}{'' if target is None else f'<={target}':>8}  "
              f"{'' if e.get('meets_target') is None else ('yes' if e['meets_target'] else 'NO')}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
