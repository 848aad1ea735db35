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

import pytest
import torch
from conftest import ROOT, SMALL, compose
from transformers import AutoModelForCausalLM

from lctw.experiment import run


def test_default_experiment_end_to_end(cache_dir, tmp_path):
    cfg = compose(SMALL, cache=cache_dir)
    assert (cfg.scorer._target_, cfg.weighting._target_, cfg.context.method) == (
        "lctw.scoring.FrozenScorer", "lctw.weighting.Dense", "theta")
    metrics = run(cfg, run_dir=tmp_path)
    for key in ("train/loss", "train/ce", "train/weight_std", "train/weight_max", "train/weight_zero_frac",
                "train/weight_ess", "train/weight_mass_beyond_n", "train/tokens_per_s", "val/ce", "val/ppl",
                "val/ce_within_n", "val/ce_beyond_n"):
        assert math.isfinite(metrics[key]), key
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/ce"]), rel=1e-4)
    # the base really was pretrained at n: far better than chance on held-out essays
    base = json.loads(next(Path(cache_dir, "tiny").glob("*/lctw_base.json")).read_text())
    assert base["n"] == 32 and base["metrics"]["val/ce"] < math.log(4096)
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["val/ce"] == metrics["val/ce"]
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert exported.config.max_position_embeddings == 128
    assert exported.config.rope_parameters["rope_theta"] > 10000.0  # extended θ, not θ0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert not any(k.startswith("scorer") for k in ckpt["state_dict"])  # θ0 is not saved with θ


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
        assert math.isfinite(json.loads((job / "metrics.json").read_text())["val/ce"])


def test_bad_option_on_the_command_line_names_the_key(tmp_path):
    cmd = [sys.executable, "train.py", "weighting=sparse", "weighting.kappa=1.5", f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "weighting.kappa=1.5 is out of range: allowed (0, 1]" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
