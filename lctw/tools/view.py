"""Which tokens get weight: the token view (:mod:`lctw.tools.tokenview`) of a text file, as HTML and PNG.

    python -m lctw.tools.view model=smollm2 context=none scorer=self n=128 N=1024 text=essay.txt
    python -m lctw.tools.view ckpt=outputs/runs/<date>/<time> n=32 N=128 weighting=sparse text=essay.txt

θ is ``ckpt`` (a run directory, a Lightning ``.ckpt`` or a Hugging Face model directory, loaded by
:func:`lctw.models.theta.load_theta`) or, without it, ``model`` extended by ``context``
(:func:`lctw.models.theta.build_theta`). The scorer, weighting, n and N are this command's config (a run's own
are compared and a mismatch is warned about). The text is read as training reads documents: BOS, then
its tokens, cut to ``max_tokens`` (default N). Written to the Hydra run directory
(``outputs/inspect/<date>/<time>``): ``tokens.html`` (the text coloured by score and by weight, the top
tokens), ``tokens.png`` (scores and weights along the text) and ``tokens.json`` (the top tokens, the
timing); the top tokens are also printed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from lctw.config import TRAIN_KEYS, ConfigError, build, check_keys, check_lengths, check_ranges
from lctw.models import DTYPES
from lctw.models.theta import build_theta, check_model_path, load_theta, resolve_device
from lctw.runs.jobs import run_job
from lctw.tools.tokenview import save_png, to_html, token_view
from lctw.training import base

log = logging.getLogger(__name__)


def _theta(cfg: DictConfig):
    """(θ, tokenizer, the spec a fixed scorer loads θ' from, the run's config or None)."""
    from lctw.models import HFModel

    if not cfg.ckpt:
        spec = build(cfg.model, "model")
        base.prepare(spec)  # θ0 of model=tiny: the base stage first, when it is not cached
        return build_theta(spec, build(cfg.context, "context")).eval(), spec.tokenizer(), spec, None
    model, tokenizer, run_cfg = load_theta(cfg.ckpt, cfg.dtype)
    if run_cfg is not None:
        spec = build(run_cfg.model, "model")
        base.prepare(spec)  # a frozen scorer loads the run's θ0
    else:
        path = Path(cfg.ckpt).expanduser()
        spec = HFModel(str(path / "hf" if (path / "hf" / "config.json").exists() else path), dtype=cfg.dtype)
    return model, tokenizer, spec, run_cfg


def _warn_if_not_the_runs(cfg: DictConfig, run_cfg: DictConfig) -> None:
    keys = ("n", "N", "scorer._target_", "weighting")
    mine = {k: OmegaConf.select(cfg, k) for k in keys}
    theirs = {k: OmegaConf.select(run_cfg, k) for k in keys}
    differ = [k for k in keys if mine[k] != theirs[k]]
    if differ:
        log.warning("the view uses other settings than the run was trained with (%s): run %s, here %s", differ,
                    {k: theirs[k] for k in differ}, {k: mine[k] for k in differ})


INSPECT_KEYS = {**TRAIN_KEYS, "ckpt": str | None, "text": str, "max_tokens": int | None, "top_k": int,
                "dtype": Literal[tuple(DTYPES)], "device": str}


def validate_inspection(cfg: DictConfig) -> tuple[Any, Any]:
    """This tool's configuration, before any model loads; returns (scorer, weighting)."""
    check_keys(cfg, INSPECT_KEYS)
    check_ranges(cfg)
    if not Path(cfg.text).expanduser().is_file():
        raise ConfigError(f"text={cfg.text!r} is not a file: give the text file to inspect")
    if cfg.max_tokens is not None and cfg.max_tokens < 3:
        raise ConfigError(f"max_tokens={cfg.max_tokens} is out of range: allowed >= 3 (BOS and two targets), or null")
    if cfg.top_k < 1:
        raise ConfigError(f"top_k={cfg.top_k} is out of range: allowed >= 1")
    resolve_device(cfg.device, "device")
    if cfg.ckpt:
        check_model_path("ckpt", cfg.ckpt)
    check_lengths(cfg)
    weighting, scorer = build(cfg.weighting, "weighting"), build(cfg.scorer, "scorer")
    if not scorer.produces_scores:
        raise ConfigError("scorer=none has no scores to show: allowed scorer=self, frozen or small")
    return scorer, weighting


def inspect_text(cfg: DictConfig, out_dir: str | os.PathLike | None = None) -> dict:
    """Write the token view of ``cfg.text``; returns the top tokens and the timings."""
    scorer, weighting = validate_inspection(cfg)
    if out_dir is None:
        from hydra.core.hydra_config import HydraConfig

        out_dir = HydraConfig.get().runtime.output_dir
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    theta, tokenizer, spec, run_cfg = _theta(cfg)
    if run_cfg is not None:
        _warn_if_not_the_runs(cfg, run_cfg)
    scorer.setup(spec)
    device = resolve_device(cfg.device)
    theta, scorer = theta.to(device), scorer.to(device)
    loaded = time.perf_counter()
    text = Path(cfg.text).expanduser().read_text()
    limit = cfg.max_tokens or cfg.N
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = [bos] + tokenizer(text, add_special_tokens=False)["input_ids"][: limit - 1]
    title = (f"weighting={weighting.name} scorer={scorer.name} n={cfg.n} N={cfg.N} "
             f"θ={cfg.ckpt or spec.describe()} text={Path(cfg.text).name}")
    view = token_view(theta, scorer, weighting, torch.tensor([ids], device=device), tokenizer, cfg.n, title,
                      cfg.chunk_size)
    scored = time.perf_counter()
    (out / "tokens.html").write_text(to_html(view, cfg.top_k))
    save_png(view, out / "tokens.png")
    top = [{"rank": r, "position": j + 1, "token": view.tokens[j], "context": "".join(view.tokens[max(0, j - 8) : j]),
            "logp_long": view.long[j], "logp_short": view.short[j], "score": view.score[j], "weight": view.weight[j]}
           for r, j in enumerate(view.top(cfg.top_k), 1)]
    result = {"title": title, "tokens": len(ids), "load_s": loaded - start, "score_s": scored - loaded,
              "score_mean": float(view.score.mean()), "top": top}
    (out / "tokens.json").write_text(json.dumps(result, indent=2, ensure_ascii=False, default=float))
    print(f"{title}\n{len(ids)} tokens; θ and θ' loaded in {loaded - start:.1f} s, scored in {scored - loaded:.1f} s; "
          f"mean score {view.score.mean():.4f}\n")
    print("| rank | position | token | log p long | log p short | s_i | w_i |\n|---|---|---|---|---|---|---|")
    for t in top:
        print(f"| {t['rank']} | {t['position']} | {t['token']!r} | {t['logp_long']:.3f} | {t['logp_short']:.3f} | "
              f"{t['score']:.3f} | {t['weight']:.3f} |")
    print(f"\nwritten: {out / 'tokens.html'}, {out / 'tokens.png'}")
    return result


@hydra.main(config_path="../../conf", config_name="inspect", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_job(cfg, inspect_text)


if __name__ == "__main__":
    main()
