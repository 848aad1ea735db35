"""The base stage (lctw/training/base.py): θ0 of the tiny model, built once whoever asks for it."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.process
def test_parallel_processes_build_the_tiny_base_once(tmp_path):
    """DDP ranks or parallel sweep jobs on a fresh cache: one process builds the tokenizer and base, the
    other waits for them (a file lock) and loads the same weights."""
    script = (
        "import logging, sys, torch; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
        "from lctw.data import essays\nfrom lctw.models import TinyLlama\nfrom lctw.training.base import prepare\n"
        "torch.set_num_threads(1)\n"
        f"m = TinyLlama(n=16, cache_dir={str(tmp_path)!r}, vocab_size=300, hidden_size=16, num_hidden_layers=1,"
        " num_attention_heads=2, num_key_value_heads=2, intermediate_size=32,"
        " base={'trainer': {'max_steps': 2}, 'data': {'batch_size': 2}}, corpus=essays)\n"
        "prepare(m); m = m.load()\n"
        "print('SUM', float(sum(p.sum() for p in m.parameters())))\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(o.count("building the tiny base model") for o in outs) == 1, outs
    sums = {line for o in outs for line in o.splitlines() if line.startswith("SUM")}
    assert len(sums) == 1, sums


def test_the_base_key_drops_only_what_never_changes_theta():
    """A run's own keys (name, paths, eval, …) and any node's cache_dir/num_workers leave θ0's key alone; a
    node's ``name`` is not the run's name (data.name is the dataset) and changes it."""
    from omegaconf import OmegaConf

    from lctw.training.base import config_key

    cfg = {"name": "a", "paths": {"cache": "/x"}, "eval": {"kind": "copy"}, "n": 16,
           "model": {"hidden_size": 16, "cache_dir": "/x"}, "data": {"name": "essays", "num_workers": 0}}
    key = config_key(OmegaConf.create(cfg))
    same = {**cfg, "name": "b", "paths": {"cache": "/y"}, "eval": None, "model": {"hidden_size": 16, "cache_dir": "/y"},
            "data": {"name": "essays", "num_workers": 4}}
    assert config_key(OmegaConf.create(same)) == key
    for other in ({**cfg, "data": {"name": "emozilla/pg19", "num_workers": 0}}, {**cfg, "n": 32},
                  {**cfg, "model": {"hidden_size": 32, "cache_dir": "/x"}}):
        assert config_key(OmegaConf.create(other)) != key
