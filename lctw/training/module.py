"""The LightningModule: θ with its context extension, a scorer and a weighting, trained on
L = Σ_valid w_i · CE_i / (number of valid targets), weights detached.

"The batch" of that definition is the optimizer step's: all its micro-batches (gradient accumulation)
on all ranks. Each micro-batch backpropagates its unnormalised sum Σ w_i · CE_i, and
:meth:`TokenWeightingLM._end_of_step` divides the gradients by the step's valid targets, summed over
micro-batches and ranks (one all-reduce), the one place the loss is normalised. So 2 ranks × b sequences,
or b sequences × 2 accumulated micro-batches, give exactly the gradient of one batch of 2b sequences,
even when padding leaves the micro-batches with different numbers of valid targets (a mean of
per-micro-batch means would weight each target by 1/its micro-batch's count). Weights are normalised per
sequence by the weighting, and a sequence is never split across ranks or micro-batches, so this is the
method's L. ``train/loss`` and ``train/ce`` are the step's: the same sums over the same targets, reduced
in the same all-reduce.

The parts arrive already built (:func:`lctw.training.experiment.run`): θ with its context extension
(:func:`lctw.models.theta.build_theta`), the scorer with its θ' loaded (a frozen θ0 keeps its original RoPE,
because it is loaded from the spec, not extended).

Logged: ``train/loss`` (weighted), ``train/ce`` (unweighted), weight diagnostics (``train/weight_std``,
``weight_max``, ``weight_zero_frac``, ``weight_ess`` = (Σw)²/Σw²/M, ``weight_mass_beyond_n``:
:func:`lctw.method.weighting.weight_stats`; ``score_mean``, the mean of the weighting's own scores s_i, and
``zero_score_rows``: :func:`~lctw.method.weighting.score_stats`),
``train/tokens_per_s``; validation ``val/ce``, ``val/ppl`` and the CE split at position n,
``val/ce_within_n`` / ``val/ce_beyond_n`` (targets with at most / more than n tokens before them),
where context extension shows. ``training_step`` returns the loss together with the step's scores, weights
and mask (detached), which callbacks receive in ``on_train_batch_end`` (:class:`lctw.training.callbacks.TokenWeights`).

Numerical faults are caught, not trained on (``nonfinite`` in ``conf/config.yaml``). A step whose
log-probs, short log-probs, weights or loss (on valid targets) or whose gradients are not finite is
skipped: no parameter changes (gradients are dropped, so the optimizer leaves every parameter alone) and
``train/skipped_steps`` counts it. With ``policy=stop``, or after ``max_skipped`` skipped steps, the run
stops with a :class:`FloatingPointError` that names the fault and the step. A non-finite validation CE
stops the run too, and no checkpoint is written while any parameter is non-finite. With ``precision=16-mixed``
an overflow of the scaled gradients is not a fault either: the gradient scaler owns those steps (it skips
them and lowers its scale, as fp16 training needs), so they are neither counted nor stopped on. Rows whose
scores are all zero are not a fault: the spec gives them uniform weights (dense), and ``train/zero_score_rows``
counts them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import lightning as L
import torch
from torchmetrics.aggregation import MeanMetric

from lctw.method.kernels import weighted_loss
from lctw.method.scorers import NoScorer, Scorer
from lctw.method.scoring import model_logprobs
from lctw.method.weighting import Uniform, Weighting, score_stats, weight_stats
from lctw.training.distributed import local

log = logging.getLogger(__name__)
NONFINITE = ("skip", "stop")


def check_nonfinite(policy: str, max_skipped: int) -> None:
    if policy not in NONFINITE:
        raise ValueError(f"policy={policy!r} is not allowed: choose one of {list(NONFINITE)}")
    if isinstance(max_skipped, bool) or not isinstance(max_skipped, int) or max_skipped < 0:
        raise ValueError(f"max_skipped={max_skipped!r} is out of range: allowed an int >= 0")


class TokenWeightingLM(L.LightningModule):
    """θ (already extended to N), a scorer and a weighting; ``config`` is the run's resolved config,
    saved in every checkpoint (``save_hyperparameters``) so that a checkpoint can rebuild θ by itself
    (:func:`lctw.models.theta.load_theta`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        scorer: Scorer | None = None,
        weighting: Weighting | None = None,
        n: int = 0,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        chunk_size: int | None = 1024,
        loss: str = "auto",
        config: dict | None = None,
        nonfinite: str = "skip",
        max_skipped: int = 5,
    ):
        super().__init__()
        check_nonfinite(nonfinite, max_skipped)
        self.save_hyperparameters("config", logger=False)
        self.model = model  # θ: the only trained parameters (THETA in lctw.models.theta names this attribute)
        self.scorer = scorer or NoScorer()  # a submodule: a fixed scorer's θ' moves (and shards) with θ
        self.weighting = weighting or Uniform()
        self.n = int(n or self.scorer.n)
        self.chunk_size = chunk_size  # rows per LM-head chunk in the loss (None = full logits)
        self.loss_kernel = loss  # LM-head kernel of the training loss (lctw.method.kernels.KERNELS)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_ce = torch.nn.ModuleDict({k: MeanMetric() for k in ("all", "within_n", "beyond_n")})
        self._last_batch_start: float | None = None
        self.nonfinite, self.max_skipped = nonfinite, max_skipped
        self.skipped_steps = 0  # saved in checkpoints: a resumed run keeps counting
        self._window_faulty = False  # a micro-batch of this accumulation window was skipped
        # Σ w·CE, Σ CE and valid targets this rank has backpropagated since the last optimizer step
        self._window = torch.zeros(3)

    def configure_model(self) -> None:
        """Sharding, where the strategy does it (``trainer=fsdp``: :class:`lctw.training.distributed.FSDP2Strategy`)."""
        shard = getattr(self.trainer.strategy, "shard", None) if self._trainer is not None else None
        if shard is not None:
            shard(self)

    def _fault(self, what: str) -> None:
        """Count a skipped step, or stop: the policy of the module docstring."""
        self.skipped_steps += 1
        step = self.trainer.global_step if self._trainer is not None else -1
        if self.nonfinite == "stop" or self.skipped_steps > self.max_skipped:
            raise FloatingPointError(
                f"non-finite {what} at step {step}: stopping (nonfinite.policy={self.nonfinite}, "
                f"{self.skipped_steps} faulty steps, nonfinite.max_skipped={self.max_skipped}); the run has "
                "diverged or its inputs are corrupted: lower optimizer.lr or check the data and the score cache"
            )
        log.warning("non-finite %s at step %d: step skipped (%d of at most %d)", what, step, self.skipped_steps,
                    self.max_skipped)

    def _any_rank(self, bad: bool) -> bool:
        """Every rank skips together (a rank that skipped alone would hang the others' all-reduce)."""
        if self._trainer is None:
            return bad
        return bool(self.trainer.strategy.reduce_boolean_decision(bad, all=False))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """θ' is rebuilt from its spec on resume; a checkpoint holds it only if ``scorer.save`` asks.
        A checkpoint is never written with non-finite parameters."""
        bad = [name for name, p in self.model.named_parameters() if not torch.isfinite(local(p)).all()]
        if self._any_rank(bool(bad)):  # sharded: each rank checks its shards
            raise FloatingPointError(f"not saving a checkpoint: {len(bad) or 'some'} parameters of θ are not finite "
                                     f"(e.g. {bad[0] if bad else 'on another rank'}); the run has diverged")
        checkpoint["skipped_steps"] = self.skipped_steps
        checkpoint["rng"] = self._rng_states()
        if not getattr(self.scorer, "save", False):
            for key in [k for k in checkpoint["state_dict"] if k.startswith("scorer.")]:
                del checkpoint["state_dict"][key]

    def _rng_states(self) -> dict:
        """The random streams training draws from: torch's (dropout) and the weighting's own (sparse ties)."""
        states = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state_all()
        generator = getattr(self.weighting, "generator", None)
        if generator is not None:
            states["weighting"] = generator.get_state()
        return states

    def on_train_start(self) -> None:
        """Restored here, not at load time: loading the checkpoint happens before the data is set up."""
        states, self._resumed_rng = getattr(self, "_resumed_rng", None), None
        if states:
            torch.set_rng_state(states["torch"])
            if "cuda" in states and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])
            if "weighting" in states:
                self.weighting.generator.set_state(states["weighting"])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))
        self._resumed_rng = checkpoint.get("rng")
        if "state_dict" in checkpoint:  # a sharded checkpoint's states were loaded by the strategy
            for key, value in self.scorer.state_dict(prefix="scorer.").items():
                checkpoint["state_dict"].setdefault(key, value)  # θ' as set up, where the checkpoint left it out

    def on_train_batch_start(self, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last_batch_start is not None:
            tokens = batch["mask"].sum() + batch["mask"].shape[0]  # targets + the BOS of each sequence
            self.log("train/tokens_per_s", tokens.float() / (now - self._last_batch_start), on_step=True)
        self._last_batch_start = now

    def training_step(self, batch, batch_idx):
        ids, mask = batch["input_ids"], batch["mask"]
        long_lp = model_logprobs(self.model, ids, self.chunk_size, kernel=self.loss_kernel)
        short_lp = self.scorer(self.model, batch, long_lp.detach())
        weights = self.weighting(long_lp, short_lp, mask)
        loss = weighted_loss(long_lp, weights, mask, reduction="sum")
        checks = (("log-probs", long_lp), ("short log-probs", short_lp), ("weights", weights))
        bad = next((what for what, x in checks if x is not None and not torch.isfinite(x.detach()[mask]).all()),
                   None) or (None if torch.isfinite(loss.detach()) else "loss")
        if self._any_rank(bad is not None):
            self._fault(bad or "values on another rank")
            self._window_faulty = True  # the whole optimizer step is skipped, not just this micro-batch
            self.log("train/skipped_steps", float(self.skipped_steps), on_step=True)
            return None  # Lightning skips backward and the optimizer step
        ce = weighted_loss(long_lp.detach(), None, mask, reduction="sum")
        self._window = self._window.to(loss.device) + torch.stack([loss.detach(), ce, mask.sum().float()])
        logs = {"train/skipped_steps": float(self.skipped_steps)}
        scores = None if short_lp is None else self.weighting.scores(long_lp.detach(), short_lp) * mask
        stats = weight_stats(weights, mask, self.n)
        logs.update({f"train/{k}": v for k, v in stats.items()})
        if scores is not None:
            logs.update({f"train/{k}": v for k, v in score_stats(scores, mask).items()})
        if self._trainer is not None and self.trainer.optimizers:
            logs["train/lr"] = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log_dict(logs, on_step=True, prog_bar=False, batch_size=ids.shape[0])
        # Σ w_i CE_i, normalised by the whole step's targets in _end_of_step; scores, weights and their
        # diagnostics go to callbacks' on_train_batch_end (lctw.training.callbacks.TokenWeights), detached
        return {"loss": loss, "scores": scores, "weights": weights.detach(), "mask": mask, "stats": stats}

    def validation_step(self, batch, batch_idx):
        ids, mask = batch["input_ids"], batch["mask"]
        nll = -model_logprobs(self.model, ids, self.chunk_size)
        beyond = (torch.arange(mask.shape[1], device=mask.device) >= self.n)[None].expand_as(mask)
        for key, sel in (("all", mask), ("within_n", mask & ~beyond), ("beyond_n", mask & beyond)):
            if sel.any():
                self.val_ce[key].update(nll[sel])

    def _end_of_step(self) -> None:
        """The step's loss, in one place: divide the summed gradients by the step's valid targets over all
        micro-batches and ranks, and log the step's ``train/loss`` and ``train/ce`` from the same sums.
        Lightning divided each micro-batch's loss by ``accumulate_grad_batches`` and DDP / FSDP average over
        ranks: the factor undoes both. Lightning calls callbacks' ``on_before_optimizer_step`` before this
        module's, so a callback that reads gradients there sees them before this division."""
        window, self._window = self._window, torch.zeros(3)
        if self._trainer is None:
            return
        loss_sum, ce_sum, targets = self.trainer.strategy.reduce(window.to(self.device), reduce_op="sum").tolist()
        factor = self.trainer.accumulate_grad_batches * self.trainer.world_size / max(targets, 1.0)
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)  # a float: grads may be DTensors (sharded)
        if targets > 0:
            step = {"train/loss": loss_sum / targets, "train/ce": ce_sum / targets}
            self.log_dict(step, on_step=True, rank_zero_only=True)  # already reduced over ranks
            self.log("loss", step["train/loss"], prog_bar=True, logger=False, rank_zero_only=True)

    def _scaler(self):
        """The fp16 gradient scaler (``precision=16-mixed``), or None."""
        if self._trainer is None:
            return None
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def on_before_optimizer_step(self, optimizer) -> None:
        self._end_of_step()
        grads = [local(p.grad) for p in self.model.parameters() if p.grad is not None]
        # one device-to-host sync for all gradients, not one per tensor
        bad = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        bad = self._any_rank(bad)
        if bad and self._scaler() is not None:
            bad = False  # an fp16 overflow: the scaler skips this step and lowers its scale (module docstring)
        elif bad:
            self._fault("gradients")
        if bad or self._window_faulty:  # with accumulation, the other micro-batches' gradients go too
            for p in self.model.parameters():
                p.grad = None  # the optimizer skips parameters without a gradient: nothing changes
        self._window_faulty = False

    def on_validation_epoch_end(self) -> None:
        for key, metric in self.val_ce.items():
            if metric.update_called:  # a split may be empty (e.g. sequences no longer than n)
                value = metric.compute()
                if not torch.isfinite(value):
                    raise FloatingPointError(f"validation CE ({key}) is not finite: θ has diverged")
                name = "val/ce" if key == "all" else f"val/ce_{key}"
                self.log(name, value, prog_bar=key == "all", sync_dist=False)
                if key == "all":
                    self.log("val/ppl", torch.exp(value))
            metric.reset()

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("TokenWeightingLM needs optimizer= (a factory of the trainable parameters)")
        optimizer = self.optimizer_factory([p for p in self.model.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}
