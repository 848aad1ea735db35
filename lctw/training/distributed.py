"""FSDP2 for lctw (``trainer=fsdp``): θ and a fixed scorer's θ' sharded across all ranks.

Why a strategy of our own: Lightning 2.6's recommended FSDP2 path is ``ModelParallelStrategy`` with the
sharding applied in ``LightningModule.configure_model`` (Lightning's ``strategy="fsdp"`` is FSDP1 and
refuses the CPU). :class:`FSDP2Strategy` is that strategy with three things added:

* the sharding plan itself (:meth:`FSDP2Strategy.shard`, called by the module's ``configure_model``):
  ``fully_shard`` on every decoder layer, then on the model's root (embeddings, final norm, LM head), over a
  one-dimensional mesh of all ranks (pure data-parallel sharding, no tensor parallelism). The decoder
  layer class is read from the model (transformers' ``_no_split_modules``), never named in YAML. Parameters
  stay float32 shards (the fp32 masters AdamW updates); ``MixedPrecisionPolicy`` all-gathers them as
  ``param_dtype`` for compute and reduce-scatters gradients in ``reduce_dtype``. A fixed scorer's θ' is
  sharded the same way: it is eval-only, has no gradient, is never in the optimizer, and no rank holds
  it in full on the accelerator;
* sharded checkpoints that can be trusted and resumed when θ' is left out of them: each rank hashes
  its share of the checkpoint directory's files (``<file>.sha256`` beside each) and, on resume, verifies
  its share before loading; the model state is loaded for the keys the checkpoint holds (θ' is rebuilt
  from its spec, :meth:`lctw.training.module.TokenWeightingLM.on_save_checkpoint`);
* :func:`gather_theta`: θ's full state on rank 0 at the end of a run, for ``<run>/hf``.

The LM head runs outside the model's ``forward`` (:func:`lctw.method.scoring.model_logprobs` takes the hidden
states and the head's weight, so no (T, V) logits exist), so the log-probs are registered as an FSDP
forward method: FSDP then all-gathers the root's parameters (the head) for it and reduce-scatters their
gradients after backward, exactly as for ``forward``.

Only rank 0 loads weights: the other ranks build θ and θ' on the meta device (:func:`receives_weights`,
no memory), and after ``fully_shard`` every rank receives its shards from rank 0's full copy
(``set_model_state_dict(..., broadcast_from_rank0=True)``). So no model is ever whole on a GPU, and
host memory holds one copy of θ and θ' (rank 0's), not one per rank. On the CPU (gloo) all of
this runs with ``trainer.accelerator=cpu trainer.devices=2``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lctw.errors import ConfigError
from lctw.models import DTYPES
from lctw.training.trainer import is_fsdp2, ranks

log = logging.getLogger(__name__)



def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers: modules whose class is named in transformers' ``_no_split_modules``
    (the blocks its authors say must not be split, e.g. ``LlamaDecoderLayer``, ``PhiDecoderLayer``)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    # the MRO: fully_shard turns a layer's class into a subclass (FSDPLlamaDecoderLayer)
    layers = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    if not layers:
        raise ValueError(f"cannot shard {type(model).__name__}: its _no_split_modules ({sorted(names) or 'none'}) "
                         "names no module class of the model, so its decoder layers are unknown")
    return layers


def shard_model(model: torch.nn.Module, mesh, policy, reshard_after_forward: bool = True) -> torch.nn.Module:
    """``fully_shard`` each decoder layer, then the root; idempotent (``configure_model`` may run twice,
    for ``trainer.validate`` and then ``trainer.fit``)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    from lctw.method.scoring import LOGPROBS_METHOD, logprobs_in_forward

    if isinstance(model, FSDPModule):
        return model
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    def logprobs(self, *args, **kwargs):  # a copy, not a view: FSDP's backward hook survives in-place edits
        return logprobs_in_forward(self, *args, **kwargs).clone()

    setattr(model, LOGPROBS_METHOD, logprobs.__get__(model))
    register_fsdp_forward_method(model, LOGPROBS_METHOD)
    return model


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as pure FSDP2 over all ranks (see the module docstring).

    Args:
        param_dtype: dtype of the all-gathered parameters, i.e. of the compute (the shards stay float32).
        reduce_dtype: dtype in which gradients are reduce-scattered.
        activation_checkpointing: recompute θ's decoder layers in backward (transformers' non-reentrant
            gradient checkpointing, the same as ``model.gradient_checkpointing``; either turns it on).
        reshard_after_forward: free the gathered parameters after each layer's forward (ZeRO-3); false
            keeps them until backward (ZeRO-2-like: faster, more memory).
        process_group_backend: ``nccl`` / ``gloo``, or null for the device's default.
    """

    def __init__(self, param_dtype: Literal[tuple(DTYPES)] = "bfloat16",
                 reduce_dtype: Literal[tuple(DTYPES)] = "float32", activation_checkpointing: bool = True,
                 reshard_after_forward: bool = True, process_group_backend: str | None = None):
        for key, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if value not in DTYPES:
                raise ValueError(f"{key}={value!r} is not allowed: choose one of {list(DTYPES)}")
        super().__init__(tensor_parallel_size=1, save_distributed_checkpoint=True,
                         process_group_backend=process_group_backend)
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self.activation_checkpointing, self.reshard_after_forward = activation_checkpointing, reshard_after_forward

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every rank shards: a 1-D mesh
        super().setup_environment()

    def shard(self, module) -> None:
        """θ (``module.model``) and a fixed scorer's θ' (``module.scorer.model``), see the module docstring."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        mesh = self.device_mesh["data_parallel"]
        policy = MixedPrecisionPolicy(param_dtype=DTYPES[self.param_dtype], reduce_dtype=DTYPES[self.reduce_dtype])
        theta = module.model
        if self.activation_checkpointing and not getattr(theta, "is_gradient_checkpointing", False):
            theta.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            theta.config.use_cache = False
        scorer_model = getattr(module.scorer, "model", None)
        for model in (theta, scorer_model if scorer_model is not theta else None):
            if model is None or is_sharded_module(model):
                continue
            full = model.state_dict() if self.global_rank == 0 else None  # rank 0's weights, before sharding
            shard_model(model, mesh, policy, self.reshard_after_forward)
            if self.world_size > 1:
                _broadcast_from_rank0(model, full, self.root_device)

    # -- checkpoints: a directory per checkpoint (torch.distributed.checkpoint), hashed per file --------

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        from lctw.runs.checkpoints import hash_share

        super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        self.barrier("lctw.save_checkpoint")  # meta.pt (rank 0) and every shard are written
        hash_share(path, self.global_rank, self.world_size)
        self.barrier("lctw.hash_checkpoint")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        from lctw.runs.checkpoints import is_sharded, verify_share

        path = Path(self.broadcast(str(checkpoint_path)))
        if not is_sharded(path):
            return super().load_checkpoint(path, weights_only=weights_only)
        error = verify_share(path, self.global_rank, self.world_size)
        if self.reduce_boolean_decision(error is not None, all=False):
            raise ValueError(error or f"checkpoint {path}: a file failed its SHA-256 check on another rank")
        return _load_sharded(path, self.model, self.optimizers, weights_only)


def _load_sharded(path: Path, model, optimizers, weights_only: bool | None) -> dict:
    """Lightning's sharded load, for the model keys the checkpoint holds: θ' (``scorer.``) may be absent."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    saved = {k.removeprefix("state_dict.") for k in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata}
    state = get_model_state_dict(model)
    missing = [k for k in state if k not in saved]
    if any(not k.startswith("scorer.") for k in missing):
        raise ValueError(f"checkpoint {path} lacks {len(missing)} parameters of θ (e.g. {missing[0]}): it was "
                         "written for another model")
    state = {k: v for k, v in state.items() if k in saved}
    dcp.load({"state_dict": state}, checkpoint_id=path)
    set_model_state_dict(model, state, options=StateDictOptions(strict=False))
    for i, optimizer in enumerate(optimizers):
        key = f"optimizer_{i}"
        optim_state = {key: get_optimizer_state_dict(model, optimizer)}
        dcp.load(optim_state, checkpoint_id=path)
        set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_state[key],
                                 options=StateDictOptions(cpu_offload=True))
    from lctw.runs.checkpoints import SHARDED_META

    return torch.load(path / SHARDED_META, map_location="cpu", weights_only=weights_only is not False)


def receives_weights(trainer_cfg) -> bool:
    """Whether this process builds θ and θ' without weights (meta device) and receives them from rank 0 when
    they are sharded: a non-zero rank of a ``trainer=fsdp`` run of several processes.

    It is decided before Lightning starts, so it must agree with the rank Lightning will give this process.
    A run configured for one process (``devices`` × ``num_nodes`` = 1) is rank 0 whatever the environment
    holds: a ``RANK`` left exported in a shell would otherwise build θ on the meta device with no rank to
    send it weights. Otherwise the rank is read where Lightning's cluster environment will read it, in its
    order of detection: SLURM's ``SLURM_PROCID`` inside an ``srun`` job, torchrun's ``RANK``
    only with torchrun's other variables, else the ``NODE_RANK`` and ``LOCAL_RANK`` Lightning gives the
    processes it starts (its first process on the first node has neither)."""
    if not is_fsdp2(trainer_cfg):
        return False
    try:
        alone = ranks(trainer_cfg.get("devices", "auto"), trainer_cfg.get("num_nodes", 1)) == 1
    except ConfigError:  # every GPU of a machine without one: a single process
        alone = True
    if alone:
        return False
    return _launched_rank() != 0


def _launched_rank() -> int:
    """This process's global rank as Lightning's detected cluster environment will report it (0 or not 0)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if SLURMEnvironment.detect():
        return int(os.environ.get("SLURM_PROCID", 0))
    if TorchElasticEnvironment.detect():
        return int(os.environ.get("RANK", 0))
    return int(os.environ.get("NODE_RANK", 0) or 0) + int(os.environ.get("LOCAL_RANK", 0) or 0)


def _broadcast_from_rank0(model: torch.nn.Module, full: dict | None, device: torch.device) -> None:
    """After ``fully_shard``: every rank's shards from rank 0's full weights (``full``, None elsewhere).
    A model built on the meta device gets memory first, and its rotary embeddings (non-persistent
    buffers, not in a state dict) are computed again from its config."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from lctw.method.context import _rebuild_rotary

    was_meta = any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    if was_meta:
        model.to_empty(device=device)
    set_model_state_dict(model, full or {}, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    if was_meta:
        _rebuild_rotary(model)


def is_sharded_module(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def gather_theta(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """θ's full state dict on rank 0's CPU ({} on the other ranks); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a plain tensor is its own)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
