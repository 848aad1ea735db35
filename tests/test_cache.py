"""The score cache (lctw/cache/, score.py): real tiny models, real data, real Arrow shards on disk.

The cache is built once per module with a ``score.limit`` stop in the middle (an interrupted run), then
resumed; an uninterrupted run into another directory must give bit-identical rows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import CONF, ROOT, SMALL, compose
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from lctw import cache as score_cache
from lctw.cache.fill import fill_cache as run_score
from lctw.cache.store import MANIFEST, SHORT, CacheDamaged, ScoreCache, file_sha256, row_checksum
from lctw.config import ConfigError, build, validate
from lctw.method.scorers import FrozenScorer, SmallScorer
from lctw.method.scoring import model_logprobs, short_context_logprobs
from lctw.models.theta import build_theta
from lctw.training.module import TokenWeightingLM
from lctw.training.stages import prepare, train

# A few essays only (about 100 chunks), so that scoring all of them takes seconds.
DATA = ["+data.max_docs=4"]
TRAIN = [*SMALL, *DATA]


def compose_score(overrides, cache):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return hydra_compose(config_name="score", overrides=[*TRAIN, *overrides, f"paths.cache={cache}"])


def train_split(cfg):
    parts = prepare(validate(cfg))  # θ0 built or found by the base stage, as the entry points do
    data = build(cfg.data, "data", tokenizer=parts.tokenizer)
    data.setup("fit")
    return parts, data


@pytest.fixture(autouse=True)
def _one_thread():
    """One OpenMP thread (conftest restores the count): on a busy 2-core CI machine two threads spin
    against each other and a tiny forward pass gets ten times slower."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def scored(cache_dir):
    """Score with an interruption (limit), check the half-built cache is refused, then resume."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _score_interrupted_then_resumed(cache_dir)
    finally:
        torch.set_num_threads(threads)


def _score_interrupted_then_resumed(cache_dir):
    first = run_score(compose_score(["score.batch_size=4", "score.shard_rows=8", "score.limit=10"],
                                                  cache_dir))
    cache = ScoreCache(first)
    assert not cache.complete and cache.rows_done() == 12  # the limit rounds up to whole batches
    with pytest.raises(ValueError, match=r"is incomplete \(12 of \d+ rows scored\)\. Finish it with: python score\.py"):
        train(compose([*TRAIN, "scorer.cache=true"], cache=cache_dir), run_dir=os.devnull)
    again = run_score(compose_score(["score.batch_size=4", "score.shard_rows=8"], cache_dir))
    assert again == first and cache.complete
    return first


@pytest.mark.integration
def test_cached_scores_are_theta0_short_context_logprobs(scored, cache_dir):
    cfg = compose([*TRAIN, "scorer.cache=true"], cache=cache_dir)
    parts, data = train_split(cfg)
    scores = ScoreCache(scored).load().with_format("torch")
    assert len(scores) == len(data.train_set) > 16
    theta0 = parts.model_spec.load().eval()
    rows = [0, 5, len(scores) - 1]
    ids = data.train_set.select(rows)[:]["input_ids"]
    expected = short_context_logprobs(theta0, ids, cfg.n, "chunked", parts.scorer.short.stride)
    cached = scores.select(rows)[:]["short_logprobs"]
    torch.testing.assert_close(cached, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(scores.select(rows)[:]["checksum"], row_checksum(ids))


@pytest.mark.integration
def test_resumed_scoring_equals_one_uninterrupted_run(scored, cache_dir, tmp_path):
    whole = run_score(compose_score(["score.batch_size=4", "score.shard_rows=8",
                                                  f"scorer.cache={tmp_path}/whole"], cache_dir))
    a, b = ScoreCache(scored), ScoreCache(whole)
    assert a.meta["fingerprint"] == b.meta["fingerprint"]
    assert [s[:2] for s in a.shards()][:2] == [(0, 8), (8, 12)]  # the interrupted run's partial shard
    assert torch.equal(a.load().with_format("torch")[:]["short_logprobs"],
                       b.load().with_format("torch")[:]["short_logprobs"])


@pytest.mark.integration
def test_training_with_the_cache_equals_the_frozen_scorer_on_the_first_step(scored, cache_dir):
    cfg = compose([*TRAIN, "scorer.cache=true"], cache=cache_dir)
    parts, data = train_split(cfg)
    cached = score_cache.attach(cfg, parts, data)
    batch = next(iter(data.train_dataloader()))
    assert batch["short_logprobs"].shape == batch["mask"].shape and batch["checksum"].shape == (2,)

    def first_step(scorer):
        torch.manual_seed(0)
        module = TokenWeightingLM(build_theta(parts.model_spec, parts.context), scorer, parts.weighting, n=cfg.n)
        loss = module.training_step(batch, 0)["loss"]
        with torch.no_grad():
            long_lp = model_logprobs(module.model, batch["input_ids"])
            weights = parts.weighting(long_lp, scorer(module.model, batch, long_lp), batch["mask"])
        return loss.detach(), weights

    frozen = FrozenScorer(cfg.n, cfg.N)
    frozen.setup(parts.model_spec)
    loss_frozen, w_frozen = first_step(frozen)
    loss_cached, w_cached = first_step(cached)
    assert not list(cached.parameters()) and frozen.model is not None  # the cached scorer holds no model
    torch.testing.assert_close(w_cached, w_frozen, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss_cached, loss_frozen, atol=1e-5, rtol=1e-5)
    # a batch whose tokens are not the scored rows' is refused, never silently scored
    other = dict(batch, input_ids=batch["input_ids"].roll(1, dims=0))
    with pytest.raises(ValueError, match="have other tokens than the rows that were scored"):
        cached(None, other, torch.zeros_like(batch["short_logprobs"]))


@pytest.mark.integration
def test_training_with_the_cache_never_loads_theta0(scored, cache_dir, tmp_path, monkeypatch):
    def no_theta0(self, spec):
        pytest.fail("θ0 was loaded although scorer.cache=true")

    monkeypatch.setattr(FrozenScorer, "setup", no_theta0)
    quiet = [o for o in TRAIN if not o.startswith("logger.")] + ["logger=none", "callbacks=none"]
    cfg = compose([*quiet, "scorer.cache=true", "trainer.max_steps=2", "trainer.val_check_interval=2",
                   "trainer.limit_val_batches=1"], cache=cache_dir)
    metrics = train(cfg, run_dir=tmp_path)
    assert torch.isfinite(torch.tensor([metrics["train/loss"], metrics["train/weight_std"], metrics["val/ce"]])).all()
    assert metrics["train/weight_std"] > 0  # real, non-uniform weights from the cached scores


@pytest.mark.integration
@pytest.mark.parametrize("change, field", [
    (["n=16"], "n: cache 32, now 16"),
    (["scorer.stride=8"], "stride: cache 24, now 8"),
    (["model.rope_theta=20000.0"], "model.model: cache 'tiny:"),  # another θ0
    (["scorer=small"], "scorer: cache 'frozen', now 'small'"),
])
def test_a_stale_cache_is_refused_with_what_changed_and_the_command(scored, cache_dir, change, field):
    overrides = [*TRAIN, "scorer.cache=true", *change]
    cfg = compose(overrides, cache=cache_dir)
    hydra_cfg = compose_score_hydra(overrides, cache_dir)
    try:
        HydraConfig.instance().set_config(hydra_cfg)
        with pytest.raises(ValueError) as err:
            train(cfg, run_dir=os.devnull)
    finally:
        HydraConfig.instance().cfg = None
    message = str(err.value)
    assert "no score cache for this configuration" in message and "is stale" in message
    assert field in message
    assert message.endswith("Build it with: python score.py " + " ".join([*overrides, f"paths.cache={cache_dir}"]))


def compose_score_hydra(overrides, cache):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[*overrides, f"paths.cache={cache}"],
                             return_hydra_config=True)


@pytest.mark.integration
def test_an_explicit_cache_directory_for_another_configuration_is_refused(scored, cache_dir):
    cfg = compose([*TRAIN, f"scorer.cache={scored}", "scorer.mode=window"], cache=cache_dir)
    with pytest.raises(ValueError, match=r"refused, the cache at .* was built for another configuration "
                                         r"\(mode: cache 'chunked', now 'window'; sink: cache None, now False"):
        train(cfg, run_dir=os.devnull)
    with pytest.raises(ValueError, match="holds scores for another configuration"):
        run_score(compose_score([f"scorer.cache={scored}", "scorer.mode=window"], cache_dir))


@pytest.mark.process
def test_score_py_caches_the_small_scorer(cache_dir, tmp_path, monkeypatch):
    out = tmp_path / "small"
    small = ["scorer=small", "+scorer.model.base.trainer.max_steps=6", "data.max_docs=2"]
    cmd = [sys.executable, "score.py", *TRAIN, *small, f"scorer.cache={out}",
           "score.batch_size=8", f"paths.cache={cache_dir}", f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith(str(out)) and "score small n=32" in proc.stderr  # the progress bar
    meta = ScoreCache(out).meta["fingerprint"]
    assert meta["scorer"] == "small" and meta["model"]["model"].startswith("tiny:") and meta["model"]["files"]
    # training reads it without loading the small model
    monkeypatch.setattr(SmallScorer, "setup", lambda self, spec: pytest.fail("the small scorer was loaded"))
    cfg = compose([*TRAIN, *small, f"scorer.cache={out}"], cache=cache_dir)
    parts, data = train_split(cfg)
    scorer = score_cache.attach(cfg, parts, data)
    batch = next(iter(data.train_dataloader()))
    short = scorer(None, batch, torch.zeros_like(batch["short_logprobs"]))
    small = parts.scorer.spec.load().eval()
    expected = short_context_logprobs(small, batch["input_ids"], cfg.n, "chunked", parts.scorer.short.stride)
    torch.testing.assert_close(short, expected, atol=1e-5, rtol=1e-5)


# --- integrity: a damaged cache is refused, naming the file, before θ loads -------------------------------------


def copy_of(scored, tmp_path):
    """A copy of the module's cache to damage; the original stays intact for the other tests."""
    return shutil.copytree(scored, tmp_path / "copy")


def train_with(cache, cache_dir):
    return train(compose([*TRAIN, f"scorer.cache={cache}"], cache=cache_dir), run_dir=os.devnull)


def rewrite_shard(path, change):
    """Rewrite a shard's log-probs in place, as a valid Arrow file (only the numbers differ)."""
    table = pa.ipc.open_stream(path.read_bytes()).read_all()
    column = table.column(SHORT).combine_chunks()
    values = column.flatten().to_numpy().reshape(len(column), -1).copy()
    change(values)
    short = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    table = table.set_column(table.schema.get_field_index(SHORT), SHORT, short)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


@pytest.mark.integration
def test_nan_in_a_shard_is_refused_naming_the_shard(scored, cache_dir, tmp_path, monkeypatch):
    cache = ScoreCache(copy_of(scored, tmp_path))
    _, _, shard = cache.shards()[1]
    rng = np.random.default_rng(0)

    def one_percent_nan(values):
        values.reshape(-1)[rng.choice(values.size, values.size // 100, replace=False)] = np.nan

    rewrite_shard(shard, one_percent_nan)
    monkeypatch.setattr(FrozenScorer, "setup", lambda self, spec: pytest.fail("θ0 was loaded for a damaged cache"))
    with pytest.raises(CacheDamaged) as err:
        train_with(cache.path, cache_dir)
    message = str(err.value)
    assert f"shard {shard} differs from the SHA-256 recorded when it was written" in message
    assert f"Delete {cache.path} and rebuild it with: python score.py" in message
    # the same NaNs with a matching SHA-256 (a shard written by something that did not check its numbers)
    recorded = json.loads((cache.path / MANIFEST).read_text())
    recorded[shard.name].update(bytes=shard.stat().st_size, sha256=file_sha256(shard))
    (cache.path / MANIFEST).write_text(json.dumps(recorded))
    with pytest.raises(CacheDamaged, match=rf"shard {shard} holds non-finite log-probs \(NaN/Inf\), first in row \d+"):
        train_with(cache.path, cache_dir)


@pytest.mark.integration
def test_a_truncated_shard_is_refused_naming_it(scored, cache_dir, tmp_path):
    cache = ScoreCache(copy_of(scored, tmp_path))
    _, _, shard = cache.shards()[-1]
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CacheDamaged, match=rf"shard {shard} has {size // 2} bytes, {size} were written \(truncated"):
        train_with(cache.path, cache_dir)


@pytest.mark.integration
def test_a_shard_from_another_cache_is_refused(scored, cache_dir, tmp_path):
    other = run_score(compose_score(["scorer.stride=16", "score.batch_size=4", "score.shard_rows=8", "score.limit=8",
                                     f"scorer.cache={tmp_path}/other"], cache_dir))
    cache = ScoreCache(copy_of(scored, tmp_path))
    (_, _, foreign), (_, _, own) = ScoreCache(other).shards()[0], cache.shards()[0]
    assert foreign.name == own.name
    shutil.copyfile(foreign, own)
    with pytest.raises(CacheDamaged, match=rf"shard {own} differs from the SHA-256 recorded when it was written "
                                           r"\(edited, or copied from another cache\)"):
        train_with(cache.path, cache_dir)


@pytest.mark.integration
def test_score_py_finishes_a_cache_whose_complete_json_was_lost(scored, cache_dir, tmp_path, monkeypatch):
    cache = ScoreCache(copy_of(scored, tmp_path))
    (cache.path / "complete.json").unlink()
    with pytest.raises(ValueError, match=r"is incomplete \((\d+) of \1 rows scored\)\. Finish it with: python score"):
        train_with(cache.path, cache_dir)
    monkeypatch.setattr(FrozenScorer, "use", lambda self, model: pytest.fail("θ0 was loaded, all rows were there"))
    # a damaged shard is found first: score.py never declares a damaged cache complete
    _, _, shard = cache.shards()[0]
    intact = shard.read_bytes()
    shard.write_bytes(intact[:-100])
    with pytest.raises(CacheDamaged, match=rf"shard {shard} has \d+ bytes, \d+ were written \(truncated or "
                                           rf"replaced\)\. Delete {cache.path} and score again: python score\.py"):
        run_score(compose_score([f"scorer.cache={cache.path}"], cache_dir))
    assert not cache.complete
    shard.write_bytes(intact)
    assert run_score(compose_score([f"scorer.cache={cache.path}"], cache_dir)) == cache.path and cache.complete
    cfg = compose([*TRAIN, f"scorer.cache={cache.path}"], cache=cache_dir)
    parts, data = train_split(cfg)
    assert score_cache.attach(cfg, parts, data).path == cache.path  # verified and attached


@pytest.mark.integration
@pytest.mark.parametrize("option, message", [
    ("score.batch_size=0", "score.batch_size=0 is out of range: allowed >= 1"),
    ("score.batch_size=2.5", "score.batch_size=2.5 must be an integer >= 1"),
    ("score.shard_rows=0", "score.shard_rows=0 is out of range: allowed >= 1"),
    ("score.limit=0", "score.limit=0 is out of range: allowed >= 1 or null"),
    ("score.device=gpu", "score.device='gpu' is not a device: allowed auto, cpu, cuda, cuda:<index>, mps"),
    ("score.device=cuda:7", "score.device=cuda:7 is not available on this machine"),
])
def test_bad_score_options_are_refused_before_the_cache_directory_is_created(cache_dir, tmp_path, option, message):
    out = tmp_path / "cache"
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_score(compose_score([option, f"scorer.cache={out}"], cache_dir))
    assert not out.exists()


@pytest.mark.integration
@pytest.mark.parametrize("value", ["yes", "no", "on", "off", "1", "0", "'true'"])
def test_scorer_cache_is_false_true_or_a_directory(cache_dir, tmp_path, value, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a refused value must not create a directory named after it, here or anywhere
    # 1 and 0 are ints on the command line: the type check names them first
    refused = (r"scorer\.cache=\d has the wrong type: expected bool" if value in ("1", "0") else
               r"scorer\.cache='?\w+'? is not allowed: allowed false, true or a directory path such as \./scores")
    with pytest.raises(ConfigError, match=refused):
        validate(compose([*TRAIN, f"scorer.cache={value}"], cache=cache_dir))
    with pytest.raises(ConfigError, match=refused):
        run_score(compose_score([f"scorer.cache={value}"], cache_dir))
    assert not any(tmp_path.iterdir())


def test_scorer_cache_directories_that_could_exist_are_accepted(cache_dir, tmp_path):
    (tmp_path / "a-file").write_text("")
    for path in (tmp_path / "new" / "scores", "./relative/scores", "'~/scores'"):  # Hydra needs ~ quoted
        assert validate(compose([*TRAIN, f"scorer.cache={path}"], cache=cache_dir)).scorer.cache.name == "scores"
    with pytest.raises(ConfigError, match=rf"scorer\.cache='.*' cannot be a directory: {tmp_path}/a-file is a file"):
        validate(compose([*TRAIN, f"scorer.cache={tmp_path}/a-file/scores"], cache=cache_dir))


def test_non_finite_scores_are_never_written(tmp_path):
    cache = ScoreCache(tmp_path / "cache")
    cache.path.mkdir()
    scores = np.zeros((4, 7), dtype=np.float32)
    scores[2, 3] = np.inf
    with pytest.raises(ValueError, match="rows 0 … 3 hold non-finite log-probs \\(NaN/Inf\\), first in row 2"):
        cache.write_shard(0, scores, np.arange(4))
    assert not any(cache.path.iterdir())
