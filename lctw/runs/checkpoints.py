"""Checkpoints that can be trusted: a SHA-256 beside each one, loading without executing code, and a
clear refusal, naming the file, of a checkpoint that is truncated, edited or from another configuration.

* :class:`VerifiedCheckpointIO` (the Trainer's checkpoint I/O) writes ``<file>.sha256`` after each
  checkpoint and checks it before loading one; loading is ``torch.load(weights_only=True)`` (tensors
  and plain containers only: no pickled code runs). Hashing reads the file once (about 1 s per GB).
* :func:`check_resume` runs before any model loads: the file exists, matches its hash, is a readable
  checkpoint, and was written for the same θ (model, context extension, n, N); other differences
  (learning rate, weighting, ...) are allowed and logged.
* A sharded checkpoint (``trainer=fsdp``, :mod:`lctw.training.distributed`) is a directory: the shards of
  ``torch.distributed.checkpoint`` and ``meta.pt`` (everything but the model and optimizer states).
  Every file gets its ``<file>.sha256``, written by the rank that hashed it (the files are shared out
  over the ranks, :func:`hash_share`); before any model loads, :func:`check_resume` verifies ``meta.pt``
  and the shards' index (small files), and each rank verifies its share of the shards when the strategy
  loads them (:func:`verify_share`), so no rank reads the whole checkpoint twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from lctw.errors import ConfigError

log = logging.getLogger(__name__)

SAME_THETA = ("model", "context", "n", "N")  # what makes a checkpoint's weights this run's θ
# The one list of config keys that never change θ's numbers; the base stage's cache key and the resume check both
# drop them. A run's own keys (top level only: a node's ``name``, e.g. data.name, is a dataset): where files go, how
# progress is shown and logged, the fault policy. In any node: where files are cached, how many workers read them.
NOT_THETA = ("paths", "logger", "callbacks", "name", "validate_first", "ckpt_path", "eval", "nonfinite",
             "checkpoint_every")
NOT_THETA_IN_NODES = ("cache_dir", "num_workers")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, streamed (checkpoints here, score-cache shards in :mod:`lctw.cache.store`)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _sidecar(path) -> Path:
    return Path(f"{path}.sha256")


_VERIFIED: dict[str, tuple[int, int]] = {}  # path -> (size, mtime) of a file already hashed in this process


def verify(path) -> None:
    """Refuse a missing, truncated or edited checkpoint file, naming it. A file already verified in this
    process and unchanged since is not hashed again (the run checks it before loading any model, then
    Lightning loads it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    stat = path.stat()
    if _VERIFIED.get(str(path)) == (stat.st_size, stat.st_mtime_ns):
        return
    sidecar = _sidecar(path)
    if not sidecar.exists():
        log.warning("checkpoint %s has no %s: its content cannot be verified", path, sidecar.name)
        return
    if sidecar.read_text().strip() != file_sha256(path):
        raise ValueError(f"checkpoint {path} is corrupted: its SHA-256 differs from the one written with it "
                         f"({sidecar.name}); the file was truncated or edited. Resume from another checkpoint "
                         "or start the run again")
    _VERIFIED[str(path)] = (stat.st_size, stat.st_mtime_ns)


SHARDED_META = "meta.pt"  # Lightning's name for a sharded checkpoint's metadata file
SHARDED_INDEX = ".metadata"  # torch.distributed.checkpoint's index of the shards


def is_sharded(path) -> bool:
    """A sharded checkpoint: a directory with Lightning's ``meta.pt``."""
    return Path(path).is_dir() and (Path(path) / SHARDED_META).is_file()


def _files(path: Path) -> list[Path]:
    return sorted(f for f in path.iterdir() if f.is_file() and not f.name.endswith(".sha256"))


def hash_share(path: Path, rank: int, world: int) -> None:
    """Write ``<file>.sha256`` for this rank's share of a sharded checkpoint's files (every world-th)."""
    for f in _files(path)[rank::world]:
        _sidecar(f).write_text(file_sha256(f))


def verify_share(path: Path, rank: int, world: int) -> str | None:
    """Verify this rank's share of a sharded checkpoint's files; the first problem, or None."""
    try:
        for f in _files(path)[rank::world]:
            verify(f)
    except (FileNotFoundError, ValueError) as err:
        return str(err)
    return None


def read(path, **kwargs) -> dict:
    """``torch.load(weights_only=True)``; an unreadable file is refused by name."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except Exception as err:  # a garbage or truncated file fails inside the unpickler or the zip reader
        raise ValueError(f"checkpoint {path} cannot be read as a checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]})") from None


class VerifiedCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        _sidecar(path).write_text(file_sha256(Path(path)))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        verify(path)
        return read(path)

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        _sidecar(path).unlink(missing_ok=True)


def check_resume(path, cfg: DictConfig) -> None:
    """Before any model loads: ``path`` is a sound checkpoint of this run's θ (see the module docstring)."""
    try:
        if Path(path).is_dir():
            if not is_sharded(path):
                raise ValueError(f"checkpoint {path} is a directory without {SHARDED_META}: not a sharded checkpoint")
            verify(Path(path) / SHARDED_INDEX)
            path = Path(path) / SHARDED_META
        verify(path)
        checkpoint = read(path, mmap=True)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"ckpt_path: {err}") from None
    saved = (checkpoint.get("hyper_parameters") or {}).get("config")
    if saved is None:
        raise ConfigError(f"ckpt_path: checkpoint {path} holds no run config: it was not written by lctw's training")
    now = OmegaConf.to_container(cfg, resolve=True)
    diffs = [f"{k}: checkpoint {_short(saved.get(k))}, now {_short(now.get(k))}" for k in SAME_THETA
             if theta_part(saved.get(k)) != theta_part(now.get(k))]
    if diffs:
        raise ConfigError(f"ckpt_path: checkpoint {path} is for another θ ({'; '.join(diffs)}); resume it with "
                          "its own configuration")


def theta_part(value):
    """A resolved node of a config without the keys that never change θ (:data:`NOT_THETA_IN_NODES`)."""
    if isinstance(value, dict):
        return {k: theta_part(v) for k, v in value.items() if k not in NOT_THETA_IN_NODES}
    return value


def theta_config(cfg: dict) -> dict:
    """A resolved config without the keys that never change θ (:data:`NOT_THETA` at its top level)."""
    return {k: theta_part(v) for k, v in cfg.items() if k not in NOT_THETA}


def _short(value) -> str:
    text = repr(theta_part(value))
    return text if len(text) < 160 else text[:157] + "..."


def check_file(key: str, value: str) -> None:
    """A checkpoint file that exists, is readable and is what ``torch.save`` writes (a zip archive with
    ``data.pkl``): checked from the file's directory, before anything is unpickled. A sharded checkpoint
    (``trainer=fsdp``: a directory) is checked through its ``meta.pt``."""
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(f"{key}={value!r} does not exist: give a checkpoint a run wrote "
                          "(<run dir>/checkpoints/last.ckpt)")
    if path.is_dir():
        if not is_sharded(path) or not (path / SHARDED_INDEX).is_file():
            raise ConfigError(f"{key}={value!r} is a directory, not a checkpoint file nor a sharded checkpoint "
                              f"(it lacks {SHARDED_META} or {SHARDED_INDEX}): give <run dir>/checkpoints/last.ckpt")
        path = path / SHARDED_META  # trainer=fsdp: the shards' metadata file is an ordinary checkpoint
    elif not path.is_file():
        raise ConfigError(f"{key}={value!r} is not a file: give a checkpoint a run wrote "
                          "(<run dir>/checkpoints/last.ckpt)")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{key}={value!r} is not readable (file permissions)")
    value = str(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):  # not a zip archive (is_zipfile's test)
        names = []
    if not any(n.endswith("data.pkl") for n in names):
        raise ConfigError(f"{key}={value!r} is not a PyTorch checkpoint (torch.save writes a zip archive with "
                          "data.pkl; this file is not one): give a .ckpt a run wrote")
