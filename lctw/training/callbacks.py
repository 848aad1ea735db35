"""What the weighting does during training, for a W&B dashboard and for the sweep report.

:class:`TokenWeights` (``conf/callbacks/default.yaml``):

* **Every training step** it keeps a sample of the valid targets' scores, weights and positions
  (``per_step`` of them, drawn with its own generator, so training's random streams are untouched)
  and the step's weight diagnostics (ESS and mass beyond n, :func:`lctw.method.weighting.weight_stats`, as the
  training step returns them). At the
  end of training they go to ``<run dir>/token_weights.npz``, which ``python -m lctw.runs.report`` reads
  for its histograms and its training-averaged weight diagnostics (and, with W&B, into the run's files).
  Memory stays bounded: past ``max_samples`` every other sampled step is dropped and sampling halves
  its rate, so the sample stays spread evenly over the whole run.
* **At each validation**, when the logger is W&B: the token view (:mod:`lctw.tools.tokenview`) of one fixed
  validation sequence (the first of the first validation batch) as HTML media, histograms of its
  scores and weights, and histograms of the training samples since the last validation. Other loggers
  (CSV, none) get nothing of this; a scorer without scores (``none``) has no view.

The samples are part of the callback's state, so a resumed run keeps those taken before the interruption.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)
SAMPLES = "token_weights.npz"


class TokenWeights(Callback):
    """Score/weight samples per step (-> ``token_weights.npz``) and the token view on W&B at each validation."""

    def __init__(self, per_step: int = 256, max_samples: int = 100_000, view: bool = True, top_k: int = 20,
                 seed: int = 0):
        if per_step < 1:
            raise ValueError(f"per_step={per_step} is out of range: allowed >= 1")
        if max_samples < per_step:
            raise ValueError(f"max_samples={max_samples} is out of range: allowed >= per_step ({per_step})")
        self.per_step, self.max_samples, self.view, self.top_k, self.seed = per_step, max_samples, view, top_k, seed
        self.every = 1  # sample every k-th training batch; doubles when the sample is thinned
        self.batches = 0
        # one entry per sampled batch: its index and (per_step,) tensors left on θ's device (no sync per step)
        self.sampled: list[int] = []
        self.samples: dict[str, list[torch.Tensor]] = {k: [] for k in ("scores", "weights", "positions", "valid")}
        self.steps: dict[str, list[torch.Tensor]] = {"ess": [], "mass_beyond_n": []}
        self.since_val = 0  # sampled batches since the last validation (its histograms)
        self._sequence: torch.Tensor | None = None
        self._view_failed = False

    # -- training ---------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not isinstance(outputs, dict) or "weights" not in outputs:
            return  # a skipped (faulty) step returns nothing
        weights, mask, scores, stats = outputs["weights"], outputs["mask"], outputs.get("scores"), outputs["stats"]
        self.steps["ess"].append(stats["weight_ess"].detach())
        self.steps["mass_beyond_n"].append(stats["weight_mass_beyond_n"].detach())
        self.batches += 1
        if (self.batches - 1) % self.every:
            return
        # per_step targets drawn uniformly (with replacement) from the batch; padding is dropped at the end
        rows, cols = mask.shape
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.batches)
        flat = torch.randint(rows * cols, (self.per_step,), generator=generator).to(mask.device)
        r, c = flat // cols, flat % cols
        self.samples["scores"].append(torch.full_like(weights[r, c], float("nan")) if scores is None
                                      else scores[r, c].detach().float())
        self.samples["weights"].append(weights[r, c].detach().float())
        self.samples["positions"].append(c + 1)  # tokens before the target
        self.samples["valid"].append(mask[r, c])
        self.sampled.append(self.batches - 1)
        self.since_val += 1
        if len(self.sampled) * self.per_step > self.max_samples:
            self._thin()

    def _thin(self) -> None:
        """Keep the samples of every other sampled batch (multiples of 2·every): still even over the run."""
        keep = [b % (2 * self.every) == 0 for b in self.sampled]
        self.sampled = [b for b, k in zip(self.sampled, keep, strict=True) if k]
        for key, chunks in self.samples.items():
            self.samples[key] = [x for x, k in zip(chunks, keep, strict=True) if k]
        self.every *= 2
        self.since_val = min(self.since_val, len(self.sampled))

    def arrays(self, last: int | None = None) -> dict[str, np.ndarray]:
        """The valid samples (of the ``last`` sampled batches only, if given) and the per-step diagnostics."""
        chunks = {k: v[len(v) - last :] if last is not None else v for k, v in self.samples.items()}
        cat = {k: torch.cat(v).cpu() if v else torch.zeros(0) for k, v in chunks.items()}
        valid = cat.pop("valid").bool()
        out = {k: v[valid].numpy() for k, v in cat.items()}
        out.update({f"step_{k}": torch.stack(v).double().cpu().numpy() if v else np.zeros(0)
                    for k, v in self.steps.items()})
        return out

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        path = Path(trainer.default_root_dir) / SAMPLES
        np.savez_compressed(path, n=np.asarray(pl_module.n), **self.arrays())
        if isinstance(trainer.logger, WandbLogger):
            try:
                trainer.logger.experiment.save(str(path), base_path=str(path.parent), policy="now")
            except Exception as err:  # W&B must never stop a run
                log.warning("W&B could not save %s: %s", path, err)

    # -- validation -------------------------------------------------------------------------------
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self._sequence is None and batch_idx == 0 and dataloader_idx == 0:
            length = int(batch["mask"][0].sum()) + 1 if "mask" in batch else batch["input_ids"].shape[1]
            self._sequence = batch["input_ids"][:1, :length].detach().clone()  # without its padding

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        logger = trainer.logger
        if trainer.sanity_checking or not isinstance(logger, WandbLogger) or not self.view or self._view_failed:
            return
        if self._sequence is None or not pl_module.scorer.produces_scores:
            return
        import wandb

        from lctw.tools.tokenview import to_html, token_view

        title = f"weighting={pl_module.weighting.name} scorer={pl_module.scorer.name} step {trainer.global_step}"
        try:  # every rank runs the forward (a sharded θ needs them all); rank 0 logs
            view = token_view(pl_module.model, pl_module.scorer, pl_module.weighting, self._sequence, _tokenizer(
                trainer), pl_module.n, title, pl_module.chunk_size)
        except ValueError as err:  # e.g. a score cache holds no scores for validation data
            log.warning("no token view at validation (%s); not trying again in this run", err)
            self._view_failed = True
            return
        if not trainer.is_global_zero:
            return
        media = {"val/token_view": wandb.Html(to_html(view, self.top_k), inject=False),
                 "val/token_view_scores": wandb.Histogram(view.score),
                 "val/token_view_weights": wandb.Histogram(view.weight)}
        if self.since_val:
            recent = self.arrays(last=self.since_val)
            media["train/weights_hist"] = wandb.Histogram(recent["weights"])
            if np.isfinite(recent["scores"]).all():
                media["train/scores_hist"] = wandb.Histogram(recent["scores"])
        self.since_val = 0
        logger.log_metrics(media, step=trainer.global_step)

    # -- resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"every": self.every, "batches": self.batches, "since_val": self.since_val, "sampled": self.sampled,
                "samples": {k: [x.cpu() for x in v] for k, v in self.samples.items()},
                "steps": {k: [x.cpu() for x in v] for k, v in self.steps.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.every, self.batches, self.since_val = state_dict["every"], state_dict["batches"], state_dict["since_val"]
        self.sampled = list(state_dict["sampled"])
        self.samples = {k: list(v) for k, v in state_dict["samples"].items()}
        self.steps = {k: list(v) for k, v in state_dict["steps"].items()}


def _tokenizer(trainer):
    """The run's tokenizer: the data module holds it (``lctw.data.LongDocuments``)."""
    tokenizer = getattr(trainer.datamodule, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("the data module has no tokenizer to show tokens with")
    return tokenizer
