"""What is not ours to type-check: Lightning's Trainer values that it would refuse only after loading, the
accelerator and devices against this machine, and the global batch (:mod:`lctw.config`)."""

from __future__ import annotations

import os
import re
from datetime import timedelta

from omegaconf import DictConfig, ListConfig, OmegaConf

from lctw.errors import ConfigError
from lctw.training.distributed import ranks

_TIME = re.compile(r"\d+:\d+:\d+:\d+")  # Lightning's time-based val_check_interval, DD:HH:MM:SS


def _batches(key: str, value) -> None:
    """Lightning's batch counts: an int >= 1 (batches) or a float in (0, 1] (a fraction of the epoch)."""
    if not (value >= 1 if isinstance(value, int) else 0 < value <= 1):
        raise ConfigError(f"{key}={value} is out of range: allowed an int >= 1 (batches) or a float in (0, 1] "
                          "(a fraction of the epoch)")


def check_trainer(trainer: DictConfig, machine: bool = True) -> None:
    """``trainer``'s batch counts and validation interval (its ranges are in :data:`lctw.config.RANGES`);
    ``machine``: also the accelerator and devices against what torch sees here."""
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
    if machine:
        _check_machine(trainer)


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
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if not isinstance(devices, int) or not 1 <= devices <= cores:
            raise ConfigError(f"trainer.devices={shown!r} is not allowed with accelerator={accelerator} on this "
                              f"machine: allowed 1 … {cores} (processes on its {cores} CPU cores)")
    elif isinstance(devices, int) and devices != -1 and not 1 <= devices <= count:
        raise ConfigError(f"trainer.devices={shown} is out of range: torch sees {count} {kind} device(s) on "
                          f"this machine; allowed 1 … {count}, or -1 (all)")
    elif not isinstance(devices, int) and (not devices or any(not 0 <= i < count for i in devices)):
        raise ConfigError(f"trainer.devices={shown} is out of range: torch sees {count} {kind} device(s) on this "
                          f"machine; allowed indices 0 … {count - 1}")


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


def check_batch(cfg: DictConfig) -> None:
    """``global_batch`` (sequences per optimizer step, when set) = data.batch_size × ranks × accumulation."""
    if cfg.get("global_batch") is None or cfg.get("data") is None:
        return
    devices, per_device = cfg.trainer.get("devices", 1), cfg.data.get("batch_size", 1)
    if devices in (-1, "-1", "auto"):
        import torch

        if not torch.cuda.is_available():  # every GPU of the machine that trains: unknown here
            return
    accumulate = cfg.trainer.get("accumulate_grad_batches", 1)
    total = per_device * ranks(devices, cfg.trainer.get("num_nodes", 1)) * accumulate
    if total != cfg.global_batch:
        raise ConfigError(f"global_batch={cfg.global_batch} but data.batch_size={per_device} × "
                          f"{total // (per_device * accumulate)} ranks × trainer.accumulate_grad_batches={accumulate} "
                          f"= {total} sequences per step: leave trainer.accumulate_grad_batches to the "
                          "${accumulation:...} interpolation, or set global_batch=null")
