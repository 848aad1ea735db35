"""The one validation layer: every entry point calls :func:`validate` before anything loads or is written.

Each part's constructor checks only its own arguments and raises plain errors about them
(``lam=1.5 is out of range: allowed [0, 1]``); :func:`build` reports them under the config key they
came from (``weighting.lam=1.5 is out of range: allowed [0, 1]``). The invariants that join several
keys (n < N, a weighting that needs scores, a cache that needs a fixed scorer, the small scorer's
vocabulary) are checked here and nowhere else. Tokenizers are cheap and are compared here; no model
weights are ever loaded by :func:`validate`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key, the value and what is allowed."""


def _register_resolvers() -> None:
    from lctw.jobs import run_token

    if not OmegaConf.has_resolver("div"):
        OmegaConf.register_new_resolver("div", lambda a, b: a / b)
    if not OmegaConf.has_resolver("run_token"):  # unique run directories (lctw.jobs)
        OmegaConf.register_new_resolver("run_token", run_token)


_register_resolvers()


def named(key: str, message: str) -> str:
    """A part's own error under its config key: ``lam=1.5 …`` -> ``weighting.lam=1.5 …``."""
    if message.startswith((f"{key}.", f"{key}=", f"{key}:")):
        return message
    if re.match(r"[A-Za-z_]\w*[=:]", message):
        return f"{key}.{message}"
    return f"{key}: {message}"


def build(node: DictConfig, key: str, **kwargs):
    """``instantiate(node)``; a constructor's ValueError comes back as a :class:`ConfigError` naming ``key``."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ValueError):
            raise ConfigError(named(key, str(err.__cause__))) from None
        raise


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
    for key, value in (("n", n), ("N", big_n)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be an integer")
    if n < 2:
        raise ConfigError(f"n={n} is out of range: allowed 2 <= n < N (the short context)")
    if n > big_n or (n == big_n and cfg.context.get("method") != "none"):
        raise ConfigError(f"n={n} must be smaller than N={big_n}: allowed 2 <= n < N (context extension n -> N; "
                          "N = n only for the base stage: context=none scorer=none)")


def validate(cfg: DictConfig, for_cache: bool = False) -> Parts:
    """Instantiate the cheap parts (their constructors check their own keys) and check what joins them.

    ``for_cache``: the configuration fills a score cache (``score.py``), so the scorer must be fixed.
    """
    check_lengths(cfg)
    weighting = build(cfg.weighting, "weighting")
    context = build(cfg.context, "context")
    scorer = build(cfg.scorer, "scorer")
    if weighting.needs_scores and not scorer.produces_scores:
        raise ConfigError(f"weighting={weighting.name} needs a scorer: scorer=none allows only weighting=uniform")
    cached = cfg.scorer.get("cache")
    if (cached or for_cache) and not scorer.fixed:
        what = "score.py" if for_cache else f"scorer.cache={cached}"
        raise ConfigError(f"{what} needs a fixed scorer: allowed scorer=frozen or scorer=small (scorer={scorer.name} "
                          "changes during training or has no scores, so its log-probs cannot be cached)")
    model_spec = build(cfg.model, "model")
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
    if cfg.get("nonfinite") is not None:
        from lctw.module import check_nonfinite

        try:
            check_nonfinite(cfg.nonfinite.policy, cfg.nonfinite.max_skipped)
        except ValueError as err:
            raise ConfigError(named("nonfinite", str(err))) from None
    if cfg.get("eval"):
        build(cfg.eval, "eval")  # the evaluation's options are checked before training starts
    return Parts(model_spec, scorer, weighting, context, tokenizer)
