"""lctw.training.trainer: the Trainer's values before anything loads, the ranks, the global batch, who starts the
ranks, and the Trainer a run gets. The catalogue of refused values is tests/test_validation.py."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import compose
from lightning.pytorch.callbacks import ModelCheckpoint

from lctw.config import ConfigError, validate
from lctw.training.trainer import accumulation, build_trainer, ranks, slurm_tasks

pytestmark = pytest.mark.usefixtures("hydra_conf")


def test_ranks_are_devices_per_node_times_nodes():
    assert ranks(4, 2) == 8
    assert ranks([0, 3]) == 2
    assert ranks("0,1,2") == 3
    assert ranks("2", None) == 2  # num_nodes left out of a config: one node


@pytest.mark.skipif(torch.cuda.is_available(), reason="-1 counts the GPUs torch sees")
def test_all_gpus_on_a_machine_without_one_is_refused():
    with pytest.raises(ConfigError, match=r"trainer\.devices=-1 means every GPU, but torch sees none"):
        ranks(-1)


def test_accumulation_makes_the_global_batch_or_names_what_to_change():
    assert accumulation(16, 1, 8, 1) == 2
    assert accumulation(16, 2, [0, 1], 2) == 2
    with pytest.raises(ConfigError, match=r"global_batch=16 .* data\.batch_size=3 × 2 ranks .* = 6"):
        accumulation(16, 3, 2, 1)


def test_slurm_needs_the_gpus_per_node_before_the_job_starts():
    assert slurm_tasks(8) == 8
    for devices in (-1, "auto"):
        with pytest.raises(ConfigError, match=r"hydra/launcher=slurm: sbatch needs the tasks per node"):
            slurm_tasks(devices)


def test_global_batch_sets_the_accumulation_for_any_number_of_gpus(tmp_path):
    for devices, nodes, accumulate in ((1, 1, 16), (8, 1, 2), (4, 2, 2), (16, 1, 1)):
        cfg = compose(["experiment=paper_llama3", f"trainer.devices={devices}", f"trainer.num_nodes={nodes}"],
                      cache=str(tmp_path))
        assert cfg.trainer.accumulate_grad_batches == accumulate  # 1 per GPU × GPUs × accumulation = 16
    with pytest.raises(ConfigError, match=r"global_batch=16 .* not a multiple of .* 3 ranks"):
        validate(compose(["experiment=paper_llama3", "trainer.devices=3"], cache=str(tmp_path)))


def test_a_local_multirun_cannot_start_ranks(tmp_path, monkeypatch):
    """Lightning re-runs the command line (-m included) to start ranks: a local sweep of fsdp/ddp runs is
    refused with the ways that work; one device, or ranks started by SLURM or torchrun, are fine."""
    from hydra import compose as hydra_compose
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lctw.training.trainer import check_launch

    for key in ("LOCAL_RANK", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    def configure(mode):
        cfg = hydra_compose("config", overrides=["trainer=fsdp", "trainer.devices=2", f"paths.cache={tmp_path}"],
                            return_hydra_config=True)
        cfg.hydra.mode = mode
        HydraConfig.instance().set_config(cfg)
        return cfg

    cfg = configure(RunMode.MULTIRUN)
    try:
        with pytest.raises(ConfigError, match=r"local -m sweep: Lightning starts the other ranks .*for lam in"):
            check_launch(cfg)
        cfg.trainer.strategy = "ddp"
        with pytest.raises(ConfigError, match="local -m sweep"):
            check_launch(cfg)
        cfg.trainer.devices = 1
        check_launch(cfg)  # one rank: nothing is re-run
        cfg.trainer.devices = 2
        monkeypatch.setenv("SLURM_NTASKS", "2")
        check_launch(cfg)  # SLURM started the ranks
        monkeypatch.delenv("SLURM_NTASKS")
        check_launch(configure(RunMode.RUN))  # a single run: Lightning's re-run is that run
    finally:
        HydraConfig.instance().cfg = None

def test_the_trainer_keeps_its_checkpoints_in_the_run_directory_and_logs_the_batch(tmp_path, caplog):
    cfg = compose(["trainer.max_steps=1"], cache=str(tmp_path))
    own = ModelCheckpoint(dirpath=str(tmp_path / "elsewhere"), every_n_train_steps=5)  # a state of its own
    with caplog.at_level(logging.INFO, logger="lctw.training.trainer"):
        trainer = build_trainer(cfg, tmp_path / "run", None, [ModelCheckpoint(), own], plugins=[])
    dirs = [cb.dirpath for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    assert dirs == [str(tmp_path / "run" / "checkpoints"), str(tmp_path / "elsewhere")]
    assert trainer.default_root_dir == str(tmp_path / "run") and trainer.max_steps == 1
    batch = cfg.data.batch_size * cfg.trainer.accumulate_grad_batches
    assert f"effective batch: {batch} sequences per optimizer step" in caplog.text
