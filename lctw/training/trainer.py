"""The Lightning Trainer of a run (``conf/trainer/``): its values checked before anything loads, the ranks
it trains on, the global batch, and the Trainer built for a run directory.

Lightning refuses a bad ``limit_val_batches``, an accelerator this machine lacks or a ``devices`` beyond it
only after θ and the data have loaded; :func:`check_trainer` refuses them first, with the key and what is allowed.
``${accumulation:...}`` and ``${slurm_tasks:...}`` are resolvers that :mod:`lctw.config` registers.
"""

from __future__ import annotations

import logging
import os
import re
from datetime import timedelta
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from lctw.errors import ConfigError, check_lowest
from lctw.threads import cores

log = logging.getLogger(__name__)

# Trainer values Lightning would refuse late: the lowest allowed, what the message adds, other allowed values
LOWEST = {"trainer.max_steps": (1, " (optimizer steps), or -1 (no step limit: trainer.max_epochs decides)", -1),
          "trainer.accumulate_grad_batches": (1, ""), "trainer.check_val_every_n_epoch": (1, ""),
          "trainer.num_nodes": (1, ""), "trainer.gradient_clip_val": (0, ", or null (no clipping)")}
FSDP2 = "lctw.training.distributed.FSDP2Strategy"
_TIME = re.compile(r"\d+:\d+:\d+:\d+")  # Lightning's time-based val_check_interval, DD:HH:MM:SS


def check_trainer(cfg: DictConfig, machine: bool = True) -> None:
    """``cfg.trainer``'s values, and no evaluation inside a sharded run; ``machine``: also the accelerator and
    devices against what torch sees here, the global batch and who starts the ranks (not for ``score.py``,
    which does not train)."""
    trainer = cfg.trainer
    check_lowest(cfg, LOWEST)
    for key in ("limit_train_batches", "limit_val_batches"):
        if trainer.get(key) is not None:
            _batches(f"trainer.{key}", trainer[key])
    interval = trainer.get("val_check_interval")
    if isinstance(interval, str) and not _TIME.fullmatch(interval):
        raise ConfigError(f"trainer.val_check_interval={interval!r} is not allowed: a time is 'DD:HH:MM:SS'")
    if isinstance(interval, DictConfig):
        try:
            timedelta(**interval)
        except TypeError as err:
            raise ConfigError(f"trainer.val_check_interval={OmegaConf.to_container(interval)}: {err}") from None
    if isinstance(interval, (int, float)):
        _batches("trainer.val_check_interval", interval)
        if isinstance(interval, float) and trainer.get("check_val_every_n_epoch") is None:
            raise ConfigError(f"trainer.val_check_interval={interval} is a fraction of an epoch, which needs "
                              "trainer.check_val_every_n_epoch (it is null: val_check_interval counts training "
                              "batches); allowed an int >= 1 or a time 'DD:HH:MM:SS'")
    if cfg.get("eval") and is_fsdp2(trainer):
        raise ConfigError("eval is not run inside a trainer=fsdp run (θ is sharded over the ranks): set eval=null "
                          "and evaluate the exported θ afterwards, python eval.py ckpt=<run dir> eval=<name>")
    if machine:
        _check_machine(trainer)
        _check_batch(cfg)
        check_launch(cfg)


def is_fsdp2(trainer) -> bool:
    """Whether a trainer node shards θ with :class:`lctw.training.distributed.FSDP2Strategy` (``trainer=fsdp``)."""
    strategy = trainer.get("strategy") if trainer is not None else None
    return hasattr(strategy, "get") and strategy.get("_target_") == FSDP2


def _batches(key: str, value) -> None:
    """Lightning's batch counts: an int >= 1 (batches) or a float in (0, 1] (a fraction of the epoch)."""
    if not (value >= 1 if isinstance(value, int) else 0 < value <= 1):
        raise ConfigError(f"{key}={value} is out of range: allowed an int >= 1 (batches) or a float in (0, 1] "
                          "(a fraction of the epoch)")


def _check_machine(trainer: DictConfig) -> None:
    from lightning.pytorch.accelerators import AcceleratorRegistry as registry

    accelerator = trainer.get("accelerator", "auto")
    if not isinstance(accelerator, str):
        return  # an Accelerator object from a _target_ node knows its own devices
    kinds = [*sorted(registry.available_accelerators()), "gpu", "auto"]  # cpu, cuda, mps, tpu: those registered
    if accelerator not in kinds:
        raise ConfigError(f"trainer.accelerator={accelerator!r} is not allowed: choose one of {kinds}")
    order = {"auto": ("tpu", "mps", "cuda", "cpu"), "gpu": ("mps", "cuda")}.get(accelerator, (accelerator,))
    kind = next((k for k in order if registry[k]["accelerator"].is_available()), None)  # Lightning's own order
    if kind is None:
        raise ConfigError(f"trainer.accelerator={accelerator} is not available on this machine (torch sees no "
                          f"{'GPU' if accelerator in ('gpu', 'cuda', 'mps') else accelerator}; "
                          f"torch.cuda.is_available() is False): use trainer=cpu or trainer.accelerator=cpu")
    count, devices = registry[kind]["accelerator"].auto_device_count(), trainer.get("devices", "auto")
    if devices == "auto":
        return
    shown = OmegaConf.to_container(devices) if isinstance(devices, ListConfig) else devices
    if isinstance(devices, str):  # Lightning also takes "2", "-1" and "0,1"
        parts = [p.strip() for p in devices.split(",") if p.strip()]
        if not parts or not all(re.fullmatch(r"-?\d+", p) for p in parts):
            raise ConfigError(f"trainer.devices={devices!r} is not allowed: an int, a list of device indices, "
                              "'auto', or such a string ('2', '0,1')")
        devices = [int(p) for p in parts] if "," in devices else int(parts[0])
    if kind == "cpu":
        here = cores()
        if not isinstance(devices, int) or not 1 <= devices <= here:
            raise ConfigError(f"trainer.devices={shown!r} is not allowed with accelerator={accelerator} on this "
                              f"machine: allowed 1 … {here} (processes on its {here} CPU cores)")
    elif isinstance(devices, int) and devices != -1 and not 1 <= devices <= count:
        raise ConfigError(f"trainer.devices={shown} is out of range: torch sees {count} {kind} device(s) on "
                          f"this machine; allowed 1 … {count}, or -1 (all)")
    elif not isinstance(devices, int) and (not devices or any(not 0 <= i < count for i in devices)):
        raise ConfigError(f"trainer.devices={shown} is out of range: torch sees {count} {kind} device(s) on this "
                          f"machine; allowed indices 0 … {count - 1}")


# -- ranks and the global batch: global_batch = data.batch_size × ranks × accumulation -------------------------
def ranks(devices, num_nodes=1) -> int:
    """Processes that train in parallel: devices per node (``-1``/``auto``: the GPUs torch sees) × nodes."""
    if isinstance(devices, (list, ListConfig)):
        per_node = len(devices)
    elif devices in (-1, "-1", "auto"):
        per_node = torch.cuda.device_count()
        if per_node == 0:
            raise ConfigError(f"trainer.devices={devices!r} means every GPU, but torch sees none on this machine: "
                              "give the number of GPUs per node, trainer.devices=<int>")
    elif isinstance(devices, str):
        per_node = len([p for p in devices.split(",") if p.strip()]) if "," in devices else int(devices)
    else:
        per_node = int(devices)
    return per_node * int(num_nodes or 1)


def slurm_tasks(devices) -> int:
    """``${slurm_tasks:${trainer.devices}}`` (``conf/hydra/launcher/slurm.yaml``): tasks (= GPUs) per node, which
    sbatch fixes before the job starts, on a node the submitting machine has not seen."""
    if devices in (-1, "-1", "auto") or ranks(devices, 1) < 1:
        raise ConfigError(f"trainer.devices={devices} with hydra/launcher=slurm: sbatch needs the tasks per node "
                          "(hydra.launcher.tasks_per_node and gpus_per_node, one task per GPU) before the job starts, "
                          "and -1/auto would count the GPUs of a node not yet allocated; allowed an int >= 1, the GPUs "
                          "per node (e.g. trainer.devices=8)")
    return ranks(devices, 1)


def accumulation(global_batch: int, batch_size: int, devices, num_nodes) -> int:
    """``${accumulation:${global_batch},${data.batch_size},${trainer.devices},${trainer.num_nodes}}``:
    the gradient accumulation that makes a step ``global_batch`` sequences, batch_size × ranks × accumulation."""
    per_step = int(batch_size) * ranks(devices, num_nodes)
    if per_step < 1 or global_batch % per_step:
        raise ConfigError(f"global_batch={global_batch} sequences per step is not a multiple of data.batch_size="
                          f"{batch_size} × {ranks(devices, num_nodes)} ranks (trainer.devices={devices} × "
                          f"trainer.num_nodes={num_nodes}) = {per_step}: change data.batch_size or the number of GPUs")
    return global_batch // per_step


def resolve_accumulation(cfg: DictConfig) -> None:
    """The ``${accumulation:...}`` resolver's refusal as the ConfigError it is (OmegaConf wraps it); first,
    since every later check reads the trainer node."""
    from omegaconf.errors import InterpolationResolutionError

    try:
        (cfg.get("trainer") or {}).get("accumulate_grad_batches")
    except InterpolationResolutionError as err:
        prefix = "ConfigError raised while resolving interpolation: "
        if str(err).startswith(prefix):
            raise ConfigError(str(err).removeprefix(prefix).splitlines()[0]) from None
        raise


def _check_batch(cfg: DictConfig) -> None:
    """``global_batch`` (sequences per optimizer step, when set) = data.batch_size × ranks × accumulation."""
    if cfg.get("global_batch") is None or cfg.get("data") is None:
        return
    devices, per_device = cfg.trainer.get("devices", 1), cfg.data.get("batch_size", 1)
    if devices in (-1, "-1", "auto") and not torch.cuda.is_available():
        return  # every GPU of the machine that trains: unknown here
    accumulate = cfg.trainer.get("accumulate_grad_batches", 1)
    total = per_device * ranks(devices, cfg.trainer.get("num_nodes", 1)) * accumulate
    if total != cfg.global_batch:
        raise ConfigError(f"global_batch={cfg.global_batch} but data.batch_size={per_device} × "
                          f"{total // (per_device * accumulate)} ranks × trainer.accumulate_grad_batches={accumulate} "
                          f"= {total} sequences per step: leave trainer.accumulate_grad_batches to the "
                          "${accumulation:...} interpolation, or set global_batch=null")


# -- who starts the ranks -----------------------------------------------------------------------------------------
def _launches_ranks(trainer: DictConfig) -> bool:
    """Whether Lightning would start the ranks itself by re-running this command (its subprocess launcher:
    ddp, fsdp and model-parallel strategies on more than one device or node, unless a cluster or torchrun
    started the processes)."""
    strategy = trainer.get("strategy", "auto")
    name = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy)
    if not any(k in name.lower() for k in ("ddp", "fsdp", "modelparallel")) or name.startswith("ddp_spawn"):
        return False
    if any(k in os.environ for k in ("LOCAL_RANK", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID")):
        return False
    devices, nodes = trainer.get("devices", "auto"), trainer.get("num_nodes", 1)
    return nodes > 1 or devices not in (1, "1") and not (isinstance(devices, ListConfig) and len(devices) == 1)


def check_launch(cfg: DictConfig) -> None:
    """A local ``-m`` sweep cannot run a multi-rank trainer: Lightning starts the other ranks by re-running
    the command line, ``-m`` included, so each rank would start the whole sweep again. Refused before
    anything loads, with the ways that work (docs/cluster.md, "Several GPUs on one machine")."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN or "BasicLauncher" not in str(hydra_cfg.launcher.get("_target_", "")):
        return
    if _launches_ranks(cfg.trainer):
        raise ConfigError(
            f"trainer.strategy with trainer.devices={cfg.trainer.get('devices')} in a local -m sweep: Lightning starts "
            "the other ranks by re-running this command, -m included, so every rank would run the whole sweep. Run "
            "the grid as one command per point (e.g. `for lam in 0.25 0.5 0.75; do python train.py trainer=fsdp "
            "weighting.lam=$lam; done`), or through a launcher that starts the ranks itself (hydra/launcher=slurm), "
            "or with trainer.devices=1"
        )


def build_trainer(cfg: DictConfig, run_dir: Path, logger, callbacks: list, plugins: list):
    """The run's Trainer: its checkpoints under ``<run_dir>/checkpoints`` unless a callback names a directory;
    logs the effective batch."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    for cb in callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
            cb.dirpath = str(run_dir / "checkpoints")
    trainer = instantiate(cfg.trainer, logger=logger or False, callbacks=callbacks, default_root_dir=str(run_dir),
                          plugins=plugins)
    per_device = cfg.data.get("batch_size", 1)
    log.info("effective batch: %d sequences per optimizer step = %d per device × %d devices × %d accumulation",
             per_device * trainer.world_size * trainer.accumulate_grad_batches, per_device, trainer.world_size,
             trainer.accumulate_grad_batches)
    return trainer
