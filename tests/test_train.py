"""Real runs: the default experiment end to end (shortened by overrides) and a 2x2 multirun.

Everything is real: Hydra composition, the tiny base stage (built on first use in the session cache),
the Lightning Trainer, W&B offline, checkpoints and the exported Hugging Face model.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, SMALL, compose
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from lctw.training.stages import train


@pytest.mark.integration
def test_default_experiment_trains_and_validates_at_n(trained_run):
    _, metrics = trained_run
    for key in ("train/loss", "train/ce", "train/tokens_per_s"):
        assert math.isfinite(metrics[key]), key
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/ce"]), rel=1e-4)
    # every validation row is a full chunk of N=128: 32 targets within n=32, 95 beyond; val/ce is their token mean
    for suffix in ("", "_before"):  # after training, and θ right after extension
        split = (32 * metrics[f"val/ce_within_n{suffix}"] + 95 * metrics[f"val/ce_beyond_n{suffix}"]) / 127
        assert metrics[f"val/ce{suffix}"] == pytest.approx(split, rel=1e-5)


@pytest.mark.integration
def test_default_experiment_weights_are_dense(trained_run):
    """dense lam=0.75: every weight >= 0.75, rows of mean 1, so non-uniform means ESS below 1 but at least
    1/(1 + variance) (Jensen), and no zero weights."""
    _, metrics = trained_run
    assert metrics["train/weight_zero_frac"] == 0 and metrics["train/weight_max"] > 1
    assert 1 / (1 + metrics["train/weight_std"] ** 2) - 1e-6 <= metrics["train/weight_ess"] < 1
    assert 0 < metrics["train/weight_mass_beyond_n"] < 1


@pytest.mark.integration
def test_default_experiment_builds_theta0_by_the_base_stage(trained_run, cache_dir):
    """The base really was pretrained at n, as an ordinary run of experiment=base: far better than chance."""
    base = next(p.parent.parent for p in Path(cache_dir, "tiny").glob("*/hf/config.json"))
    base_cfg = OmegaConf.load(base / "config.yaml")
    assert (base_cfg.n, base_cfg.N, base_cfg.scorer._target_, base_cfg.context.method) == (
        32, 32, "lctw.method.scorers.NoScorer", "none")
    assert json.loads((base / "metrics.json").read_text())["val/ce"] < math.log(4096)


@pytest.mark.integration
def test_default_experiment_writes_its_run_directory(trained_run):
    run_dir, metrics = trained_run
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3  # max_steps
    assert json.loads((run_dir / "metrics.json").read_text())["val/ce"] == metrics["val/ce"]
    assert list((run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.integration
def test_default_experiment_exports_the_extended_theta(trained_run):
    """θ as a Hugging Face model with the NTK-aware RoPE base for 4x at head size 32, not θ0's."""
    run_dir, _ = trained_run
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    assert exported.config.max_position_embeddings == 128
    assert exported.config.rope_parameters["rope_theta"] == pytest.approx(10000.0 * 4 ** (32 / 30))
    assert OmegaConf.load(run_dir / "hf" / "lctw.yaml").N == 128


@pytest.mark.integration
def test_default_experiment_checkpoint_describes_itself_without_theta0(trained_run):
    run_dir, _ = trained_run
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(k.startswith("scorer") for k in ckpt["state_dict"])  # θ0 is not saved with θ
    assert ckpt["hyper_parameters"]["config"]["context"]["method"] == "theta"


@pytest.mark.integration
def test_default_experiment_ends_in_its_evaluation(trained_run):
    """eval=ppl ran after training: CE by position bucket of width n up to N."""
    run_dir, metrics = trained_run
    table = pd.read_csv(run_dir / "eval" / "position_ce.csv", index_col=0)
    assert list(table.index) == ["0-32", "32-64", "64-96", "96-128"]
    assert metrics["eval/ce/0-32"] == pytest.approx(table.loc["0-32", "ce"])
    assert (run_dir / "eval" / "position_ce.png").stat().st_size > 0


@pytest.mark.integration
def test_wandb_shows_what_the_weighting_does(trained_run):
    """The token view of one validation sequence (HTML) and score/weight histograms at each validation, the
    flat config, and the training samples the sweep report reads (lctw.training.callbacks.TokenWeights)."""
    from test_loggers import read_run

    run_dir, _ = trained_run
    (wandb_dir,) = (run_dir / "wandb").glob("offline-run-*")
    run = read_run(wandb_dir)
    assert run["config"]["weighting.lam"] == 0.75 and run["config"]["n"] == 32 and "weighting" not in run["config"]
    views = [row for row in run["history"] if "val/token_view/_type" in row]
    assert len(views) == 2  # right after extension (validate_first) and after the 3 training steps
    assert all(row["val/token_view/_type"] == "html-file" for row in views)
    assert all(row["val/token_view_scores/_type"] == "histogram" for row in views)
    assert views[1]["train/weights_hist/_type"] == "histogram" and "train/weights_hist/_type" not in views[0]
    page = (wandb_dir / "files" / views[1]["val/token_view/path"]).read_text()
    assert page.count('title="position ') == 2 * 127 and "Top 20 tokens by score" in page
    samples = np.load(run_dir / "token_weights.npz")
    assert (wandb_dir / "files" / "token_weights.npz").read_bytes() == (run_dir / "token_weights.npz").read_bytes()
    assert len(samples["step_ess"]) == 3 and int(samples["n"]) == 32
    assert len(samples["weights"]) == 3 * 256 and (samples["weights"] >= 0.75 - 1e-6).all()  # dense lam=0.75
    assert np.isfinite(samples["scores"]).all() and ((samples["positions"] >= 1) & (samples["positions"] <= 127)).all()


@pytest.mark.process
def test_multirun_sweeps_scorer_by_weighting(cache_dir, tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", "weighting=dense,sparse", "scorer=frozen,self", *SMALL,
           f"paths.cache={cache_dir}", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "metrics.json").exists())
    assert len(jobs) == 4
    for combo in (f"scorer={s},weighting={w}" for s in ("frozen", "self") for w in ("dense", "sparse")):
        assert sum(combo in p.name for p in jobs) == 1, combo  # run directories named by their overrides
    group = sweep.name.encode()
    for job in jobs:
        runs = list((job / "wandb").glob("offline-run-*/*.wandb"))
        assert len(runs) == 1, job
        assert group in runs[0].read_bytes()  # every job's W&B run is in the sweep's group
        job_metrics = json.loads((job / "metrics.json").read_text())
        assert math.isfinite(job_metrics["val/ce"])
        if "weighting=sparse" in job.name:  # kappa=0.25 of M=127 targets: k=31 kept at M/k, 96 zero
            assert job_metrics["train/weight_zero_frac"] == pytest.approx(96 / 127, abs=1e-6)
            assert job_metrics["train/weight_ess"] == pytest.approx(31 / 127, abs=1e-6)
            assert job_metrics["train/weight_max"] == pytest.approx(127 / 31, rel=1e-6)
        else:
            assert job_metrics["train/weight_zero_frac"] == 0 and job_metrics["train/weight_ess"] < 1
    # W&B's config names each group's chosen option beside the flat keys: grouping needs no edits
    from test_loggers import read_run

    config = read_run(runs[0].parent)["config"]
    assert config["weighting"] in ("dense", "sparse") and config["scorer"] in ("frozen", "self")
    assert config["context"] == "theta" and config["scorer.n"] == 32
    # the sweep report reads the real job directories: one row per configuration, training histograms
    from lctw.runs.report import report

    out = report(str(sweep))
    table = pd.read_csv(out / "report.csv", index_col=0)
    assert len(table) == 4 and (table["seeds"] == 1).all() and set(table["scorer"]) == {"frozen", "self"}
    assert table["train/weight_ess_mean mean"].between(0, 1).all() and (out / "histograms.png").exists()


@pytest.mark.process
def test_bad_option_on_the_command_line_names_the_key(tmp_path):
    cmd = [sys.executable, "train.py", "weighting=sparse", "weighting.kappa=1.5", f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "weighting.kappa=1.5 is out of range: allowed (0, 1]" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.integration
def test_small_scorer_trains_with_its_own_cached_base(cache_dir, tmp_path):
    """scorer=small builds its own (2-layer) base at n with the same tokenizer and scores with it."""
    cfg = compose([*SMALL, "scorer=small", "+scorer.model.base.trainer.max_steps=4", "callbacks=none",
                   "trainer.max_steps=2", "trainer.val_check_interval=2"], cache=cache_dir)
    metrics = train(cfg, run_dir=tmp_path)
    assert math.isfinite(metrics["train/loss"]) and metrics["train/score_mean"] > 0
    assert metrics["train/weight_zero_frac"] == 0 and metrics["train/weight_ess"] < 1  # dense, non-uniform
    bases = [OmegaConf.load(p) for p in Path(cache_dir, "tiny").glob("*/config.yaml")]
    assert {b.model.num_hidden_layers for b in bases} >= {2, 4}


@pytest.mark.integration
def test_resume_from_a_checkpoint_without_theta0(trained_run, cache_dir, tmp_path):
    """The checkpoint holds θ, not θ0; resuming rebuilds θ0 from its spec and continues from step 3."""
    run_dir, _ = trained_run
    cfg = compose([*SMALL, "trainer.max_steps=4", "trainer.val_check_interval=1",
                   f"ckpt_path={run_dir}/checkpoints/last.ckpt"], cache=cache_dir)
    metrics = train(cfg, run_dir=tmp_path)
    assert math.isfinite(metrics["val/ce"]) and metrics["train/weight_ess"] < 1
    resumed = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 4 and not any(k.startswith("scorer") for k in resumed["state_dict"])


@pytest.mark.integration
@pytest.mark.parametrize("fault, message", [
    ("truncated", r"is not a PyTorch checkpoint"),  # the config check reads the zip directory first
    ("edited", r"is corrupted: its SHA-256 differs"),
    ("garbage", r"is not a PyTorch checkpoint"),
    ("foreign", r"is for another θ \(model: checkpoint .*'hidden_size': 128.*now .*'hidden_size': 64"),
    ("missing", r"does not exist"),
])
def test_a_bad_checkpoint_is_refused_by_name_before_any_model_loads(trained_run, cache_dir, tmp_path, monkeypatch,
                                                                    fault, message):
    import shutil

    from lctw import models

    run_dir, _ = trained_run
    ckpt = tmp_path / "bad.ckpt"
    shutil.copy(run_dir / "checkpoints" / "last.ckpt", ckpt)
    shutil.copy(run_dir / "checkpoints" / "last.ckpt.sha256", f"{ckpt}.sha256")
    data = ckpt.read_bytes()
    overrides = []
    if fault == "truncated":
        ckpt.write_bytes(data[: len(data) // 2])
    elif fault == "edited":
        ckpt.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])
    elif fault == "garbage":
        ckpt.write_bytes(b"not a checkpoint at all")
        os.remove(f"{ckpt}.sha256")
    elif fault == "foreign":
        overrides = ["model.hidden_size=64"]
    else:
        ckpt = tmp_path / "nope.ckpt"
    monkeypatch.setattr(models.HFModel, "load", lambda self, weights=True: pytest.fail("a model was loaded"))
    cfg = compose([*SMALL, *overrides, f"ckpt_path={ckpt}"], cache=cache_dir)
    with pytest.raises(ValueError, match=message) as err:
        train(cfg, run_dir=tmp_path / "run")
    assert str(ckpt) in str(err.value)
