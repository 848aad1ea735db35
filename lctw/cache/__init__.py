"""The score cache: a fixed scorer's short-context log-probs, computed once and read while training.

Why: ``scorer=frozen`` (θ0, the model before context extension) and ``scorer=small`` never change
during training, so their log-probs are a function of the data alone. Computing them on the fly costs
a second model in memory and the scorer's forward passes (N/n extra windows per sequence in chunked
mode) in every step of every run of a sweep; the paper precomputes them once. With the cache::

    python score.py scorer=frozen                   # once: writes <paths.cache>/scores/frozen-<key>
    python train.py -m scorer=frozen scorer.cache=true weighting.lam=0.5,0.75,0.9

training reads the log-probs with the batch and θ0 is never loaded. ``scorer.cache`` is ``false``
(compute on the fly), ``true`` (the cache ``score.py`` writes for the same configuration) or a
directory (a cache written there with ``python score.py scorer.cache=<dir>``, e.g. on shared storage);
anything else, such as ``yes`` or ``1``, is refused before any model loads (:func:`cache_option`).

**What a cache is for** (:mod:`lctw.cache.fingerprint`): everything that changes the numbers. The
default directory is named by a hash of it, so any change finds no cache, and the refusal names the
differing fields of the nearest cache and the exact ``python score.py`` command to build the right one.
An explicit directory must match field by field.

**Alignment.** The cache has one row per chunk of the train split, in its order; every row also stores
a checksum of its tokens (:func:`lctw.cache.store.row_checksum`). The data module adds the log-probs and checksum as
columns of the train split, so they travel with the row through shuffling, samplers and ``collate``;
:class:`lctw.cache.scorer.CachedScorer` recomputes the checksum of every batch on its device (one multiply-add
per token) and refuses a batch whose tokens are not the ones that were scored. A cache cannot be used silently for
other data. Only the train split is scored: validation does not use the scorer.

**Integrity.** Every shard's SHA-256 is recorded when it is written; opening a cache for training
(:func:`open_cache`) and resuming it (``score.py``) check every shard against it and every log-prob for
NaN/Inf, so a truncated, edited or foreign shard is refused with the file's name and the command that
rebuilds the cache (about 1 s per GB of cache, :meth:`lctw.cache.store.ScoreCache.verify`).

**Layout and resuming** (:mod:`lctw.cache.store`, :mod:`lctw.cache.fill`): Arrow shards written
atomically, ``complete.json`` last. A rerun continues after the last shard; Ctrl-C saves the rows
already scored. Batches start at multiples of ``score.batch_size``, so an interrupted and resumed run
computes exactly the batches of an uninterrupted one (bit-identical results on deterministic kernels).

This module holds what a run does with a cache: read the option (:func:`cache_option`), find the cache
for the composed config (:func:`open_cache`), say how to build it (:func:`fill_command`) and attach it
to the data (:func:`attach`).

May import: :mod:`lctw.method` (the scorers), :mod:`lctw.runs.checkpoints` (file checksums), the config
layer, and (``fill.py``, the ``score.py`` job) :mod:`lctw.training.stages`; the method never imports the cache.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import datasets
import numpy as np
import torch
from omegaconf import DictConfig

from lctw.cache.fingerprint import differences, fingerprint, fingerprint_key
from lctw.cache.scorer import CachedScorer
from lctw.cache.store import CHECKSUM, CacheDamaged, ScoreCache, row_checksum
from lctw.errors import config_error
from lctw.method.scorers import FixedScorer, cache_option

log = logging.getLogger(__name__)


def cache_dir(cfg: DictConfig, fp: dict) -> Path:
    """``scorer.cache`` when it is a directory, else ``<paths.cache>/scores/<scorer>-<fingerprint key>``."""
    with config_error("scorer"):
        option = cache_option(cfg.scorer.get("cache"))
    if isinstance(option, Path):
        return option
    return Path(cfg.paths.cache).expanduser() / "scores" / f"{fp['scorer']}-{fingerprint_key(fp)}"


def fill_command(cfg: DictConfig) -> str:
    """The ``python score.py ...`` command that writes the cache this run asks for."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        overrides = list(HydraConfig.get().overrides.task)
    else:  # called without Hydra's command line (tests, notebooks): the options that matter
        s = cfg.scorer
        overrides = [f"scorer={'small' if 'model' in s else 'frozen'}", f"n={cfg.n}", f"N={cfg.N}",
                     f"scorer.mode={s.mode}", f"scorer.stride={'null' if s.stride is None else s.stride}",
                     f"scorer.sink={str(s.sink).lower()}", f"seed={cfg.seed}", f"paths.cache={cfg.paths.cache}"]
        if isinstance(s.get("cache"), str):
            overrides.append(f"scorer.cache={s.cache}")
        overrides.append("<and this run's model/data overrides>")
    return " ".join(["python score.py", *(shlex.quote(o) if not o.startswith("<") else o for o in overrides)])


def open_cache(cfg: DictConfig, scorer: FixedScorer, model_spec, tokenizer, train: datasets.Dataset,
               data_key: str) -> ScoreCache:
    """The complete cache for this configuration, or a ValueError that says what to run."""
    fp = fingerprint(scorer, model_spec, tokenizer, train, data_key)
    cache = ScoreCache(cache_dir(cfg, fp))
    command = fill_command(cfg)
    try:
        _check(cfg, cache, fp, command)
    except CacheDamaged as err:
        message = f"scorer.cache: refused, {err}. Delete {cache.path} and rebuild it with: {command}"
        raise CacheDamaged(message) from None
    return cache


def _check(cfg: DictConfig, cache: ScoreCache, fp: dict, command: str) -> None:
    """Refuse a missing, foreign or incomplete cache with what to run; raises CacheDamaged for a damaged one."""
    meta = cache.meta
    if meta is None:
        hint = _nearest(cache.path.parent, fp) if not isinstance(cfg.scorer.get("cache"), str) else ""
        raise ValueError(f"scorer.cache: no score cache for this configuration at {cache.path}{hint}. "
                         f"Build it with: {command}")
    if meta["fingerprint"] != fp:
        raise ValueError(f"scorer.cache: refused, the cache at {cache.path} was built for another configuration ("
                         + "; ".join(differences(meta["fingerprint"], fp)) + f"). Build the right one with: {command}")
    if not cache.complete:
        raise ValueError(f"scorer.cache: the cache at {cache.path} is incomplete ({cache.rows_done()} of "
                         f"{fp['data']['rows']} rows scored). Finish it with: {command}")
    cache.verify(rows=fp["data"]["rows"])


def _nearest(root: Path, fp: dict) -> str:
    """A hint naming the existing cache closest to ``fp`` and what differs, if there is one."""
    candidates = []
    for meta_file in root.glob("*/meta.json"):
        try:
            other = ScoreCache(meta_file.parent).meta["fingerprint"]
        except ValueError:  # a damaged neighbour is no candidate; this hint must not fail the refusal it explains
            continue
        candidates.append((len(differences(other, fp)), meta_file.parent, differences(other, fp)))
    if not candidates:
        return ""
    _, path, diff = min(candidates, key=lambda c: c[0])
    return f" (the nearest existing cache, {path}, is stale: {'; '.join(diff)})"


def attach(cfg: DictConfig, parts, datamodule) -> CachedScorer:
    """Check the cache and add its columns to the train split; returns the scorer that reads them.

    Called by :func:`lctw.training.experiment.run` before any model loads, so a missing or stale cache stops the
    run in seconds. It builds the data module's splits (``setup``, cached on disk by ``datasets``);
    Lightning's own ``setup`` then finds them built. ``parts.scorer`` is the fixed scorer it replaces.
    """
    datamodule.setup("fit")
    train = datamodule.train_set
    cache = open_cache(cfg, parts.scorer, parts.model_spec, parts.tokenizer, train, datamodule.fingerprints["train"])
    scores = cache.load()
    if len(scores) != len(train):
        raise ValueError(f"score cache {cache.path}: {len(scores)} rows for a train split of {len(train)}")
    probe = np.unique(np.linspace(0, len(train) - 1, num=min(len(train), 32)).astype(int)).tolist()
    ids = train.select(probe).with_format("torch")[:]["input_ids"]
    if not torch.equal(row_checksum(ids), torch.as_tensor(scores.select(probe)[:][CHECKSUM])):
        raise ValueError(f"score cache {cache.path}: its rows are not this train split's rows; score again")
    datamodule.add_train_columns(scores)
    log.info("scorer.cache: reading %s log-probs from %s (θ' is not loaded)", parts.scorer.name, cache.path)
    return CachedScorer(parts.scorer, cache.path)
