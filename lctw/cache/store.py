"""Score cache storage: one directory of Arrow shards, written atomically and resumable.

``<dir>/meta.json`` (the fingerprint, readable), then shards ``shard-<start>-<stop>.arrow`` (Arrow
stream files readable with ``datasets.Dataset.from_file``; columns ``short_logprobs``: float32 × (N - 1),
``checksum``: int64) written to a temporary name and renamed, so a shard is complete or absent, and
``complete.json`` last. Every row stores a checksum of its tokens (:func:`row_checksum`), so the
rows can be matched to the data they were scored on, on any machine.
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

SHORT, CHECKSUM = "short_logprobs", "checksum"  # the columns a cached row adds to the train split


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
        table = pa.table({SHORT: pa.FixedSizeListArray.from_arrays(pa.array(scores.reshape(-1)), scores.shape[1]),
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
