"""In-context recall of planted facts by distance (``eval=recall``), and the short-context cost.

Why: the method is for better use of distant context. A planted fact (:mod:`lctw.data.facts`) is a
dependency whose distance is known: the restated value can be predicted only by looking back to the
first statement. Each probe is held-out essay text (the validation documents, plain) with a statement
of a held-out key and value, prose, one distractor statement (another held-out key and value), more
prose, and the restatement, which ends the probe. Its control is the same probe with another value in
the first statement. Per probe, teacher-forced on the restated value's four digit tokens:

* ``ce``: the mean cross-entropy per value token (nats; ln 10 = 2.30 is a uniform guess over digits);
* ``gain``: the value's log-prob (summed over its tokens) minus the control's, in nats: what seeing
  the statement adds;
* ``acc``: exact match of greedy completion, i.e. every value token is the argmax (with the earlier
  value tokens correct, teacher forcing and greedy decoding agree).

Probe sets: ``within_n`` (the whole probe, both statements, in the first n tokens; distance drawn in
[24, n - 16]) and ``beyond_n`` (probe of N tokens, distance drawn in [n, N - 16]), bucketed by distance
``ce@<lo>-<hi>`` in widths of n. ``prose_ce_within_n`` is the CE of held-out plain prose in windows of n
tokens: the short-context cost on text without facts. The probes are the same for every run (their own
``seed``), so runs are compared on identical items.

    python eval.py ckpt=<run dir> eval=recall
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch

from lctw.data.facts import Facts, assemble
from lctw.eval.report import log_results, save_plot


class Recall:
    """Recall of planted facts within and beyond n, by distance; CE of plain prose within n."""

    def __init__(self, samples: int = 64, batch_size: int = 8, seed: int = 0, prose_sequences: int = 32):
        for key, value in (("samples", samples), ("batch_size", batch_size), ("prose_sequences", prose_sequences)):
            if value < 1:
                raise ValueError(f"{key}={value} is out of range: allowed >= 1")
        self.samples, self.batch_size, self.seed, self.prose_sequences = samples, batch_size, seed, prose_sequences

    # -- probes ---------------------------------------------------------------------------------
    def probes(self, tokenizer, prose: list[int], facts: Facts, length: int, lo: int, hi: int, rng):
        """``samples`` pairs (probe, control) of ``length`` tokens, BOS first, with the restated value last
        (before its full stop); each as ``(ids, control_ids, value_start, distance)``."""
        out = []
        keys, values = facts.keys("heldout"), facts.values("heldout")
        bos = tokenizer.bos_token_id
        for _ in range(self.samples):
            key, other = rng.sample(keys, 2)
            value, control, distractor = rng.sample(values, 3)
            stmt, offset = facts.statement(tokenizer, key, value)
            ctrl, _ = facts.statement(tokenizer, key, control)
            dist, _ = facts.statement(tokenizer, other, distractor)
            body = length - 1
            restated = body - len(stmt) + 1  # the restatement ends the probe (its full stop cut off)
            top = min(hi, restated - len(stmt) - len(dist))
            if top < lo:
                raise ValueError(f"probes of {length} tokens cannot hold a statement, a distractor and a restatement "
                                 f"{lo} or more tokens apart: use n >= {length + lo - top} (tokens)")
            distance = rng.randint(lo, top)
            first = restated - distance
            # the distractor goes in the prose before or between the two statements, not overlapping them
            slots = [p for p in range(0, restated - len(dist) + 1)
                     if p + len(dist) <= first or first + len(stmt) <= p]
            where = rng.choice(slots)
            start = rng.randint(0, max(0, len(prose) - body))
            text = prose[start : start + body]
            ids, _ = assemble(text, body, [(first, stmt), (where, dist), (restated, stmt[:-1])])
            cids, _ = assemble(text, body, [(first, ctrl), (where, dist), (restated, stmt[:-1])])
            out.append(([bos] + ids, [bos] + cids, 1 + restated + offset, distance))
        return out

    # -- scoring --------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, model, probes, width: int = 4) -> list[dict]:
        """Per probe: ce (mean over the value tokens), gain (nats, vs control), acc (greedy exact match)."""
        device = next(model.parameters()).device
        rows = []
        for start in range(0, len(probes), self.batch_size):
            batch = probes[start : start + self.batch_size]
            ids = torch.tensor([p[0] for p in batch] + [p[1] for p in batch], device=device)
            logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
            for i, (probe, _ctrl, value_start, distance) in enumerate(batch):
                pos = torch.arange(value_start, value_start + width, device=device)
                target = torch.tensor(probe[value_start : value_start + width], device=device)
                real = logp[i, pos - 1, target]
                ctrl = logp[i + len(batch), pos - 1, target]
                acc = bool((logp[i, pos - 1].argmax(-1) == target).all())
                rows.append({"distance": distance, "ce": float(-real.mean()), "gain": float(real.sum() - ctrl.sum()),
                             "acc": float(acc)})
        return rows

    def __call__(self, model, tokenizer, out_dir, logger=None, datamodule=None, n: int = 0, N: int = 0,
                 **_) -> dict:
        if datamodule is None:
            raise ValueError("eval=recall needs held-out documents: a data config (data=...) to read them from")
        prose = held_out_prose(datamodule, tokenizer)
        facts = datamodule.facts or Facts()  # the held-out keys and values are the same for every Facts
        rng = random.Random(self.seed)
        was_training = model.training
        model.eval()
        within = self.score(model, self.probes(tokenizer, prose, facts, n, 24, n - 16, rng))
        beyond = self.score(model, self.probes(tokenizer, prose, facts, N, n, N - 16, rng)) if N >= 2 * n else []
        within_ce = prose_ce(model, prose, tokenizer.bos_token_id, n, sequences=self.prose_sequences,
                             batch_size=self.batch_size)
        model.train(was_training)
        metrics = {"eval/recall/prose_ce_within_n": within_ce, **_summary(within, "within_n")}
        if beyond:
            metrics.update(_summary(beyond, "beyond_n"))
            for lo in range(n, N, n):
                bucket = [r for r in beyond if lo <= r["distance"] < lo + n]
                if bucket:
                    metrics[f"eval/recall/ce@{lo}-{lo + n}"] = mean_of(bucket, "ce")
                    metrics[f"eval/recall/acc@{lo}-{lo + n}"] = mean_of(bucket, "acc")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "recall.json").write_text(json.dumps({"metrics": metrics, "within_n": within, "beyond_n": beyond},
                                                    indent=1))
        table = _table(within + beyond, n)
        table.to_csv(out / "recall.csv")
        plot = save_plot(table[["ce"]], out / "recall.png", "distance (tokens)", "CE of the restated value (nats)",
                         f"recall by distance (n = {n})")
        print(table.to_string(float_format=lambda x: f"{x:.3f}"))
        log_results(logger, metrics, table, "eval/recall", plot)
        return metrics


def mean_of(rows, key):
    return sum(r[key] for r in rows) / len(rows)


def _summary(rows: list[dict], name: str) -> dict:
    out = {f"eval/recall/{key}_{name}": mean_of(rows, key) for key in ("ce", "acc")}
    # the spread of the gain says whether it is distinguishable from 0
    out[f"eval/recall/gain_{name}"], out[f"eval/recall/gain_{name}_sem"] = mean_sem([r["gain"] for r in rows])
    return out


def mean_sem(values: list[float]) -> tuple[float, float]:
    """The mean of ``values`` and its standard error (sample variance, n - 1)."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
    return mean, math.sqrt(var / len(values))


def held_out_prose(datamodule, tokenizer) -> list[int]:
    """The validation documents' tokens, one stream (no planted facts or spans: the probes plant their own)."""
    datamodule.setup("validate")
    texts = list(datamodule.val_documents["text"])
    return [t for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for t in ids]


def _table(rows: list[dict], n: int):
    """DataFrame by distance bucket (width n/2): ce, gain, acc, probes."""
    import pandas as pd

    width = max(1, n // 2)
    frame = pd.DataFrame(rows)
    frame["bucket"] = frame["distance"] // width
    grouped = frame.groupby("bucket").agg(ce=("ce", "mean"), gain=("gain", "mean"), acc=("acc", "mean"),
                                          probes=("ce", "size"))
    grouped.index = pd.Index([f"{b * width}-{(b + 1) * width}" for b in grouped.index], name="distance")
    return grouped


@torch.no_grad()
def prose_ce(model, prose: list[int], bos: int, length: int, skip: int = 0, sequences: int = 32,
             batch_size: int = 8) -> float:
    """Mean CE of held-out plain prose in the first ``sequences`` windows of ``length`` tokens (BOS + length - 1
    tokens of ``prose``), over the targets with more than ``skip`` tokens before them (0: every target)."""
    device = next(model.parameters()).device
    step = length - 1
    windows = [[bos] + prose[i : i + step] for i in range(0, len(prose) - step + 1, step)][:sequences]
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = torch.tensor(windows[start : start + batch_size], device=device)
        logits = model(input_ids=ids).logits.float()[:, skip:-1]
        targets = ids[:, skip + 1 :]
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
        count += targets.numel()
    return total / count
