"""The score cache: a frozen scorer's short-context log-probs, computed once and read while training.

Why: ``scorer=frozen`` (θ0, the model before context extension) and ``scorer=small`` never change
during training, so their log-probs are a function of the data alone. Computing them on the fly costs
a second model in memory and the scorer's forward passes (N/n extra windows per sequence in chunked
mode) in every step of every run of a sweep; the paper precomputes them once. With the cache::

    python score.py scorer=frozen                   # once: writes <paths.cache>/scores/frozen-<key>
    python train.py -m scorer=frozen scorer.cache=true weighting.lam=0.5,0.75,0.9

training reads the log-probs with the batch and θ0 is never loaded. ``scorer.cache`` is ``false``
(compute on the fly), ``true`` (the cache ``score.py`` writes for the same configuration) or a
directory (a cache written there with ``python score.py scorer.cache=<dir>``, e.g. on shared storage).

**What a cache is for.** Its fingerprint (``meta.json``, readable) holds everything that changes the
numbers: the scorer's model (description, dtype, attention implementation, and a digest of its local
files: the full content of small ones such as the tiny model, names and sizes plus ``config.json`` of
large ones; for a hub model its resolved commit), n, mode, the stride (chunked) or sink (window), a
digest of the serialized tokenizer, and the ``datasets`` fingerprint and row count of the chunked train
split (which covers the corpus, N, seed and every chunking option, because ``datasets`` hashes the
chunking code and its inputs). The default directory is named by a hash of it, so any change finds no
cache, and the refusal names the differing fields of the nearest cache and the exact ``python score.py``
command to build the right one. An explicit directory must match field by field.

**Alignment.** The cache has one row per chunk of the train split, in its order; every row also stores
a checksum of its tokens (:func:`row_checksum`). The data module adds the log-probs and checksum as
columns of the train split, so they travel with the row through shuffling, samplers and ``collate``;
:class:`CachedScorer` recomputes the checksum of every batch on its device (one multiply-add per token)
and refuses a batch whose tokens are not the ones that were scored. A cache cannot be used silently for
other data. Only the train split is scored: validation does not use the scorer.

**Layout and resuming.** ``<dir>/meta.json``, then shards ``shard-<start>-<stop>.arrow`` (Arrow stream
files readable with ``datasets.Dataset.from_file``; columns ``short_logprobs``: float32 × (N - 1),
``checksum``: int64) written to a temporary name and renamed, so a shard is complete or absent, and
``complete.json`` last. A rerun continues after the last shard; Ctrl-C saves the rows already scored.
Batches start at multiples of ``score.batch_size``, so an interrupted and resumed run computes exactly
the batches of an uninterrupted one (bit-identical results on deterministic kernels).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shlex
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch
from omegaconf import DictConfig
from torch import Tensor

from lctw.models import TinyLlama
from lctw.scoring import FrozenScorer, Scorer, SmallScorer

log = logging.getLogger(__name__)

VERSION = 1
SCORES, CHECKSUM = "short_logprobs", "checksum"
_SMALL_FILES = 256 * 2**20  # local model directories up to this size are hashed in full
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


# -- fingerprint -------------------------------------------------------------------------------------
def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def files_digest(path: Path) -> str:
    """Digest of a local model directory: config and weights (content if small, else names and sizes)."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and (p.suffix in _WEIGHT_SUFFIXES
                                                                   or p.name == "config.json"))
    full = sum(p.stat().st_size for p in files) <= _SMALL_FILES
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(path)).encode() + b"\0")
        if full or p.name == "config.json":
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(str(p.stat().st_size).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def model_identity(spec) -> dict:
    """What identifies the scorer's weights and numerics, without loading them."""
    ident = {"model": spec.describe(), "dtype": getattr(spec, "dtype", None),
             "attn_implementation": getattr(spec, "attn_implementation", None),
             "gguf_file": getattr(spec, "gguf_file", None)}
    path = Path(str(spec.name_or_path)).expanduser()
    if path.is_dir():
        ident["files"] = files_digest(path)
    elif isinstance(spec, TinyLlama):
        ident["files"] = None  # the tiny base is not built yet: no cache can be for it
    else:
        ident["commit"] = _hub_commit(spec)
    return ident


def _hub_commit(spec) -> str | None:
    """The commit a hub name resolves to (from the hub or the local HF cache), so 'main' moving is seen."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(spec.name_or_path, **spec._common())
    except OSError as err:  # offline and not cached: the name and revision must do
        log.warning("score cache: cannot resolve %s to a commit (%s); using its name and revision",
                    spec.describe(), err)
        return None
    return getattr(config, "_commit_hash", None)


def tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return _sha(text + json.dumps(special))[:16]


def scorer_spec(scorer: Scorer, model_spec):
    """The model whose log-probs are cached: the small scorer's own, θ0 (= the model spec) otherwise."""
    if not isinstance(scorer, FrozenScorer):
        raise ValueError(
            f"scorer={scorer.name} cannot be cached: only scorer=frozen and scorer=small are fixed during training "
            "(scorer=self scores with θ as it trains, scorer=none has no scores)"
        )
    return scorer.spec if isinstance(scorer, SmallScorer) else model_spec


def fingerprint(scorer: Scorer, model_spec, tokenizer, train: datasets.Dataset, data_key: str) -> dict:
    """Everything that changes the cached numbers (see the module docstring); JSON-serializable."""
    return {
        "version": VERSION,
        "scorer": scorer.name,
        "model": model_identity(scorer_spec(scorer, model_spec)),
        "n": scorer.n,
        "mode": scorer.mode,
        "stride": scorer.stride if scorer.mode == "chunked" else None,  # irrelevant in window mode
        "sink": scorer.sink if scorer.mode == "window" else None,  # irrelevant in chunked mode
        "tokenizer": tokenizer_digest(tokenizer),
        "data": {"fingerprint": data_key, "rows": len(train), "length": len(train[0]["input_ids"])},
    }


def fingerprint_key(fp: dict) -> str:
    return _sha(json.dumps(fp, sort_keys=True))[:16]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def differences(cached: dict, now: dict) -> list[str]:
    """'key: cache X, now Y' for every field that differs."""
    a, b = _flat(cached), _flat(now)
    return [f"{k}: cache {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def row_checksum(input_ids: Tensor) -> Tensor:
    """(B, T) token ids -> (B,) int64: Σ_t (id_t + 1)·c_t with fixed pseudo-random c_t < 2^20.

    Exact integer arithmetic on any device (no overflow for ids < 2^20 and T < 2^23), so a row scored on
    one machine is recognized on another; two different rows collide only by accident of ~2^-20 or less.
    """
    coef = _checksum_coefficients(input_ids.shape[-1]).to(input_ids.device, non_blocking=True)
    return ((input_ids.long() + 1) * coef).sum(-1)


@functools.lru_cache(maxsize=8)
def _checksum_coefficients(t: int) -> Tensor:
    return torch.randint(1, 2**20, (t,), generator=torch.Generator().manual_seed(20250309), dtype=torch.int64)


# -- the cache directory -----------------------------------------------------------------------------
class ScoreCache:
    """One cache directory: meta.json, shard-<start>-<stop>.arrow files, complete.json."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()

    @property
    def meta(self) -> dict | None:
        f = self.path / "meta.json"
        return json.loads(f.read_text()) if f.exists() else None

    def shards(self) -> list[tuple[int, int, Path]]:
        out = []
        for p in self.path.glob("shard-*-*.arrow"):
            start, stop = (int(x) for x in p.stem.split("-")[1:3])
            out.append((start, stop, p))
        return sorted(out)

    def rows_done(self) -> int:
        done = 0
        for start, stop, p in self.shards():
            if start != done:
                raise ValueError(f"score cache {self.path}: shard {p.name} does not follow row {done}; "
                                 "the directory was modified: delete it and score again")
            done = stop
        return done

    @property
    def complete(self) -> bool:
        return (self.path / "complete.json").exists()

    def create(self, fp: dict) -> None:
        """Start a cache for ``fp``, or check that the existing one is for ``fp``."""
        meta = self.meta
        if meta is not None:
            if meta["fingerprint"] != fp:
                raise ValueError(
                    f"score cache {self.path} holds scores for another configuration ("
                    + "; ".join(differences(meta["fingerprint"], fp))
                    + "): delete it or choose another scorer.cache directory"
                )
            return
        self.path.mkdir(parents=True, exist_ok=True)
        _write_json(self.path / "meta.json", {"fingerprint": fp, "key": fingerprint_key(fp)})

    def write_shard(self, start: int, scores: np.ndarray, checksums: np.ndarray) -> None:
        stop = start + len(scores)
        table = pa.table({SCORES: pa.FixedSizeListArray.from_arrays(pa.array(scores.reshape(-1)), scores.shape[1]),
                          CHECKSUM: pa.array(checksums, type=pa.int64())})
        final = self.path / f"shard-{start:09d}-{stop:09d}.arrow"
        tmp = final.with_suffix(".tmp")
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, final)

    def finish(self, rows: int) -> None:
        _write_json(self.path / "complete.json", {"rows": rows})

    def load(self) -> datasets.Dataset:
        """All shards as one memory-mapped dataset (columns short_logprobs, checksum)."""
        return datasets.concatenate_datasets([datasets.Dataset.from_file(str(p)) for *_, p in self.shards()])


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def cache_dir(cfg: DictConfig, fp: dict) -> Path:
    """``scorer.cache`` when it is a directory, else ``<paths.cache>/scores/<scorer>-<fingerprint key>``."""
    option = cfg.scorer.get("cache")
    if isinstance(option, str) and option.lower() not in ("true", "auto"):
        return Path(option).expanduser()
    return Path(cfg.paths.cache).expanduser() / "scores" / f"{fp['scorer']}-{fingerprint_key(fp)}"


def score_command(cfg: DictConfig) -> str:
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


# -- training with the cache -------------------------------------------------------------------------
class CachedScorer(Scorer):
    """θ0's (or the small model's) log-probs read from the batch: no model, no forward pass.

    The data module carries the cached ``short_logprobs`` and ``checksum`` columns (:func:`use_cache`);
    every batch's tokens are checked against the checksum the row was scored with.
    """

    name = "cached"
    uses_model = True  # it provides real short-context scores

    def __init__(self, source: Scorer, path: Path):
        self.n, self.max_len, self.mode, self.sink, self.stride = (source.n, source.max_len, source.mode,
                                                                   source.sink, source.stride)
        self.attention = source.attention
        self.source, self.path = source.name, Path(path)
        self.model = None  # never loaded

    def setup(self, model) -> None:
        """Nothing to set up: θ0 is not loaded (that memory saving is the point of the cache)."""

    def __call__(self, model, input_ids, long_logprobs):
        raise RuntimeError("the cached scorer reads its log-probs from the batch: call score_batch(model, batch, lp)")

    def score_batch(self, model, batch: dict, long_logprobs: Tensor) -> Tensor:
        if SCORES not in batch or CHECKSUM not in batch:
            raise ValueError(f"scorer.cache is set but the batch has no {SCORES!r} column: the train data must "
                             "come from the data module use_cache() prepared")
        ids = batch["input_ids"]
        bad = row_checksum(ids) != batch[CHECKSUM].to(ids.device)
        if bad.any():
            raise ValueError(
                f"score cache {self.path}: {int(bad.sum())} of {len(bad)} rows of this batch have other tokens than "
                "the rows that were scored; the cache does not belong to this data: score again with score.py"
            )
        short = batch[SCORES]
        if short.shape != long_logprobs.shape:
            raise ValueError(f"score cache {self.path}: cached log-probs {tuple(short.shape)} do not match the "
                             f"batch's {tuple(long_logprobs.shape)}")
        return short.to(long_logprobs.device, torch.float32)


def open_cache(cfg: DictConfig, scorer: Scorer, model_spec, tokenizer, train: datasets.Dataset,
               data_key: str) -> ScoreCache:
    """The complete cache for this configuration, or a ValueError that says what to run."""
    fp = fingerprint(scorer, model_spec, tokenizer, train, data_key)
    cache = ScoreCache(cache_dir(cfg, fp))
    command = score_command(cfg)
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
    return cache


def _nearest(root: Path, fp: dict) -> str:
    """A hint naming the existing cache closest to ``fp`` and what differs, if there is one."""
    candidates = []
    for meta_file in root.glob("*/meta.json"):
        other = json.loads(meta_file.read_text())["fingerprint"]
        candidates.append((len(differences(other, fp)), meta_file.parent, differences(other, fp)))
    if not candidates:
        return ""
    _, path, diff = min(candidates, key=lambda c: c[0])
    return f" (the nearest existing cache, {path}, is stale: {'; '.join(diff)})"


def use_cache(cfg: DictConfig, parts, datamodule) -> CachedScorer:
    """Check the cache and add its columns to the train split; returns the scorer that reads them.

    Called by :func:`lctw.experiment.run` before any model loads, so a missing or stale cache stops the
    run in seconds. It builds the data module's splits (``setup``, cached on disk by ``datasets``);
    Lightning's own ``setup`` then finds them built.
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
    datamodule.train_set = datasets.concatenate_datasets([train, scores], axis=1).with_format("torch")
    log.info("scorer.cache: reading %s log-probs from %s (θ' is not loaded)", parts.scorer.name, cache.path)
    return CachedScorer(parts.scorer, cache.path)


# -- scoring -----------------------------------------------------------------------------------------
def score_rows(scorer: Scorer, model, rows: datasets.Dataset, cache: ScoreCache, batch_size: int = 8,
               limit: int | None = None, shard_rows: int = 256, num_workers: int = 0, progress: bool = True) -> int:
    """Score ``rows`` (column input_ids) with ``model`` into ``cache``, resuming after its last shard.

    ``limit`` stops after that many more rows (rounded up to whole batches); returns the rows done.
    The forward passes are the on-the-fly scorer's own (``scorer._score``), so the numbers are the same.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    total, start = len(rows), cache.rows_done()
    shard_rows = max(batch_size, shard_rows // batch_size * batch_size)  # shards end on batch boundaries
    stop = total if limit is None else min(total, start + -(-limit // batch_size) * batch_size)
    if start >= stop:
        return start
    device = next(model.parameters()).device
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
            buf_scores.append(scorer._score(model, ids).float().cpu().numpy())
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
