"""Fill a score cache (``score.py``): run a fixed scorer once over the tokenized train split.

    python score.py scorer=frozen                    # θ0's short-context log-probs
    python score.py scorer=small score.batch_size=16 # the small scorer's

Resumable: an interrupted run (or one stopped by ``score.limit``) continues after its last shard, once
the shards already there have passed :meth:`lctw.cache.store.ScoreCache.verify`; a cache whose rows are
all there but whose ``complete.json`` was lost is verified and finished without loading θ'.
"""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
import numpy as np
import torch
from omegaconf import DictConfig

from lctw.cache import cache_dir, fill_command
from lctw.cache.fingerprint import fingerprint
from lctw.cache.store import CacheDamaged, ScoreCache, row_checksum
from lctw.errors import config_error
from lctw.method.scorers import FixedScorer
from lctw.models.theta import resolve_device

log = logging.getLogger(__name__)


def check_options(batch_size=8, shard_rows=256, limit=None, device="auto") -> torch.device:
    """Refuse bad scoring options (ValueError about the argument); returns the device to score on."""
    for key, value in (("batch_size", batch_size), ("shard_rows", shard_rows), ("limit", limit)):
        if key == "limit" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{key}={value!r} must be an integer >= 1" + (" or null" if key == "limit" else ""))
        if value < 1:
            raise ValueError(f"{key}={value} is out of range: allowed >= 1" + (" or null" if key == "limit" else ""))
    return resolve_device(device, "device")


def fill_cache(cfg: DictConfig) -> Path:
    """``score.py``: θ' log-probs of the train split into the cache this configuration asks for."""
    from lctw.config import build, validate

    opts = cfg.get("score") or {}
    options = {"batch_size": opts.get("batch_size", 8), "shard_rows": opts.get("shard_rows", 256),
               "limit": opts.get("limit"), "device": opts.get("device", "auto")}
    with config_error("score"):  # before anything is built or written: no half-made cache directory
        device = check_options(**options)
    from lctw.training.stages import prepare

    parts = prepare(validate(cfg, for_cache=True))  # θ0 of model=tiny built first: its files are in the fingerprint
    datamodule = build(cfg.data, "data", tokenizer=parts.tokenizer)
    datamodule.setup("fit")
    train = datamodule.train_set
    source = parts.scorer.source(parts.model_spec)
    fp = fingerprint(parts.scorer, parts.model_spec, parts.tokenizer, train, datamodule.fingerprints["train"])
    cache = ScoreCache(cache_dir(cfg, fp))
    try:
        cache.create(fp)
        if cache.complete:
            cache.verify(rows=len(train))
            log.info("score cache already complete: %s", cache.path)
            print(cache.path)
            return cache.path
        if cache.rows_done() < len(train):  # else every row is there: fill_rows only verifies and finishes
            parts.scorer.use(source.load()).to(device)
        done = fill_rows(parts.scorer, train, cache, batch_size=options["batch_size"], limit=options["limit"],
                         shard_rows=options["shard_rows"], num_workers=int(cfg.data.get("num_workers", 0)))
    except CacheDamaged as err:
        raise CacheDamaged(f"{err}. Delete {cache.path} and score again: {fill_command(cfg)}") from None
    state = "complete" if cache.complete else f"stopped at {done} of {len(train)} rows; rerun to continue"
    log.info("score cache %s: %s", state, cache.path)
    print(cache.path)
    return cache.path


def fill_rows(scorer: FixedScorer, rows: datasets.Dataset, cache: ScoreCache, batch_size: int = 8,
               limit: int | None = None, shard_rows: int = 256, num_workers: int = 0, progress: bool = True) -> int:
    """θ' log-probs of ``rows`` (column input_ids) into ``cache``, resuming after its last shard.

    ``scorer`` is a fixed scorer with its model loaded (unused when every row is already there).
    ``limit`` stops after that many more rows (rounded up to whole batches); returns the rows done.
    The shards already there are verified first (:meth:`ScoreCache.verify`), so a damaged cache is
    never continued or declared complete. The forward passes are the live scorer's own
    (``scorer(None, batch, None)``), so the numbers are the same.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    check_options(batch_size, shard_rows, limit)
    cache.verify()
    total, start = len(rows), cache.rows_done()
    if start > total:
        raise CacheDamaged(f"score cache {cache.path}: its shards hold {start} rows, the data has {total}")
    shard_rows = max(batch_size, shard_rows // batch_size * batch_size)  # shards end on batch boundaries
    stop = total if limit is None else min(total, start + -(-limit // batch_size) * batch_size)
    if start >= total:
        cache.finish(total)  # every row is there (e.g. complete.json was lost): finish, never loop
        return start
    if start >= stop:
        return start
    device = next(scorer.model.parameters()).device
    ids_only = rows.select_columns(["input_ids"]).with_format("torch")
    loader = DataLoader(torch.utils.data.Subset(ids_only, range(start, stop)), batch_size=batch_size,
                        collate_fn=lambda r: torch.stack([x["input_ids"] for x in r]), num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    buf_scores, buf_sums, buf_start = [], [], start

    def flush():
        nonlocal buf_scores, buf_sums, buf_start
        if buf_scores:
            cache.write_shard(buf_start, np.concatenate(buf_scores), np.concatenate(buf_sums))
            buf_start += sum(len(s) for s in buf_scores)
            buf_scores, buf_sums = [], []

    bar = tqdm(total=total, initial=start, unit="seq", desc=f"score {scorer.name} n={scorer.n}", disable=not progress)
    try:
        for ids in loader:
            ids = ids.to(device, non_blocking=True)
            buf_scores.append(scorer(None, {"input_ids": ids}, None).float().cpu().numpy())
            buf_sums.append(row_checksum(ids).cpu().numpy())
            bar.update(len(ids))
            if sum(len(s) for s in buf_scores) >= shard_rows:
                flush()
    except KeyboardInterrupt:
        flush()  # every buffered row is complete: keep them
        raise
    finally:
        bar.close()
    flush()
    if buf_start >= total:
        cache.finish(total)
    return buf_start
