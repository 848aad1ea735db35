"""In-context copying by distance (``eval=copy``): does θ use the context it has, and how far back?

Why: the study's question is whether weighting makes an extended model learn to use the positions beyond
n faster. Copying is the cleanest use of distant context: a restated span is predictable from its second
token on, by looking back d tokens and only then. Three probe kinds, all on held-out data, the same in
every run (their own ``seed``):

* ``random``: a span of ``span`` random token ids (a held-out span, :func:`lctw.data.copies.held_out`:
  never in training) planted into held-out essay prose and restated d tokens later, at the probe's end;
* ``prose``: the same with a span of held-out prose (a sentence said twice);
* ``facts``: a held-out keyed fact restated with a distractor between (:class:`lctw.eval.recall.Recall`'s
  probes).

The control of a probe is the same probe with another span (another value) at the first position. Per
probe, teacher-forced on the restatement: ``gain`` = log p(restatement | probe) − log p(restatement |
control), in nats **per copied token** (tokens 2..span of a span: the first cannot be predicted), **per
value** for facts (its four digits, as ``eval=recall``); ``acc`` = greedy exact match of those tokens.
A model that does not look back that far gains 0. Sets: ``within_n`` (probes of n tokens, d in
[24, n − 16]) and ``beyond_n`` (probes of N tokens, d in [n + 8, N − 16]), the latter also in buckets
of d of width n (``gain_<lo>-<hi>``). The cost side: ``prose_ce_within_n`` (held-out plain prose in windows of
n) and ``prose_ce_beyond_n`` (windows of N, the targets with more than n tokens before them).

    python eval.py ckpt=<run dir> eval=copy

:meth:`Copying.measure` gives the metrics without writing anything (the learning curve,
:class:`lctw.training.curve.LearningCurve`, calls it during training).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from lctw.data.copies import Vocabulary
from lctw.data.facts import Facts
from lctw.eval.recall import Recall, held_out_prose, mean_of, mean_sem, prose_ce
from lctw.eval.report import log_results, save_plot

KINDS = ("random", "prose", "facts")


class Copying:
    """Copying of held-out spans and facts within and beyond n, by distance; CE of plain prose within and beyond n."""

    def __init__(self, samples: int = 64, span: int = 8, batch_size: int = 16, seed: int = 0,
                 kinds: list[str] = KINDS, prose_sequences: int = 16):
        for key, value in (("samples", samples), ("batch_size", batch_size), ("prose_sequences", prose_sequences)):
            if value < 1:
                raise ValueError(f"{key}={value} is out of range: allowed >= 1")
        if span < 2:
            raise ValueError(f"span={span} is out of range: allowed >= 2 (tokens; the first is not predictable)")
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown or not kinds:
            raise ValueError(f"kinds={list(kinds)}: allowed a non-empty subset of {list(KINDS)}")
        self.samples, self.span, self.batch_size, self.seed = samples, span, batch_size, seed
        self.kinds, self.prose_sequences = list(kinds), prose_sequences
        self._probes: dict = {}  # (n, N) -> (held-out prose, probe sets): built once, reused at every point of a curve

    # -- probes ---------------------------------------------------------------------------------
    def span_probes(self, kind: str, vocabulary: Vocabulary, prose: list[int], bos: int, length: int, lo: int,
                    hi: int, rng: random.Random) -> list[tuple[list[int], list[int], int, int]]:
        """``samples`` pairs (probe, control) of ``length`` tokens, BOS first, the restated span last; each as
        ``(ids, control_ids, restatement_start, distance)``."""
        span, out = self.span, []
        second = length - span
        if hi > second - 1 or lo > hi:
            raise ValueError(f"probes of {length} tokens cannot restate a span of {span} from {lo} to {hi} tokens back")
        for _ in range(self.samples):
            start = rng.randint(0, len(prose) - length)
            base = [bos] + prose[start : start + length - 1]
            if kind == "random":
                item, other = vocabulary.span(span, "heldout", rng), vocabulary.span(span, "heldout", rng)
            else:
                a, b = rng.randint(0, len(prose) - span), rng.randint(0, len(prose) - span)
                item, other = prose[a : a + span], prose[b : b + span]
            distance = rng.randint(lo, hi)
            first = second - distance
            ids, control = list(base), list(base)
            ids[first : first + span] = ids[second:] = control[second:] = item
            control[first : first + span] = other
            out.append((ids, control, second, distance))
        return out

    def probe_sets(self, tokenizer, prose: list[int], n: int, N: int) -> dict:
        """(kind, where) -> probes, for within n and (when N >= 2n) beyond n."""
        rng, vocabulary, bos = random.Random(self.seed), Vocabulary.of(tokenizer), tokenizer.bos_token_id
        recall = Recall(samples=self.samples, batch_size=self.batch_size, seed=self.seed)
        sets = {}
        ranges = [("within_n", n, 24, n - 16)] + ([("beyond_n", N, n + 8, N - 16)] if N >= 2 * n else [])
        for where, length, lo, hi in ranges:
            for kind in self.kinds:
                if kind == "facts":
                    sets[(kind, where)] = recall.probes(tokenizer, prose, Facts(), length, lo, hi, rng)
                else:
                    sets[(kind, where)] = self.span_probes(kind, vocabulary, prose, bos, length, lo, hi, rng)
        return sets

    # -- scoring --------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, model, probes, width: int, per_token: bool) -> list[dict]:
        """Per probe: gain (nats per predicted token, or summed over them) and acc over the ``width`` tokens
        from ``begin`` on. The restatement ends every probe, so only the last logits are computed
        (``logits_to_keep``): the LM head over all positions would cost a quarter of the forward pass."""
        device = next(model.parameters()).device
        rows = []
        for start in range(0, len(probes), self.batch_size):
            batch = probes[start : start + self.batch_size]
            ids = torch.tensor([p[0] for p in batch] + [p[1] for p in batch], device=device)
            keep = ids.shape[1] - min(p[2] for p in batch) + 1
            logits = model(input_ids=ids, logits_to_keep=keep).logits[:, -keep:].float()
            first = ids.shape[1] - keep  # the position the first kept logits predict from
            for i, (_probe, _control, begin, distance) in enumerate(batch):
                pos = torch.arange(begin, begin + width, device=device)
                target = ids[i, pos]
                real = torch.log_softmax(logits[i, pos - 1 - first], -1).gather(-1, target[:, None])[:, 0]
                ctrl = torch.log_softmax(logits[i + len(batch), pos - 1 - first], -1).gather(-1, target[:, None])[:, 0]
                gain = (real - ctrl).mean() if per_token else (real - ctrl).sum()
                acc = bool((logits[i, pos - 1 - first].argmax(-1) == target).all())
                rows.append({"distance": distance, "gain": float(gain), "acc": float(acc)})
        return rows

    def measure(self, model, tokenizer, datamodule, n: int, N: int) -> tuple[dict, dict]:
        """(metrics, per-probe rows by set) of ``model`` on the held-out documents of ``datamodule``; nothing is
        written. The probes are built at the first call and reused."""
        if (n, N) not in self._probes:
            prose = held_out_prose(datamodule, tokenizer)
            self._probes[(n, N)] = prose, self.probe_sets(tokenizer, prose, n, N)
        prose, sets = self._probes[(n, N)]
        was_training = model.training
        model.eval()
        rows = {}
        for (kind, where), probes in sets.items():
            width = 4 if kind == "facts" else self.span - 1
            offset = 0 if kind == "facts" else 1
            shifted = [(p, c, begin + offset, d) for p, c, begin, d in probes]
            rows[(kind, where)] = self.score(model, shifted, width, per_token=kind != "facts")
        bos, size = tokenizer.bos_token_id, {"sequences": self.prose_sequences, "batch_size": self.batch_size}
        metrics = {"eval/copy/prose_ce_within_n": prose_ce(model, prose, bos, n, **size)}
        if N >= 2 * n:
            metrics["eval/copy/prose_ce_beyond_n"] = prose_ce(model, prose, bos, N, skip=n, **size)
        model.train(was_training)
        for (kind, where), found in rows.items():
            metrics.update(_summary(found, f"eval/copy/{kind}", where))
            if where == "beyond_n":
                for lo in range(n, N, n):
                    bucket = [r for r in found if lo <= r["distance"] < lo + n]
                    if bucket:
                        metrics[f"eval/copy/{kind}/gain_{lo}-{lo + n}"] = mean_of(bucket, "gain")
                        metrics[f"eval/copy/{kind}/acc_{lo}-{lo + n}"] = mean_of(bucket, "acc")
        return metrics, rows

    def __call__(self, model, tokenizer, out_dir, logger=None, datamodule=None, n: int = 0, N: int = 0,
                 **_) -> dict:
        if datamodule is None:
            raise ValueError("eval=copy needs held-out documents: a data config (data=...) to read them from")
        metrics, rows = self.measure(model, tokenizer, datamodule, n, N)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "copy.json").write_text(json.dumps({"metrics": metrics, "probes": {f"{k}/{w}": r for (k, w), r in
                                                                                 rows.items()}}, indent=1))
        table = _table(rows, n)
        table.to_csv(out / "copy.csv")
        plot = save_plot(table.pivot(columns="kind", values="gain"), out / "copy.png", "distance (tokens)",
                         "gain over the control (nats per token; facts: per value)", f"copying by distance (n = {n})")
        print(table.to_string(float_format=lambda x: f"{x:.3f}"))
        log_results(logger, metrics, table, "eval/copy", plot)
        return metrics


def _summary(rows: list[dict], prefix: str, where: str) -> dict:
    mean, sem = mean_sem([r["gain"] for r in rows])
    return {f"{prefix}/gain_{where}": mean, f"{prefix}/gain_{where}_sem": sem,
            f"{prefix}/acc_{where}": mean_of(rows, "acc")}


def _table(rows: dict, n: int):
    """DataFrame by kind and distance bucket (width n/2): gain, acc, probes."""
    import pandas as pd

    width = max(1, n // 2)
    frame = pd.DataFrame([{**r, "kind": kind} for (kind, _), found in rows.items() for r in found])
    frame["bucket"] = frame["distance"] // width
    grouped = frame.groupby(["bucket", "kind"]).agg(gain=("gain", "mean"), acc=("acc", "mean"),
                                                    probes=("gain", "size")).reset_index(level="kind")
    grouped.index = pd.Index([f"{b * width}-{(b + 1) * width}" for b in grouped.index], name="distance")
    return grouped
