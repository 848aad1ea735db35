"""Score cache storage: one directory of Arrow shards, written atomically, checksummed and resumable.

``<dir>/meta.json`` (the fingerprint, readable), then shards ``shard-<start>-<stop>.arrow`` (Arrow
stream files readable with ``datasets.Dataset.from_file``; columns ``short_logprobs``: float32 × (N - 1),
``checksum``: int64) written to a temporary name and renamed, so a shard is complete or absent, and
``complete.json`` last. Every row stores a checksum of its tokens (:func:`row_checksum`), so the
rows can be matched to the data they were scored on, on any machine.

The stored scores are covered too: ``shards.json`` records each shard's size and SHA-256 when it is
written (before the rename, so a shard on disk always has its entry), and :meth:`ScoreCache.verify`
refuses a shard that is truncated, edited or copied from another cache, and any non-finite log-prob.
A NaN read as a score would not fail loudly: the weights would quietly go uniform.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from lctw.cache.fingerprint import differences, fingerprint_key
from lctw.runs.checkpoints import file_sha256

SHORT, CHECKSUM = "short_logprobs", "checksum"  # the columns a cached row adds to the train split
MANIFEST = "shards.json"  # {shard file name: {"rows", "bytes", "sha256"}}, one entry per shard written
_SCAN_VALUES = 1 << 22  # log-probs checked for NaN/Inf at a time (a 4 MiB temporary)


class CacheDamaged(ValueError):
    """A cache directory whose files are not as score.py wrote them; the message names the file."""


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


class ScoreCache:
    """One cache directory: meta.json, shard-<start>-<stop>.arrow files, complete.json."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()

    @property
    def meta(self) -> dict | None:
        f = self.path / "meta.json"
        if not f.exists():
            return None
        meta = _read_json(f)
        if not isinstance(meta.get("fingerprint"), dict):
            raise CacheDamaged(f"score cache {self.path}: {f} has no fingerprint; it was not written by score.py")
        return meta

    def shards(self) -> list[tuple[int, int, Path]]:
        out = []
        for p in self.path.glob("shard-*-*.arrow"):
            try:
                start, stop = (int(x) for x in p.stem.split("-")[1:])
            except ValueError:
                raise CacheDamaged(f"score cache {self.path}: {p} is not a shard score.py writes "
                                   "(shard-<start>-<stop>.arrow)") from None
            out.append((start, stop, p))
        return sorted(out)

    def rows_done(self) -> int:
        done = 0
        for start, stop, p in self.shards():
            if start != done:
                raise CacheDamaged(f"score cache {self.path}: shard {p} does not follow row {done} "
                                   "(a shard is missing or foreign)")
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
        """Rows ``start`` … ``start + len(scores)``; non-finite scores are refused (θ' is broken) and not written."""
        stop = start + len(scores)
        finite = np.isfinite(scores).all(axis=tuple(range(1, scores.ndim)))
        if not finite.all():
            raise ValueError(f"score cache {self.path}: rows {start} … {stop - 1} hold non-finite log-probs (NaN/Inf), "
                             f"first in row {start + int(np.argmin(finite))}; the scorer's outputs are broken, "
                             "nothing was written")
        table = pa.table({SHORT: pa.FixedSizeListArray.from_arrays(pa.array(scores.reshape(-1)), scores.shape[1]),
                          CHECKSUM: pa.array(checksums, type=pa.int64())})
        final = self.path / f"shard-{start:09d}-{stop:09d}.arrow"
        tmp = final.with_suffix(".tmp")
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        # Recorded before the rename: a crash in between leaves an entry for an absent shard (ignored,
        # rewritten on resume), never a shard without its entry.
        recorded = self.manifest()
        recorded[final.name] = {"rows": stop - start, "bytes": tmp.stat().st_size, "sha256": file_sha256(tmp)}
        _write_json(self.path / MANIFEST, recorded)
        os.replace(tmp, final)

    def finish(self, rows: int) -> None:
        _write_json(self.path / "complete.json", {"rows": rows})

    def manifest(self) -> dict[str, dict]:
        """What ``shards.json`` recorded for each shard written: ``{name: {"rows", "bytes", "sha256"}}``."""
        f = self.path / MANIFEST
        return _read_json(f) if f.exists() else {}

    def verify(self, rows: int | None = None) -> None:
        """Refuse a damaged cache: every shard as written (size and SHA-256) and every log-prob finite.

        ``rows``: the rows the cache must hold (a complete cache's row count). Raises
        :class:`CacheDamaged` naming the file. Cost: each shard file is read twice, streaming (hashed in
        1 MiB blocks, then scanned for NaN/Inf through a memory map), about 1 s per GB on one core when
        the files are in the page cache (SHA-256 at ~1.1 GB/s measured here) and the disk's read speed
        otherwise; its allocations stay at a few MiB whatever the cache size.
        """
        done = self.rows_done()
        if rows is not None and done != rows:
            raise CacheDamaged(f"score cache {self.path}: its shards hold {done} rows, {rows} expected")
        recorded = self.manifest()
        for start, stop, p in self.shards():
            entry = recorded.get(p.name)
            if not isinstance(entry, dict) or not {"bytes", "sha256"} <= entry.keys():
                raise CacheDamaged(f"score cache {self.path}: shard {p} has no SHA-256 in {MANIFEST} (not written "
                                   "by score.py into this cache, or by an lctw that did not record checksums)")
            size = p.stat().st_size
            if size != entry["bytes"]:
                raise CacheDamaged(f"score cache {self.path}: shard {p} has {size} bytes, {entry['bytes']} were "
                                   "written (truncated or replaced)")
            if file_sha256(p) != entry["sha256"]:
                raise CacheDamaged(f"score cache {self.path}: shard {p} differs from the SHA-256 recorded when it "
                                   "was written (edited, or copied from another cache)")
            _check_shard(p, stop - start)

    def load(self) -> datasets.Dataset:
        """All shards as one memory-mapped dataset (columns short_logprobs, checksum)."""
        return datasets.concatenate_datasets([datasets.Dataset.from_file(str(p)) for *_, p in self.shards()])


def _check_shard(path: Path, rows: int) -> None:
    """A shard holds ``rows`` rows and only finite log-probs; scanned through a memory map, a batch at a time."""
    seen = 0
    with pa.memory_map(str(path)) as source:
        for batch in pa.ipc.open_stream(source):
            short = batch.column(SHORT)
            values = short.flatten().to_numpy(zero_copy_only=True).reshape(len(short), -1)
            step = max(1, _SCAN_VALUES // max(1, values.shape[1]))  # rows per scan: a bounded temporary
            for i in range(0, len(values), step):
                finite = np.isfinite(values[i : i + step]).all(axis=1)
                if not finite.all():
                    raise CacheDamaged(f"score cache {path.parent}: shard {path} holds non-finite log-probs "
                                       f"(NaN/Inf), first in row {seen + i + int(np.argmin(finite))} of the shard")
            seen += len(short)
    if seen != rows:
        raise CacheDamaged(f"score cache {path.parent}: shard {path} holds {seen} rows, its name says {rows}")


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CacheDamaged(f"score cache {path.parent}: {path} cannot be read ({err})") from None
    if not isinstance(obj, dict):
        raise CacheDamaged(f"score cache {path.parent}: {path} is not a JSON object")
    return obj


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)
