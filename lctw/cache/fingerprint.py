"""What a score cache is for: the fingerprint of everything that changes the cached numbers.

The scorer's model (description, dtype, attention implementation, and a digest of its local files:
the full content of small ones such as the tiny model, names and sizes plus ``config.json`` of large
ones; for a hub model its resolved commit), the short-context settings (n, mode, the stride in
chunked mode or the sink in window mode), a digest of the serialized tokenizer, and the ``datasets``
fingerprint and row count of the chunked train split (which covers the corpus, N, seed and every
chunking option). The default cache directory is named by a hash of it, so any change finds no cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import datasets

log = logging.getLogger(__name__)

VERSION = 1
_SMALL_FILES = 256 * 2**20  # local model directories up to this size are hashed in full
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def sha(data: bytes | str) -> str:
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
    """What identifies the scorer's weights and numerics, without loading them.

    A spec whose weights are built on first use (the tiny base) must be built (:func:`lctw.training.stages.prepare`)
    before it can be identified by its files.
    """
    ident = {"model": spec.describe(), "dtype": getattr(spec, "dtype", None),
             "attn_implementation": getattr(spec, "attn_implementation", None),
             "gguf_file": getattr(spec, "gguf_file", None)}
    path = Path(str(spec.name_or_path)).expanduser()
    if path.is_dir():
        ident["files"] = files_digest(path)
    elif spec.built_locally:
        ident["files"] = None  # not built yet: no cache can be for it
    else:
        ident["commit"] = _hub_commit(spec)
    return ident


def _hub_commit(spec) -> str | None:
    """The commit a hub name resolves to (from the hub or the local HF cache), so 'main' moving is seen."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(spec.name_or_path, **spec.hub_options())
    except OSError as err:  # offline and not cached: the name and revision must do
        log.warning("score cache: cannot resolve %s to a commit (%s); using its name and revision",
                    spec.describe(), err)
        return None
    return getattr(config, "_commit_hash", None)


def tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return sha(text + json.dumps(special))[:16]


def fingerprint(scorer, model_spec, tokenizer, train: datasets.Dataset, data_key: str) -> dict:
    """Everything that changes a fixed scorer's cached numbers; JSON-serializable.

    ``scorer`` is a fixed scorer (:class:`lctw.method.scorers.FixedScorer`); ``model_spec`` the trained model's.
    """
    return {
        "version": VERSION,
        "scorer": scorer.name,
        "model": model_identity(scorer.source(model_spec)),
        **scorer.short.identity(),
        "tokenizer": tokenizer_digest(tokenizer),
        "data": {"fingerprint": data_key, "rows": len(train), "length": len(train[0]["input_ids"])},
    }


def fingerprint_key(fp: dict) -> str:
    return sha(json.dumps(fp, sort_keys=True))[:16]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def differences(cached: dict, now: dict) -> list[str]:
    """'key: cache X, now Y' for every field that differs."""
    a, b = _flat(cached), _flat(now)
    return [f"{k}: cache {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
