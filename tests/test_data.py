"""Data: the default corpus, local files of each kind, a `datasets` path, chunking, masks, caching."""

import json

import pandas as pd
import pytest
import torch

from lctw.data import LongDocuments, collate, essays
from lctw.models import HFModel, TinyLlama


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    return TinyLlama(n=32, cache_dir=cache_dir, corpus=essays).tokenizer()


def docs(k=6, words=300):
    return [" ".join(f"doc{d} word{i}." for i in range(words)) for d in range(k)]


def test_default_corpus_leaves_out_the_ruler_haystack_prefix():
    from lctw.data import essays_path

    kept = essays()
    text = json.loads(essays_path().read_text())["text"]
    assert len(kept) > 100 and all(len(d) > 100 for d in kept)
    haystack = " ".join(text.split()[:150_000])  # what RULER's essay haystacks are built from
    assert not any(d[:200] in haystack for d in kept)
    assert essays(ruler_reserve_words=0)[0].startswith("April 2012")


def test_chunks_start_with_bos_and_split_by_document(tokenizer, cache_dir):
    dm = LongDocuments(max_len=64, tokenizer=tokenizer, cache_dir=cache_dir, val_fraction=0.1)
    dm.setup()
    train, val = dm.train_set[:], dm.val_set[:]
    assert (train["input_ids"][:, 0] == tokenizer.bos_token_id).all()
    assert train["input_ids"].shape[1] == 64 and (train["length"] == 64).all()  # remainders dropped
    # no validation chunk appears in training (split by document, not by chunk)
    seen = {tuple(x.tolist()) for x in train["input_ids"]}
    assert not any(tuple(x.tolist()) in seen for x in val["input_ids"])


def test_every_seed_holds_out_the_same_documents_and_orders_training_its_own_way(tokenizer, cache_dir, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs(k=10)))

    def split(**kw):
        dm = LongDocuments(max_len=64, source="files", path=str(path), tokenizer=tokenizer, cache_dir=cache_dir,
                           val_fraction=0.2, **kw)
        dm.setup()
        return list(dm.val_documents["text"]), list(dm.train_dataloader().sampler)

    (val0, order0), (val1, order1) = split(seed=0), split(seed=1)
    assert val0 == val1 and order0 != order1
    assert split(seed=0, split_seed=1)[0] != val0  # the split has its own key


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_local_files_of_each_kind(kind, tokenizer, cache_dir, tmp_path):
    texts = docs()
    if kind == "txt":
        for i, t in enumerate(texts):
            (tmp_path / f"{i}.txt").write_text(t)
        path = str(tmp_path)
    elif kind == "jsonl":
        path = str(tmp_path / "d.jsonl")
        (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    else:
        path = str(tmp_path / "d.parquet")
        pd.DataFrame({"body": texts}).to_parquet(path)
    dm = LongDocuments(max_len=128, source="files", path=path, text_field="body", tokenizer=tokenizer,
                       cache_dir=cache_dir, val_fraction=0.2, drop_remainder=False)
    dm.setup()
    total = len(dm.train_set) + len(dm.val_set)
    per_doc = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert total == sum(-(-n // 127) for n in per_doc)  # ceil: the remainders are kept and padded
    batch = collate([dm.train_set[i] for i in range(len(dm.train_set))])
    lengths = torch.stack([dm.train_set[i]["length"] for i in range(len(dm.train_set))])
    assert batch["mask"].sum(-1).tolist() == (lengths - 1).tolist()
    assert (lengths < 128).any()  # some chunk is a padded remainder


def test_datasets_path_with_its_own_validation_split(tokenizer, cache_dir, tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs(4)))
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs(2)))
    dm = LongDocuments(max_len=128, source="hf", name=str(tmp_path), split="train", val_split="validation",
                       tokenizer=tokenizer, cache_dir=cache_dir)
    dm.setup()
    assert len(dm.train_set) > len(dm.val_set) > 0


def test_tokenization_is_cached_on_disk(tokenizer, cache_dir):
    dm = LongDocuments(max_len=96, tokenizer=tokenizer, cache_dir=cache_dir)
    dm.setup()
    files = {f["filename"] for f in dm.train_set.cache_files}
    assert files and all(cache_dir in f for f in files)
    again = LongDocuments(max_len=96, tokenizer=tokenizer, cache_dir=cache_dir)
    again.setup()
    assert {f["filename"] for f in again.train_set.cache_files} == files  # reused, not recomputed


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(source="web"), r"^source='web' is not allowed"),
     (dict(source="files"), r"^source=files needs path"),
     (dict(val_fraction=1.5), r"^val_fraction=1\.5 is out of range")],
)
def test_bad_data_options_name_the_argument(kwargs, match):
    """Plain errors about the data module's own arguments; the config layer adds ``data.``."""
    with pytest.raises(ValueError, match=match):
        LongDocuments(max_len=64, **kwargs)


def test_hf_model_from_a_local_path(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 vocab_size=len(tokenizer))).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    spec = HFModel(str(tmp_path), dtype="bfloat16", gradient_checkpointing=True)
    model = spec.load()
    assert model.dtype == torch.bfloat16 and model.is_gradient_checkpointing
    assert spec.tokenizer().get_vocab() == tokenizer.get_vocab()
    with pytest.raises(ValueError, match=r"^dtype='fp8' is not allowed"):
        HFModel(str(tmp_path), dtype="fp8")
    # the architecture without the weights (a checkpoint is about to supply them): same shapes, new values
    bare = spec.load(weights=False)
    assert bare.dtype == torch.bfloat16 and bare.is_gradient_checkpointing
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in bare.state_dict().items()} == shapes
    assert not torch.equal(bare.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)


def test_epoch_sampler_gives_the_shuffling_data_loaders_order_in_every_epoch():
    """The resumable order equals what DataLoader(shuffle=True, generator=seeded) gave before, epoch by
    epoch, so the numbers of earlier runs stay; a resume skips exactly the rows already trained on."""
    from torch.utils.data import DataLoader

    from lctw.data import EpochSampler

    rows = list(range(10))
    reference = DataLoader(rows, batch_size=3, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(7))
    sampler = EpochSampler(len(rows), 7)
    ours = DataLoader(rows, batch_size=3, sampler=sampler, drop_last=True, generator=torch.Generator().manual_seed(7))
    for epoch in range(3):  # whether or not the trainer calls set_epoch
        if epoch == 1:
            sampler.set_epoch(epoch)
        assert [b.tolist() for b in ours] == [b.tolist() for b in reference], epoch
    sampler.resume(1, 3)
    assert list(sampler) == sampler.order(1)[3:] and list(sampler) == sampler.order(2)  # skipped once


def test_epoch_sampler_shares_each_step_out_over_the_ranks_and_resumes_on_each():
    """On 2 ranks x 2 rows each step trains on the rows 1 rank x 4 trains on (any world size, the same
    global batch); a rank resumed after k batches goes on with exactly the rows it had not seen. Lightning
    leaves it alone (a DistributedSampler): it wrapped any other sampler in one that shuffled it again
    and restarted the epoch on resume."""
    from torch.utils.data import DistributedSampler

    from lctw.data import EpochSampler

    n, seed = 11, 3  # 11 rows: the last one is left out on 2 ranks, so both have 5
    one = list(EpochSampler(n, seed))
    ranks = [list(EpochSampler(n, seed, rank=r, world_size=2)) for r in range(2)]
    assert [len(r) for r in ranks] == [5, 5] and len(EpochSampler(n, seed, rank=1, world_size=2)) == 5
    for step in range(2):  # 2 steps of 4 rows
        assert sorted(ranks[0][2 * step: 2 * step + 2] + ranks[1][2 * step: 2 * step + 2]) == sorted(
            one[4 * step: 4 * step + 4])
    for rank in range(2):
        resumed = EpochSampler(n, seed, rank=rank, world_size=2)
        resumed.resume(0, 2)  # 1 batch of 2 rows trained before the interruption
        assert list(resumed) == ranks[rank][2:]
        following = EpochSampler(n, seed, rank=rank, world_size=2)
        following.set_epoch(1)
        assert list(resumed) == list(following)  # the skip applies once; the next epoch is whole
    assert isinstance(EpochSampler(n, seed), DistributedSampler)
    with pytest.raises(ValueError, match=r"rank=2 is out of range"):
        EpochSampler(n, seed, rank=2, world_size=2)
