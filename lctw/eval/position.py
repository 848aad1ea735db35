"""Position-resolved perplexity (``eval=ppl``): cross-entropy by target position on held-out documents.

Why: it is the cheapest signal that context extension and weighting work. Buckets 0-n, n-2n, ... up to
N group targets by how many tokens precede them, and the buckets beyond the short context n are where
the methods show. The held-out validation documents never contain RULER haystacks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lctw.eval.report import log_results, save_plot


class PositionPerplexity:
    """Mean cross-entropy of targets grouped by how many tokens precede them, in buckets of ``bucket``."""

    def __init__(self, bucket: int | None = None, max_sequences: int = 64, batch_size: int = 2,
                 chunk_size: int | None = 1024):
        if bucket is not None and bucket < 1:
            raise ValueError(f"bucket={bucket} is out of range: allowed >= 1 or null (= n)")
        if max_sequences < 1:
            raise ValueError(f"max_sequences={max_sequences} is out of range: allowed >= 1")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is out of range: allowed >= 1")
        self.bucket, self.max_sequences = bucket, max_sequences
        self.batch_size, self.chunk_size = batch_size, chunk_size

    def table(self, model, sequences, n: int):
        """DataFrame indexed by bucket "lo-hi" (positions of the target token) with ce, ppl, tokens."""
        import pandas as pd

        from lctw.data import collate
        from lctw.method.scoring import model_logprobs

        width = self.bucket or n
        sums: dict[int, float] = {}
        counts: dict[int, int] = {}
        device = next(model.parameters()).device
        rows = [sequences[i] for i in range(min(self.max_sequences, len(sequences)))]
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for start in tqdm(range(0, len(rows), self.batch_size), desc="position perplexity"):
                batch = collate(rows[start : start + self.batch_size])
                ids, mask = batch["input_ids"].to(device), batch["mask"].to(device)
                nll = -model_logprobs(model, ids, self.chunk_size)
                bucket = torch.arange(1, ids.shape[1], device=device) // width  # target token position
                for b in bucket.unique().tolist():
                    sel = mask & (bucket == b)[None]
                    sums[b] = sums.get(b, 0.0) + float(nll[sel].sum())
                    counts[b] = counts.get(b, 0) + int(sel.sum())
        model.train(was_training)
        keys = sorted(k for k in counts if counts[k])
        ce = [sums[k] / counts[k] for k in keys]
        index = [f"{k * width}-{(k + 1) * width}" for k in keys]
        return pd.DataFrame({"ce": ce, "ppl": [float(torch.tensor(c).exp()) for c in ce],
                             "tokens": [counts[k] for k in keys]}, index=pd.Index(index, name="positions"))

    def __call__(self, model, tokenizer, out_dir, logger=None, datamodule=None, n: int = 0, **_) -> dict:
        if datamodule is None:
            raise ValueError("eval=ppl needs held-out documents: a data config (data=...) to read them from")
        datamodule.setup("validate")
        table = self.table(model, datamodule.val_set, n)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "position_ce.csv")
        plot = save_plot(table[["ce"]], out / "position_ce.png", "target position", "cross-entropy (nats)",
                         f"CE by position (n = {n})")
        print(table.to_string(float_format=lambda x: f"{x:.4f}"))
        metrics = {f"eval/ce/{i}": float(v) for i, v in table["ce"].items()}
        (out / "position_ce.json").write_text(json.dumps(metrics, indent=2))
        log_results(logger, metrics, table, "eval/position_ce", plot)
        return metrics
