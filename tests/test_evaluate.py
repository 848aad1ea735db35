"""eval.py (lctw/eval/evaluate.py) on what a run leaves: its directory and its Lightning checkpoint."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from conftest import ROOT


@pytest.mark.process
def test_eval_py_on_a_run_directory_and_on_its_checkpoint(trained_run, cache_dir, tmp_path):
    run_dir, _ = trained_run
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1", "LCTW_CACHE": cache_dir}
    tasks = "[niah_single_1,niah_multikey_2]"
    cmd = [sys.executable, "eval.py", f"ckpt={run_dir}", "eval=ruler", f"eval.tasks={tasks}", "eval.lengths=[512]",
           "eval.samples=2", "logger=csv", f"hydra.run.dir={tmp_path}/ruler"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = pd.read_csv(tmp_path / "ruler" / "eval" / "ruler_scores.csv", index_col=0)
    assert list(scores.index) == ["niah_single_1", "niah_multikey_2", "average"]
    assert scores["512"].between(0, 100).all()
    assert "eval/ruler/average/512" in json.loads((tmp_path / "ruler" / "eval_metrics.json").read_text())
    # the Lightning checkpoint gives the same model as the exported one
    cmd = [sys.executable, "eval.py", f"ckpt={run_dir}/checkpoints/last.ckpt", "eval=ppl", "logger=none",
           f"hydra.run.dir={tmp_path}/ppl"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from_ckpt = pd.read_csv(tmp_path / "ppl" / "eval" / "position_ce.csv", index_col=0)
    from_train = pd.read_csv(run_dir / "eval" / "position_ce.csv", index_col=0)
    pd.testing.assert_frame_equal(from_ckpt, from_train, rtol=1e-4)
