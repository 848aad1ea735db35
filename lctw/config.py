"""The one validation layer: every entry point calls :func:`validate` (``eval.py``:
:func:`validate_evaluation`) before anything loads or is written.

Three kinds of check, in this order:

* **Types**, for every node with a ``_target_`` (``weighting``, ``trainer``, ``data``, ``eval``, nested
  ones such as ``scorer.model``) against the type annotations of its target's constructor, and for the
  top-level keys against :data:`TRAIN_KEYS` / :data:`EVAL_KEYS`: ``int`` is not ``bool``, ``float``
  accepts an ``int`` but not a ``bool`` or a string, ``X | None``, ``list[int]``, ``Literal[...]``;
  annotations that cannot be checked (``Any``, callables, unresolvable names) accept anything. Values
  are never coerced: ``weighting.lam=true`` would otherwise train with lam = 1.0. A key the target
  does not take (``+weighting.lamm=0.5``) is refused with the nearest valid key.
* **Values** of the parts: each part's constructor checks only its own arguments and raises plain
  errors about them (``lam=1.5 is out of range: allowed [0, 1]``); :func:`build` reports them under the
  config key they came from (``weighting.lam=1.5 is out of range: allowed [0, 1]``). Lightning's
  Trainer and the entry points' own keys are not ours, so their values are checked here
  (:func:`check_trainer`, :func:`check_checkpoint`, :func:`check_device`), including the accelerator
  and devices against what torch sees on this machine.
* **Cross-key invariants** (n < N, a weighting that needs scores, a cache that needs a fixed scorer,
  the small scorer's vocabulary), here and nowhere else.

Tokenizers are cheap and are compared here; no model weights and no data are ever loaded by
:func:`validate`.

One cohesive thing at about 550 lines: every rule a configuration must satisfy, in one place that a
user who hits a refusal can read end to end (the issue's "one invariant, one check").
"""

from __future__ import annotations

import collections.abc
import difflib
import inspect
import logging
import os
import re
import types
import typing
import zipfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path, PurePath
from typing import Any, Literal

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from lctw.loss import KERNELS, kernel_problem
from lctw.models import DTYPES, is_local_path

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key, the value and what is allowed."""


def _register_resolvers() -> None:
    from lctw.jobs import run_token

    if not OmegaConf.has_resolver("div"):
        OmegaConf.register_new_resolver("div", lambda a, b: a / b)
    if not OmegaConf.has_resolver("run_token"):  # unique run directories (lctw.jobs)
        # cached: Hydra copies a config's resolver cache into each job's config, so a job that runs in
        # another process (submitit, or a requeued SLURM job) names the sweep directory as its launcher did
        OmegaConf.register_new_resolver("run_token", run_token, use_cache=True)
    if not OmegaConf.has_resolver("accumulation"):  # the paper's 16 sequences per step on any number of GPUs
        OmegaConf.register_new_resolver("accumulation", accumulation)


def ranks(devices, num_nodes) -> int:
    """Processes that train in parallel: devices per node (``-1``/``auto``: the GPUs torch sees) × nodes."""
    if isinstance(devices, (list, ListConfig)):
        per_node = len(devices)
    elif devices in (-1, "-1", "auto"):
        import torch

        per_node = torch.cuda.device_count()
        if per_node == 0:
            raise ConfigError(f"trainer.devices={devices!r} means every GPU, but torch sees none on this machine: "
                              "give the number of GPUs per node, trainer.devices=<int>")
    elif isinstance(devices, str):
        per_node = len([p for p in devices.split(",") if p.strip()]) if "," in devices else int(devices)
    else:
        per_node = int(devices)
    return per_node * int(num_nodes or 1)


def accumulation(global_batch: int, batch_size: int, devices, num_nodes) -> int:
    """``${accumulation:${global_batch},${data.batch_size},${trainer.devices},${trainer.num_nodes}}``:
    the gradient accumulation that makes a step ``global_batch`` sequences, batch_size × ranks × accumulation."""
    per_step = int(batch_size) * ranks(devices, num_nodes)
    if per_step < 1 or global_batch % per_step:
        raise ConfigError(f"global_batch={global_batch} sequences per step is not a multiple of data.batch_size="
                          f"{batch_size} × {ranks(devices, num_nodes)} ranks (trainer.devices={devices} × "
                          f"trainer.num_nodes={num_nodes}) = {per_step}: change data.batch_size or the number of GPUs")
    return global_batch // per_step


_register_resolvers()

# The top-level keys of conf/config.yaml (train.py, score.py) and conf/evaluate.yaml (eval.py); the
# groups are checked against their targets' constructors instead.
TRAIN_KEYS = {"n": int, "N": int, "seed": int, "name": str | None, "chunk_size": int | None,
              "loss": Literal[tuple(KERNELS)], "objective": str, "global_batch": int | None,
              "validate_first": bool, "ckpt_path": str | None, "checkpoint_every": int}
EVAL_KEYS = {"ckpt": str, "gguf_file": str | None, "dtype": Literal[tuple(DTYPES)], "device": str, "n": int,
             "N": int, "seed": int, "name": str | None, "chunk_size": int | None}

INSPECT_KEYS = {**TRAIN_KEYS, "ckpt": str | None, "text": str, "max_tokens": int | None, "top_k": int,
                "dtype": Literal[tuple(DTYPES)], "device": str}


def named(key: str, message: str) -> str:
    """A part's own error under its config key: ``lam=1.5 …`` -> ``weighting.lam=1.5 …``."""
    if message.startswith((f"{key}.", f"{key}=", f"{key}:")):
        return message
    if re.match(r"[A-Za-z_]\w*[=:]", message):
        return f"{key}.{message}"
    return f"{key}: {message}"


def build(node: DictConfig, key: str, **kwargs):
    """``instantiate(node)`` after :func:`check_node`; a constructor's ValueError comes back as a
    :class:`ConfigError` naming ``key``."""
    check_node(node, key)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ValueError):
            # a nested part (eval=all's eval.ruler) is named by the key Hydra reports for it
            nested = re.search(r"\nfull_key: (\S+)", str(err))
            where = nested.group(1) if nested and nested.group(1).startswith(f"{key}.") else key
            raise ConfigError(named(where, str(err.__cause__))) from None
        raise


# -- types ---------------------------------------------------------------------------------------

def _hints(fn) -> dict[str, Any]:
    """``fn``'s resolved annotations; one that cannot be resolved (a name imported only for type
    checkers) is left out, so it accepts anything, instead of losing the others with it."""
    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 (any failure of evaluating annotations means: resolve them one by one)
        fn = inspect.unwrap(fn)
        out = {}
        for name, ann in getattr(fn, "__annotations__", {}).items():
            try:
                out[name] = eval(ann, getattr(fn, "__globals__", {})) if isinstance(ann, str) else ann  # noqa: S307
            except Exception:  # noqa: BLE001, S112
                continue
        return out


def parameters(target) -> tuple[dict[str, Any], bool]:
    """(keyword parameter -> annotation, open) of a class or function that a ``_target_`` names.

    A constructor with ``**kwargs`` usually passes them on to its base class (the scorers do), so the
    bases' parameters are collected too; ``open`` is True when some ``**kwargs`` are not passed to a
    base (``ContextExtension``'s method parameters), and then any key is accepted.
    """
    if isinstance(target, type):
        functions = [k.__init__ for k in target.__mro__ if "__init__" in vars(k) and k is not object]
    else:
        functions = [target]
    params: dict[str, Any] = {}
    for fn in functions:
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):  # builtins without a signature: nothing to check against
            return params, True
        hints = _hints(fn)
        for p in list(signature.parameters.values())[1 if isinstance(target, type) else 0:]:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                params.setdefault(p.name, hints.get(p.name, Any))
        if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            return params, False
    return params, bool(functions)  # no __init__ but object's: a class that takes no arguments


def _members(annotation) -> tuple:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return tuple(m for a in typing.get_args(annotation) for m in _members(a))
    return (annotation,)


def matches(value, annotation) -> bool:
    """Whether a plain config value (after ``OmegaConf.to_container``) has the annotated type."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return True
    if annotation is None or annotation is type(None):
        return value is None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return any(matches(value, a) for a in args)
    if origin is Literal:  # 1 == True in Python: compare the types as well
        return any(value == a and type(value) is type(a) for a in args)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    container = origin or annotation
    if container in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        if not isinstance(value, (list, tuple)):
            return False
        if container is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(matches(v, args[0]) for v in value)
    if container in (dict, collections.abc.Mapping):
        return isinstance(value, dict) and (len(args) < 2 or all(matches(v, args[1]) for v in value.values()))
    if isinstance(annotation, type):
        if issubclass(annotation, (os.PathLike, PurePath)):
            return isinstance(value, (str, annotation))  # the constructor turns the string into a path
        return isinstance(value, annotation)
    return True  # TypeVars, Callable[...], other special forms: not checkable from a config value


def describe(annotation) -> str:
    """``int or null``, ``list of int``, ``'float32', 'bfloat16' or 'float16'``."""
    names = []
    for m in _members(annotation):
        origin, args = typing.get_origin(m), typing.get_args(m)
        if m is None or m is type(None):
            names.append("null")
        elif origin is Literal:
            names += [repr(a) for a in args]
        elif m is bool:
            names.append("bool (true or false)")
        elif origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
            names.append(f"list of {describe(args[0])}" if args else "list")
        elif origin in (dict, collections.abc.Mapping):
            names.append("dict")
        else:
            names.append(getattr(m, "__name__", str(m)))
    names = list(dict.fromkeys(names))
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_value(key: str, value, annotation) -> None:
    """``key=value`` against ``annotation``: a :class:`ConfigError` naming key, value and what is allowed."""
    if matches(value, annotation):
        return
    members = _members(annotation)
    if all(m is None or m is type(None) or typing.get_origin(m) is Literal for m in members):
        allowed = [a for m in members for a in (typing.get_args(m) or (None,))]
        raise ConfigError(f"{key}={value!r} is not allowed: choose one of {allowed}")
    hint = ""
    if isinstance(value, (int, float)) and any(m is str for m in members):
        hint = f" (to pass it as text, quote it: {key}='{value}')"
    raise ConfigError(f"{key}={value!r} has the wrong type: expected {describe(annotation)}{hint}")


def _is_target(value) -> bool:
    return isinstance(value, DictConfig) and "_target_" in value


def target_of(node: DictConfig, key: str):
    """The class or function a node's ``_target_`` names, imported but not called."""
    try:
        return get_object(node._target_)
    except Exception as err:  # noqa: BLE001 (hydra wraps import errors in several types)
        raise ConfigError(f"{key}._target_={node._target_!r} cannot be imported ({err}); the class must be "
                          "importable, e.g. on PYTHONPATH") from None


def check_node(node: DictConfig, key: str) -> None:
    """Keys and value types of a ``_target_`` node (and of the nodes nested in it) against its target's
    constructor, without calling it."""
    path = node._target_
    params, accepts_any = parameters(target_of(node, key))
    for name in node:
        if name.startswith("_"):
            continue
        full = f"{key}.{name}"
        if name not in params and not accepts_any:
            near = difflib.get_close_matches(name, list(params), n=1)
            advice = f"did you mean {key}.{near[0]}?" if near else f"allowed: {sorted(params)}"
            raise ConfigError(f"{full} is not an option of {key} ({path}): {advice}")
        if OmegaConf.is_missing(node, name):
            expected = describe(params.get(name, Any))
            raise ConfigError(f"{full} is missing (???): give it on the command line, {full}=<{expected}>")
        value = node[name]
        if _is_target(value):
            check_node(value, full)
            continue
        if isinstance(value, ListConfig) and any(_is_target(v) for v in value):
            for i, item in enumerate(value):
                if _is_target(item):
                    check_node(item, f"{full}[{i}]")
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        if not matches(value, params.get(name, Any)):
            check_value(_source(node, name, full), value, params.get(name, Any))


def _source(node: DictConfig, name: str, full: str) -> str:
    """The key a value was set under: ``trainer.max_steps`` for ``scheduler.num_training_steps:
    ${trainer.max_steps}``, so that an error names the key the user wrote, not the one that copies it."""
    if OmegaConf.is_interpolation(node, name):
        match = re.fullmatch(r"\$\{([\w.]+)\}", str(OmegaConf.to_container(node, resolve=False)[name]))
        if match:
            return match.group(1)
    return full


def check_keys(cfg: DictConfig, keys: dict[str, Any]) -> None:
    """The top-level keys' types, then every ``_target_`` node anywhere in ``cfg``."""
    for key, annotation in keys.items():
        if key not in cfg.keys():  # `key in cfg` is False for a missing (???) value
            continue
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"{key} is missing (???): give it on the command line, {key}=<{describe(annotation)}>")
        check_value(key, cfg[key], annotation)
    if cfg.get("chunk_size") is not None and cfg.chunk_size < 1:
        raise ConfigError(f"chunk_size={cfg.chunk_size} is out of range: allowed >= 1, or null (the full logits)")
    if cfg.get("checkpoint_every") is not None and cfg.checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every={cfg.checkpoint_every} is out of range: allowed >= 1 (optimizer steps)")
    if cfg.get("objective") is not None and not re.fullmatch(r"(val|train|eval)/\S+", cfg.objective):
        raise ConfigError(f"objective={cfg.objective} is not a metric name: allowed a key of metrics.json, e.g. "
                          "val/ce, val/ce_beyond_n, val/ppl, train/loss, eval/ruler/average/<length>")

    def walk(node, key):
        if _is_target(node):
            check_node(node, key)
        elif isinstance(node, DictConfig):
            for name in node:
                if not OmegaConf.is_missing(node, name):
                    walk(node[name], f"{key}.{name}" if key else name)

    walk(cfg, "")


# -- Lightning's Trainer and the entry points' own keys ------------------------------------------

_TIME = re.compile(r"\d+:\d+:\d+:\d+")  # Lightning's time-based val_check_interval, DD:HH:MM:SS


def _batches(key: str, value) -> None:
    """Lightning's batch counts: an int >= 1 (batches) or a float in (0, 1] (a fraction of the epoch)."""
    ok = value >= 1 if isinstance(value, int) else 0 < value <= 1
    if not ok:
        raise ConfigError(f"{key}={value} is out of range: allowed an int >= 1 (batches) or a float in (0, 1] "
                          "(a fraction of the epoch)")


def check_trainer(trainer: DictConfig, machine: bool = True) -> None:
    """Values of ``trainer`` (types were checked against ``lightning.Trainer``) that Lightning would
    refuse, or crash on, only after the model and the data have loaded; ``machine``: also the
    accelerator and devices against what torch sees here."""
    steps = trainer.get("max_steps", -1)
    if steps != -1 and steps < 1:
        raise ConfigError(f"trainer.max_steps={steps} is out of range: allowed >= 1 (optimizer steps), or -1 "
                          "(no step limit: trainer.max_epochs decides)")
    for key in ("accumulate_grad_batches", "check_val_every_n_epoch", "num_nodes"):
        value = trainer.get(key)
        if value is not None and value < 1:
            raise ConfigError(f"trainer.{key}={value} is out of range: allowed >= 1")
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
    clip = trainer.get("gradient_clip_val")
    if clip is not None and clip < 0:
        raise ConfigError(f"trainer.gradient_clip_val={clip} is out of range: allowed >= 0, or null (no clipping)")
    if machine:
        _check_machine(trainer)


def _check_machine(trainer: DictConfig) -> None:
    from lightning.pytorch.accelerators import AcceleratorRegistry

    accelerator = trainer.get("accelerator", "auto")
    if not isinstance(accelerator, str):
        return  # an Accelerator object from a _target_ node knows its own devices
    kinds = sorted(AcceleratorRegistry.available_accelerators())  # cpu, cuda, mps, tpu: the ones registered
    if accelerator not in (*kinds, "gpu", "auto"):
        raise ConfigError(f"trainer.accelerator={accelerator!r} is not allowed: choose one of "
                          f"{[*kinds, 'gpu', 'auto']}")
    # Lightning's own order for auto and gpu
    order = {"auto": ("tpu", "mps", "cuda", "cpu"), "gpu": ("mps", "cuda")}.get(accelerator, (accelerator,))
    kind = next((k for k in order if AcceleratorRegistry[k]["accelerator"].is_available()), None)
    if kind is None:
        raise ConfigError(f"trainer.accelerator={accelerator} is not available on this machine (torch sees no "
                          f"{'GPU' if accelerator in ('gpu', 'cuda', 'mps') else accelerator}; "
                          f"torch.cuda.is_available() is False): use trainer=cpu or trainer.accelerator=cpu")
    count = AcceleratorRegistry[kind]["accelerator"].auto_device_count()
    devices = trainer.get("devices", "auto")
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
        return
    if isinstance(devices, int):
        if devices != -1 and not 1 <= devices <= count:
            raise ConfigError(f"trainer.devices={shown} is out of range: torch sees {count} {kind} device(s) on "
                              f"this machine; allowed 1 … {count}, or -1 (all)")
    elif not devices or any(not 0 <= i < count for i in devices):
        raise ConfigError(f"trainer.devices={shown} is out of range: torch sees {count} {kind} device(s) on this "
                          f"machine; allowed indices 0 … {count - 1}")


def check_loss(kernel: str, trainer: DictConfig) -> None:
    """An explicitly chosen fused loss kernel must be installed and run where the trainer puts the model."""
    import torch

    accelerator = trainer.get("accelerator", "auto")
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    problem = kernel_problem(kernel, "cuda" if cuda else str(accelerator))
    if kernel != "auto" and problem:
        raise ConfigError(f"loss={kernel} {problem}")


def check_scheduler(scheduler: DictConfig) -> None:
    """A schedule that ends at ``num_training_steps`` (cosine) needs a positive end; it follows
    ``trainer.max_steps``, which may be -1 (no step limit)."""
    end = scheduler.get("num_training_steps")
    if end is not None and end < 1:
        raise ConfigError(f"scheduler.num_training_steps={end} is out of range: allowed >= 1 (the step where the "
                          "schedule ends; it follows trainer.max_steps, so set one of them)")
    warmup = scheduler.get("num_warmup_steps")
    if warmup is not None and warmup < 0:
        raise ConfigError(f"scheduler.num_warmup_steps={warmup} is out of range: allowed >= 0")


def check_checkpoint(key: str, value: str) -> None:
    """A checkpoint file that exists, is readable and is what ``torch.save`` writes (a zip archive with
    ``data.pkl``): checked from the file's directory, before anything is unpickled. A sharded checkpoint
    (``trainer=fsdp``: a directory) is checked through its ``meta.pt``."""
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(f"{key}={value!r} does not exist: give a checkpoint a run wrote "
                          "(<run dir>/checkpoints/last.ckpt)")
    if path.is_dir():
        from lctw.checkpoints import SHARDED_INDEX, SHARDED_META

        if not (path / SHARDED_META).is_file() or not (path / SHARDED_INDEX).is_file():
            raise ConfigError(f"{key}={value!r} is a directory, not a checkpoint file nor a sharded checkpoint "
                              f"(it lacks {SHARDED_META} or {SHARDED_INDEX}): give <run dir>/checkpoints/last.ckpt")
        path = path / SHARDED_META  # trainer=fsdp: the shards' metadata file is an ordinary checkpoint
    elif not path.is_file():
        raise ConfigError(f"{key}={value!r} is not a file: give a checkpoint a run wrote "
                          "(<run dir>/checkpoints/last.ckpt)")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{key}={value!r} is not readable (file permissions)")
    value = str(path)
    with path.open("rb") as fh:
        is_zip = zipfile.is_zipfile(fh)
    if not is_zip or not any(n.endswith("data.pkl") for n in zipfile.ZipFile(path).namelist()):
        raise ConfigError(f"{key}={value!r} is not a PyTorch checkpoint (torch.save writes a zip archive with "
                          "data.pkl; this file is not one): give a .ckpt a run wrote")


def check_device(key: str, value: str) -> None:
    """``auto``, ``cpu`` or an accelerator torch sees on this machine (``cuda``, ``cuda:1``, ``mps`` …)."""
    import torch

    if value == "auto":
        return
    try:
        device = torch.device(value)
    except RuntimeError:
        raise ConfigError(f"{key}={value!r} is not a device: allowed auto, cpu, cuda, cuda:<index>, mps") from None
    if device.type == "cpu":
        return
    present = torch.accelerator.current_accelerator()
    if present is None or present.type != device.type:
        sees = f"only {present.type}" if present is not None else "no accelerator (torch.cuda.is_available() is False)"
        raise ConfigError(f"{key}={value} is not available on this machine: torch sees {sees}; allowed auto or cpu"
                          + (f" or {present.type}" if present is not None else ""))
    count = torch.accelerator.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"{key}={value} is out of range: torch sees {count} {device.type} device(s) on this "
                          f"machine; allowed {device.type}:0 … {device.type}:{count - 1}")


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
    anything loads, with the ways that work (README, "Several GPUs on one machine")."""
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


def _resolve_accumulation(cfg: DictConfig) -> None:
    """The ``${accumulation:...}`` resolver's refusal as the ConfigError it is (OmegaConf wraps it)."""
    from omegaconf.errors import InterpolationResolutionError

    prefix = "ConfigError raised while resolving interpolation: "
    try:
        (cfg.get("trainer") or {}).get("accumulate_grad_batches")
    except InterpolationResolutionError as err:
        if str(err).startswith(prefix):
            raise ConfigError(str(err).removeprefix(prefix).splitlines()[0]) from None
        raise


def check_batch(cfg: DictConfig) -> None:
    """``global_batch`` (sequences per optimizer step, when set) = data.batch_size × ranks × accumulation;
    the effective batch is logged by :func:`lctw.experiment.run`."""
    if cfg.get("global_batch") is None or cfg.get("data") is None:
        return
    per_device, accumulate = cfg.data.get("batch_size", 1), cfg.trainer.get("accumulate_grad_batches", 1)
    if not _machine_devices_known(cfg.trainer):
        return
    total = per_device * ranks(cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)) * accumulate
    if total != cfg.global_batch:
        raise ConfigError(f"global_batch={cfg.global_batch} but data.batch_size={per_device} × "
                          f"{total // (per_device * accumulate)} ranks × trainer.accumulate_grad_batches={accumulate} "
                          f"= {total} sequences per step: leave trainer.accumulate_grad_batches to the "
                          "${accumulation:...} interpolation, or set global_batch=null")


def _machine_devices_known(trainer: DictConfig) -> bool:
    """``devices=-1`` counts the GPUs of the machine that trains; on one without GPUs it cannot be checked."""
    if trainer.get("devices") not in (-1, "-1", "auto"):
        return True
    import torch

    return torch.cuda.is_available()


# -- the entry points ----------------------------------------------------------------------------

@dataclass
class Parts:
    """The cheap parts of a run, instantiated and checked; no weights loaded."""

    model_spec: Any
    scorer: Any
    weighting: Any
    context: Any
    tokenizer: Any


def check_lengths(cfg: DictConfig) -> None:
    n, big_n = cfg.n, cfg.N
    if n < 2:
        raise ConfigError(f"n={n} is out of range: allowed 2 <= n < N (the short context)")
    if n > big_n or (n == big_n and cfg.context.get("method") != "none"):
        raise ConfigError(f"n={n} must be smaller than N={big_n}: allowed 2 <= n < N (context extension n -> N; "
                          "N = n only for the base stage: context=none scorer=none)")


def validate(cfg: DictConfig, for_cache: bool = False) -> Parts:
    """Check types, then instantiate the cheap parts (their constructors check their own keys) and check
    what joins them.

    ``for_cache``: the configuration fills a score cache (``score.py``), so the scorer must be fixed; the
    trainer's accelerator is then not checked against this machine (``score.py`` does not train).
    """
    # before the types: scorer=self takes no cache key, and "needs a fixed scorer" says why
    scorer_class, cached = target_of(cfg.scorer, "scorer"), cfg.scorer.get("cache")
    if (cached or for_cache) and not scorer_class.fixed:
        what = "score.py" if for_cache else f"scorer.cache={cached}"
        raise ConfigError(f"{what} needs a fixed scorer: allowed scorer=frozen or scorer=small (scorer="
                          f"{scorer_class.name} changes during training or has no scores, so its log-probs cannot "
                          "be cached)")
    _resolve_accumulation(cfg)
    check_keys(cfg, TRAIN_KEYS)
    check_lengths(cfg)
    if cfg.get("nonfinite") is not None:
        from lctw.module import check_nonfinite

        try:
            check_nonfinite(cfg.nonfinite.policy, cfg.nonfinite.max_skipped)
        except ValueError as err:
            raise ConfigError(named("nonfinite", str(err))) from None
    if cfg.get("trainer") is not None:
        check_trainer(cfg.trainer, machine=not for_cache)
        check_loss(cfg.get("loss", "auto"), cfg.trainer)
        if not for_cache:
            check_batch(cfg)
            check_launch(cfg)
    if cfg.get("scheduler") is not None:
        check_scheduler(cfg.scheduler)
    if cfg.get("ckpt_path") and cfg.ckpt_path != "last" and "://" not in cfg.ckpt_path:  # remote: Lightning reads it
        check_checkpoint("ckpt_path", cfg.ckpt_path)
    weighting = build(cfg.weighting, "weighting")
    context = build(cfg.context, "context")
    scorer = build(cfg.scorer, "scorer")
    if weighting.needs_scores and not scorer.produces_scores:
        raise ConfigError(f"weighting={weighting.name} needs a scorer: scorer=none allows only weighting=uniform")
    model_spec = build(cfg.model, "model")
    if cfg.get("eval"):
        strategy = (cfg.get("trainer") or {}).get("strategy")
        if isinstance(strategy, DictConfig) and strategy.get("_target_") == "lctw.distributed.FSDP2Strategy":
            raise ConfigError("eval is not run inside a trainer=fsdp run (θ is sharded over the ranks): set eval=null "
                              "and evaluate the exported θ afterwards, python eval.py ckpt=<run dir> eval=<name>")
        build(cfg.eval, "eval")  # the evaluation's options are checked before training starts
    build(cfg.data, "data")  # its constructor checks its options; the documents are read later
    if scorer.fixed:
        _warn_beyond_pretraining(scorer, model_spec)
    tokenizer = model_spec.tokenizer()
    if scorer.fixed and scorer.source(model_spec) is not model_spec:
        small = scorer.source(model_spec)
        small_vocab = small.tokenizer().get_vocab()
        if small_vocab != tokenizer.get_vocab():
            raise ConfigError(
                f"scorer=small: scorer.model ({small.describe()}) has a different vocabulary "
                f"({len(small_vocab)} tokens) from model ({model_spec.describe()}, {len(tokenizer)} tokens); "
                "the small scorer must use the same tokenizer"
            )
    return Parts(model_spec, scorer, weighting, context, tokenizer)


def _warn_beyond_pretraining(scorer, model_spec) -> None:
    """θ′ scoring windows longer than it was pretrained on is a legitimate experiment, but rarely the
    intended one (the short-context scores then include positions θ′ never saw), so it is said."""
    source = scorer.source(model_spec)
    trained = source.pretrained_length()
    if trained is not None and scorer.n > trained:
        where = "model" if source is model_spec else "scorer.model"
        log.warning("scorer.n=%d is longer than the %d tokens θ′ (%s) was pretrained at: its windows reach "
                    "positions θ′ never saw in pretraining", scorer.n, trained, where)


def check_model_path(key: str, value: str, gguf_file: str | None = None) -> None:
    """``eval.py``'s ``ckpt``: a run directory, a Lightning ``.ckpt`` (a file, or a sharded checkpoint's
    directory) or a Hugging Face model directory that exists, or a hub name (``org/name``, not checked: that
    needs the hub)."""
    path = Path(value).expanduser()
    if not path.exists():
        if is_local_path(value):
            raise ConfigError(f"{key}={value!r} does not exist: give a run directory, a Lightning .ckpt or a "
                              "Hugging Face model (a local directory or a hub name org/name)")
        return
    if path.is_dir() and path.suffix == ".ckpt":  # a sharded checkpoint (trainer=fsdp)
        check_checkpoint(key, value)
        return
    if path.is_file():
        if path.suffix != ".ckpt":
            raise ConfigError(f"{key}={value!r} is a file but not a Lightning .ckpt: give a run directory, a .ckpt "
                              "or a Hugging Face model directory")
        check_checkpoint(key, value)
        return
    if gguf_file:
        if not (path / gguf_file).is_file():
            raise ConfigError(f"gguf_file={gguf_file!r} does not exist in {key}={value!r}")
    elif not (path / "hf" / "config.json").is_file() and not (path / "config.json").is_file():
        raise ConfigError(f"{key}={value!r} is neither a run directory (hf/config.json) nor a Hugging Face model "
                          "directory (config.json)")


def validate_evaluation(cfg: DictConfig):
    """``eval.py``'s configuration, before any model or data loads; returns the built evaluation."""
    check_keys(cfg, EVAL_KEYS)
    check_model_path("ckpt", cfg.ckpt, cfg.get("gguf_file"))
    check_device("device", cfg.device)
    return build(cfg.eval, "eval")


def validate_inspection(cfg: DictConfig) -> tuple[Any, Any]:
    """``python -m lctw.inspect``'s configuration, before any model loads; returns (scorer, weighting)."""
    check_keys(cfg, INSPECT_KEYS)
    if not Path(cfg.text).expanduser().is_file():
        raise ConfigError(f"text={cfg.text!r} is not a file: give the text file to inspect")
    if cfg.max_tokens is not None and cfg.max_tokens < 3:
        raise ConfigError(f"max_tokens={cfg.max_tokens} is out of range: allowed >= 3 (BOS and two targets), or null")
    if cfg.top_k < 1:
        raise ConfigError(f"top_k={cfg.top_k} is out of range: allowed >= 1")
    check_device("device", cfg.device)
    if cfg.ckpt:
        check_model_path("ckpt", cfg.ckpt)
    check_lengths(cfg)
    weighting, scorer = build(cfg.weighting, "weighting"), build(cfg.scorer, "scorer")
    if not scorer.produces_scores:
        raise ConfigError("scorer=none has no scores to show: allowed scorer=self, frozen or small")
    return scorer, weighting
