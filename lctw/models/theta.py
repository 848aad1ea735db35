"""θ, the trained model: built in one place for training, scoring and evaluation.

:func:`build_theta` loads a model spec and applies the context extension: the training run calls it,
and so does :func:`load_theta` for a Lightning checkpoint, with the architecture only (the checkpoint
then supplies the weights). Everything needed to rebuild θ travels with what a run writes:

* a Lightning checkpoint (a file, or with ``trainer=fsdp`` a directory of shards whose ``meta.pt`` holds
  the rest) holds the run's resolved config (``hyper_parameters["config"]``, from the
  module's ``save_hyperparameters``) and θ's weights under ``model.``;
* ``<run>/hf/`` is θ as a Hugging Face model, whose ``config.json`` carries the extended RoPE settings
  (``rope_parameters``, ``max_position_embeddings``), plus ``lctw.yaml``, the run's resolved config.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from lctw.errors import ConfigError
from lctw.models.specs import is_local_path

THETA = "model"  # θ's attribute in the LightningModule, so its checkpoint keys start with "model."
RUN_CONFIG = "lctw.yaml"  # the run's resolved config beside an exported θ


def build_theta(model_spec, context, weights: bool = True, meta: bool = False) -> torch.nn.Module:
    """θ = the spec's model with its context extended (n -> N), in train mode. ``meta``: the architecture
    on the meta device, no memory (a rank that receives θ's weights when sharding, :mod:`lctw.training.distributed`)."""
    if meta:
        with torch.device("meta"):
            model = model_spec.load(weights=False)
    else:
        model = model_spec.load(weights=weights)
    context.apply(model)
    return model.train()  # from_pretrained returns eval mode; gradient checkpointing only acts in train mode


def save_theta(model, tokenizer, out_dir: Path, config: dict | None) -> None:
    """θ as a Hugging Face model directory, with the run's config beside it; never with non-finite weights."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(f"not exporting θ to {out_dir}: {len(bad)} parameters are not finite (e.g. {bad[0]})")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if config is not None:
        OmegaConf.save(OmegaConf.create(config), Path(out_dir) / RUN_CONFIG)


def resolve_device(value: str = "auto", key: str = "device") -> torch.device:
    """The one device resolver: ``auto`` (the GPU when there is one, else the CPU), ``cpu`` or an accelerator
    torch sees on this machine (``cuda``, ``cuda:1``, ``mps`` …); anything else is a ConfigError about ``key``."""
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{key}={value!r} is not a device: allowed auto, cpu, cuda, cuda:<index>, mps") from None
    if device.type == "cpu":
        return device
    present = torch.accelerator.current_accelerator()
    if present is None or present.type != device.type:
        sees = f"only {present.type}" if present is not None else "no accelerator (torch.cuda.is_available() is False)"
        raise ConfigError(f"{key}={value} is not available on this machine: torch sees {sees}; allowed auto or cpu"
                          + (f" or {present.type}" if present is not None else ""))
    count = torch.accelerator.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"{key}={value} is out of range: torch sees {count} {device.type} device(s) on this "
                          f"machine; allowed {device.type}:0 … {device.type}:{count - 1}")
    return device


def load_theta(ckpt: str, dtype: str = "float32", gguf_file: str | None = None):
    """(θ, tokenizer, the run's config or None) for a run directory, a ``.ckpt`` (a file, or a sharded
    checkpoint's directory, read in this one process) or a Hugging Face model."""
    from hydra.utils import instantiate

    from lctw.models.specs import DTYPES, HFModel
    from lctw.runs.checkpoints import SHARDED_META

    path = Path(str(ckpt)).expanduser()
    if path.suffix == ".ckpt":
        sharded = path.is_dir()  # trainer=fsdp's checkpoints are directories (lctw.training.distributed)
        state = torch.load(path / SHARDED_META if sharded else path, map_location="cpu", weights_only=True)
        config = (state.get("hyper_parameters") or {}).get("config")
        if config is None:
            raise ValueError(f"ckpt={path}: the checkpoint holds no run config (hyper_parameters['config']); "
                             "it was not written by lctw's training module")
        run_cfg = OmegaConf.create(config)
        spec = instantiate(run_cfg.model)  # the run validated its config when it started
        model = build_theta(spec, instantiate(run_cfg.context), weights=False)
        prefix = f"{THETA}."
        if sharded:
            read_sharded_theta(model, path)
        else:
            model.load_state_dict({k.removeprefix(prefix): v for k, v in state["state_dict"].items()
                                   if k.startswith(prefix)})
        model = model.to(DTYPES[dtype])
        tokenizer = spec.tokenizer()
    else:
        source = path / "hf" if (path / "hf" / "config.json").exists() else path
        spec = HFModel(str(source) if source.exists() else str(ckpt), dtype=dtype, gguf_file=gguf_file)
        model, tokenizer = spec.load(), spec.tokenizer()
        saved = source / RUN_CONFIG
        run_cfg = OmegaConf.load(saved) if saved.exists() else None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer, run_cfg


def read_sharded_theta(model: torch.nn.Module, path: Path) -> None:
    """θ's weights from a sharded checkpoint into an unsharded ``model``, in this one process (no
    process group): only θ's tensors are read, not the optimizer's or θ''s. Every file is verified first."""
    import torch.distributed.checkpoint as dcp

    from lctw.runs.checkpoints import verify_share

    error = verify_share(path, 0, 1)
    if error:
        raise ValueError(error)
    saved = {k.removeprefix("state_dict.") for k in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata}
    own = model.state_dict()
    state = {f"{THETA}.{k}": v for k, v in own.items() if f"{THETA}.{k}" in saved}
    loaded = {v.data_ptr() for v in state.values()}
    missing = [k for k, v in own.items() if f"{THETA}.{k}" not in saved and v.data_ptr() not in loaded]
    if missing:  # a tied weight (the LM head is the embedding) is saved once, under one of its names
        raise ValueError(f"checkpoint {path} lacks {len(missing)} tensors of θ (e.g. {missing[0]}): it was written "
                         "for another model")
    dcp.load({"state_dict": state}, checkpoint_id=path, no_dist=True)


def check_model_path(key: str, value: str, gguf_file: str | None = None) -> None:
    """What :func:`load_theta` loads, checked before it loads (``eval.py``'s ``ckpt``): a run directory, a
    Lightning ``.ckpt`` (a file, or a sharded checkpoint's directory) or a Hugging Face model directory that
    exists, or a hub name (``org/name``, not checked: that needs the hub)."""
    path = Path(value).expanduser()
    if not path.exists():
        if is_local_path(value):
            raise ConfigError(f"{key}={value!r} does not exist: give a run directory, a Lightning .ckpt or a "
                              "Hugging Face model (a local directory or a hub name org/name)")
        return
    from lctw.runs.checkpoints import check_file  # here: it brings Lightning, which validation need not load

    if path.is_dir() and path.suffix == ".ckpt":  # a sharded checkpoint (trainer=fsdp)
        check_file(key, value)
        return
    if path.is_file():
        if path.suffix != ".ckpt":
            raise ConfigError(f"{key}={value!r} is a file but not a Lightning .ckpt: give a run directory, a .ckpt "
                              "or a Hugging Face model directory")
        check_file(key, value)
        return
    if gguf_file:
        if not (path / gguf_file).is_file():
            raise ConfigError(f"gguf_file={gguf_file!r} does not exist in {key}={value!r}")
    elif not (path / "hf" / "config.json").is_file() and not (path / "config.json").is_file():
        raise ConfigError(f"{key}={value!r} is neither a run directory (hf/config.json) nor a Hugging Face model "
                          "directory (config.json)")
