"""Throughput of the offline scoring pass (``score.py``) vs a plain no-grad forward over the same tokens.

The scoring side is the real pipeline of :func:`lctw.cache.fill.fill_rows`: rows read from an on-disk Arrow
dataset through a DataLoader, the scorer's forward passes (``short_context_logprobs``: chunked windows, or
one sliding-window pass), checksums, and Arrow shards written to disk. The baseline is the bare model,
``model(input_ids=x).logits`` under ``torch.no_grad()``, over exactly the token tensors the scorer feeds
the model (the B·W windows of n tokens in chunked mode, the B rows of T tokens in window mode), prepared
in memory beforehand. Their ratio (baseline time / scoring time, target >= 0.9) is how much of the
model's raw speed the pipeline keeps. Also printed: the cost of scoring relative to one plain forward
over the rows themselves (chunked windows overlap, so they process more tokens than the rows hold).

Repeats alternate the variants (scoring, windows forward, rows forward) and report medians.

    python benchmarks/scoring_throughput.py --threads 2 --T 1024 --rows 32 --batch 4 --out throughput.json
    python benchmarks/scoring_throughput.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16 \
        --vocab 32000 --T 8192 --rows 64 --batch 2
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.9


sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from overhead import add_model_args  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_model_args(p)
    p.add_argument("--T", type=int, default=1024, help="row length N (default 1024)")
    p.add_argument("--n", type=int, default=None, help="short context (default T/4)")
    p.add_argument("--mode", default="chunked", help="chunked | window (default chunked)")
    p.add_argument("--sink", default="false", help="window: false | true | in_range (default false)")
    p.add_argument("--attention", default="auto", help="window kernel: auto | flex | sdpa | dense (default auto)")
    p.add_argument("--rows", type=int, default=32, help="rows scored per repeat (default 32)")
    p.add_argument("--batch", type=int, default=4, help="rows per scoring step (default 4)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    sys.path.insert(0, str(REPO_ROOT))
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import datasets
    import torch
    from overhead import build_llama, params

    from lctw.cache.fill import fill_rows
    from lctw.cache.store import ScoreCache
    from lctw.method.attention import resolve_attention
    from lctw.method.scorers import FrozenScorer
    from lctw.method.scoring import default_stride, window_mask

    datasets.disable_progress_bars()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    t, n = args.T, args.n or args.T // 4
    model = build_llama(args.vocab, args.hidden, args.layers, args.heads, args.heads, int(2.75 * args.hidden), t,
                        dtype, device, 0).eval().requires_grad_(False)
    sink = {"false": False, "true": True}.get(args.sink, args.sink)
    scorer = FrozenScorer(n, t, mode=args.mode, sink=sink, attention=args.attention).use(model)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.rows, t), generator=g)
    ids[:, 0] = 1
    tmp = Path(tempfile.mkdtemp(prefix="lctw-throughput-"))
    datasets.Dataset.from_dict({"input_ids": ids.tolist()}).save_to_disk(str(tmp / "rows"))
    rows = datasets.load_from_disk(str(tmp / "rows"))

    # exactly the tensors the scorer's forward passes see
    stride = scorer.short.stride if args.mode == "chunked" else None
    if args.mode == "chunked":
        starts = list(range(0, t - n + 1, stride))
        if (t - n) - starts[-1]:
            starts.append(t - n)
        windows = [torch.stack([ids[i : i + args.batch, s : s + n] for s in starts], 1).reshape(-1, n).clone()
                   for i in range(0, args.rows, args.batch)]
        for w in windows:
            w[:, 0] = 1  # BOS replaces each window's first token
    else:
        windows = [ids[i : i + args.batch] for i in range(0, args.rows, args.batch)]
    windows = [w.to(device) for w in windows]
    plain_rows = [ids[i : i + args.batch].to(device) for i in range(0, args.rows, args.batch)]
    tokens = sum(w.numel() for w in windows)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def time_scoring() -> float:
        cache = ScoreCache(tmp / "cache")
        shutil.rmtree(cache.path, ignore_errors=True)
        cache.path.mkdir()
        sync()
        start = time.perf_counter()
        fill_rows(scorer, rows, cache, batch_size=args.batch, progress=False)
        sync()
        return time.perf_counter() - start

    def time_forward(batches, **kwargs) -> float:
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            for x in batches:
                _ = model(input_ids=x, use_cache=False, **kwargs).logits
        sync()
        return time.perf_counter() - start

    variants = {"scoring": time_scoring, "forward_same_tokens": lambda: time_forward(windows),
                "forward_rows": lambda: time_forward(plain_rows)}
    if args.mode == "window" and not sink:  # the model's own attention with a (T, T) sliding-window mask
        mask = window_mask(t, n, False, device)[None, None]
        variants["forward_same_mask"] = lambda: time_forward(windows, attention_mask=mask)
    runs = {k: [] for k in variants}
    for r in range(args.warmup + args.repeats):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for name in order:
            dt = variants[name]()
            if r >= args.warmup:
                runs[name].append(dt)
    shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    report = {
        "setup": {"device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(), "T": t, "n": n,
                  "mode": args.mode, "stride": stride if args.mode == "chunked" else None,
                  "sink": sink if args.mode == "window" else None,
                  "attention": resolve_attention(args.attention, device) if args.mode == "window" else None,
                  "default_stride": default_stride(n, t), "rows": args.rows, "batch": args.batch,
                  "forward_tokens": tokens, "row_tokens": ids.numel(), "params": params(model),
                  "repeats": args.repeats, "torch": torch.__version__, "python": platform.python_version()},
        "seconds": {k: {"median": med[k], "all": v} for k, v in runs.items()},
        "scoring_tokens_per_s": tokens / med["scoring"],
        "forward_tokens_per_s": tokens / med["forward_same_tokens"],
        "throughput_ratio": med["forward_same_tokens"] / med["scoring"],
        "target": TARGET,
        "cost_vs_one_forward_over_rows": med["scoring"] / med["forward_rows"],
    }
    report["meets_target"] = report["throughput_ratio"] >= TARGET
    if "forward_same_mask" in med:
        report["pipeline_ratio_same_mask"] = med["forward_same_mask"] / med["scoring"]
    window = f" sink={sink} attention={report['setup']['attention']}" if args.mode == "window" else ""
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} T={t} n={n} mode={args.mode}{window} "
          f"rows={args.rows} batch={args.batch} params={params(model):,} repeats={args.repeats}")
    print(f"{'variant':<34}{'median s':>10}{'tokens/s':>12}")
    print(f"{'fill_rows (pipeline)':<34}{med['scoring']:>10.3f}{tokens / med['scoring']:>12,.0f}")
    print(f"{'plain no-grad forward, same tokens':<34}{med['forward_same_tokens']:>10.3f}"
          f"{tokens / med['forward_same_tokens']:>12,.0f}")
    print(f"{'plain no-grad forward, rows only':<34}{med['forward_rows']:>10.3f}"
          f"{ids.numel() / med['forward_rows']:>12,.0f}")
    if "forward_same_mask" in med:
        print(f"{'dense (T, T) window mask forward':<34}{med['forward_same_mask']:>10.3f}"
              f"{tokens / med['forward_same_mask']:>12,.0f}")
        print(f"dense-mask forward / scoring: {report['pipeline_ratio_same_mask']:.3f}")
    print(f"throughput ratio (forward / scoring, same tokens): {report['throughput_ratio']:.3f} "
          f"(target >= {TARGET}: {'yes' if report['meets_target'] else 'NO'}); scoring costs "
          f"{report['cost_vs_one_forward_over_rows']:.2f}x one forward over the rows "
          f"({tokens / ids.numel():.2f}x tokens)")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
