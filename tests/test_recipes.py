"""The README's "add your own scorer / weighting / context extension" recipes, followed from outside
the package: one class each (tests/toy_parts.py) and one YAML each in a config directory of our own,
run through train.py overrides in a real subprocess."""

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import ROOT, SMALL, compose
from transformers import AutoConfig

from lctw.config import validate

TESTS = os.path.join(ROOT, "tests")
YAMLS = {
    "scorer/unigram.yaml": "_target_: toy_parts.UnigramScorer\nn: ${n}\nmax_len: ${N}\n",
    "weighting/tempered.yaml": "_target_: toy_parts.Tempered\ntemperature: 0.5\n",
    "context/scaled_theta.yaml": "_target_: toy_parts.ScaledTheta\nmax_len: ${N}\nn: ${n}\nscale: 8.0\n",
}


@pytest.mark.process
def test_toy_scorer_weighting_and_context_run_through_train_py(cache_dir, tmp_path):
    conf = tmp_path / "conf"
    for rel, text in YAMLS.items():
        (conf / rel).parent.mkdir(parents=True, exist_ok=True)
        (conf / rel).write_text(text)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train.py", f"hydra.searchpath=[file://{conf}]", "scorer=unigram", "weighting=tempered",
           "context=scaled_theta", *SMALL, "callbacks=none", f"paths.cache={cache_dir}",
           f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, TESTS]), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert math.isfinite(metrics["val/ce"]) and metrics["train/score_mean"] > 0  # the toy θ' scored
    assert metrics["train/weight_ess"] < 1 and metrics["train/weight_zero_frac"] == 0  # softmax weights
    config = AutoConfig.from_pretrained(run_dir / "hf")
    assert config.rope_parameters["rope_theta"] == pytest.approx(10000.0 * 8)  # the toy extension
    # a bad value of the toy part is refused under its config key by the one validation layer
    bad = compose([f"hydra.searchpath=[file://{conf}]", "scorer=unigram", "weighting=tempered", "context=scaled_theta",
                   *SMALL, "weighting.temperature=0"], cache=cache_dir)
    with pytest.raises(ValueError, match=r"^weighting\.temperature=0 is out of range: allowed > 0"):
        validate(bad)
