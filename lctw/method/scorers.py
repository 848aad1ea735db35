"""The scorer protocol and its implementations: θ', the short-context model of the method.

A scorer answers one question for a training batch: the short-context log-probs
``short_i = log p_θ'(x_i | at most n preceding tokens)``, given θ and the long-context log-probs of the
training pass (``scorer(theta, batch, long_logprobs) -> (B, T-1) float32 or None``). The weighting
then compares them with the long ones. Every scorer declares two facts the rest of the code relies on:

* ``produces_scores``: False only for ``none`` (uniform weighting needs no θ').
* ``fixed``: θ' does not change during training, so its log-probs are a function of the data and can
  be computed once (``score.py``) and read back (:class:`lctw.cache.scorer.CachedScorer`). True for ``frozen`` and
  ``small``; False for ``self``, whose θ' is θ as it trains.

Live or cached is chosen in one visible place: ``scorer.cache`` in the config, which makes
:func:`lctw.training.experiment.run` wrap the fixed scorer in a :class:`lctw.cache.scorer.CachedScorer`.

Scorers are ``torch.nn.Module``s, so a fixed scorer's model (θ0 or the small model) is a registered
submodule of the LightningModule: the strategy moves (and shards) it with θ. It is never trainable,
never in the optimizer, stays in eval mode, and is left out of checkpoints unless ``save=True``
(on resume it is rebuilt from its spec, which is cheaper than storing a second model).

Adding a scorer: subclass :class:`Scorer` (set ``name`` and ``fixed``, implement ``forward``; load a
model in ``setup`` if it needs one) and add ``conf/scorer/<name>.yaml``; see docs/architecture.md.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import Tensor

from lctw.method.scoring import ShortContext

log = logging.getLogger(__name__)


class Scorer(torch.nn.Module):
    """The protocol. ``forward(theta, batch, long_logprobs)`` returns short log-probs (B, T-1) or None."""

    name = "scorer"
    fixed = False  # True: θ' never changes during training, so its log-probs can be cached
    produces_scores = True

    def __init__(self, n: int, max_len: int):
        super().__init__()
        self.n, self.max_len = int(n), int(max_len)

    def setup(self, theta_spec, meta: bool = False) -> None:
        """Load θ' if the scorer has its own model; called once with the trained model's spec. ``meta``:
        the architecture only, on the meta device (a rank that receives the weights when sharding,
        :mod:`lctw.training.distributed`)."""

    def forward(self, theta, batch: dict, long_logprobs: Tensor) -> Tensor | None:
        raise NotImplementedError


class NoScorer(Scorer):
    """The uniform baseline: no θ', no scores."""

    name = "none"
    produces_scores = False

    def __init__(self, n: int = 2, max_len: int = 4):
        super().__init__(n, max_len)

    def forward(self, theta, batch, long_logprobs):
        return None


class SelfScorer(Scorer):
    """θ itself with its context cut to n ("unfrozen"); no extra memory, no gradient.

    The first n targets (x_2 … x_{n+1}) have at most n preceding tokens, so their short context *is* the
    full one: they reuse the training pass's log-probs (score 0), in every mode, as the paper's code
    does; the rest are computed (in chunked mode the first window is not run at all).
    """

    name = "self"

    def __init__(self, n: int, max_len: int, mode: str = "chunked", stride: int | None = None,
                 sink: bool | str = False, attention: str = "auto"):
        super().__init__(n, max_len)
        self.short = ShortContext(n, max_len, mode, stride, sink, attention)

    def forward(self, theta, batch, long_logprobs):
        short = self.short.logprobs(theta, batch["input_ids"], skip_shared=True)
        short[:, : self.n] = long_logprobs[:, : self.n].detach().float()
        return short


class FixedScorer(Scorer):
    """A θ' that never changes during training: a model of its own, eval mode, no gradient.

    Subclasses say which model (:meth:`source`). ``use`` installs an already loaded model.
    """

    fixed = True

    def __init__(self, n: int, max_len: int, mode: str = "chunked", stride: int | None = None,
                 sink: bool | str = False, attention: str = "auto", save: bool = False):
        super().__init__(n, max_len)
        self.short = ShortContext(n, max_len, mode, stride, sink, attention)
        self.save = bool(save)
        self.model: torch.nn.Module | None = None

    def source(self, theta_spec):
        """The model spec θ' is loaded from (it identifies the scores in the cache)."""
        raise NotImplementedError

    def check(self, theta_spec, tokenizer) -> None:
        """θ' against θ (``tokenizer``: θ's) before any weights load: a small model must share θ's vocabulary.
        Windows longer than θ' was pretrained at are a legitimate experiment but rarely the intended one (the
        scores then include positions θ' never saw), so they are said."""
        source = self.source(theta_spec)
        if source is not theta_spec and (vocab := source.tokenizer().get_vocab()) != tokenizer.get_vocab():
            raise ValueError(f"scorer=small: scorer.model ({source.describe()}) has a different vocabulary "
                             f"({len(vocab)} tokens) from model ({theta_spec.describe()}, {len(tokenizer)} tokens); "
                             "the small scorer must use the same tokenizer")
        trained = source.pretrained_length()
        if trained is not None and self.n > trained:
            log.warning("scorer.n=%d is longer than the %d tokens θ′ (%s) was pretrained at: its windows reach "
                        "positions θ′ never saw in pretraining", self.n, trained,
                        "model" if source is theta_spec else "scorer.model")

    def setup(self, theta_spec, meta: bool = False) -> None:
        if meta:
            with torch.device("meta"):
                self.use(self.source(theta_spec).load(weights=False))
        else:
            self.use(self.source(theta_spec).load())

    def use(self, model: torch.nn.Module) -> FixedScorer:
        self.model = model.eval().requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> FixedScorer:
        super().train(mode)
        if self.model is not None:
            self.model.eval()  # θ' is evaluated, never trained, whatever the LightningModule's mode
        return self

    def forward(self, theta, batch, long_logprobs):
        if self.model is None:
            raise RuntimeError(f"scorer={self.name}: setup() was not called, θ' is not loaded")
        return self.short.logprobs(self.model, batch["input_ids"])


class FrozenScorer(FixedScorer):
    """θ0: the model before context extension (original RoPE), loaded from the trained model's own spec.

    ``cache`` (``scorer.cache``): false computes the scores on the fly; true or a directory reads them
    from the cache ``score.py`` wrote instead (:class:`CachedScorer`, θ0 is then not loaded); anything
    else is refused (:func:`cache_option`).
    """

    name = "frozen"

    def __init__(self, *args, cache: bool | str | None = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.cache = cache_option(cache)

    def source(self, theta_spec):
        return theta_spec


class SmallScorer(FixedScorer):
    """A separate (smaller) pretrained model with the same vocabulary: weak-to-strong scoring.

    ``model`` is a model spec from ``conf/model``; :meth:`check` compares its tokenizer with the trained
    model's before any weights load.
    """

    name = "small"

    def __init__(self, model, *args, cache: bool | str | None = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.spec, self.cache = model, cache_option(cache)

    def source(self, theta_spec):
        return self.spec


# Words YAML 1.1, shells and other tools read as booleans: as a directory name they are almost surely a typo.
_BOOLEAN_WORDS = {"true", "false", "yes", "no", "y", "n", "on", "off", "1", "0", "none", "null", ""}


def cache_option(cache) -> bool | Path:
    """The ``cache`` option of a fixed scorer: False (compute live), True (the default cache) or a directory.

    Accepts false/null, true, or a string that looks like a directory path (it contains a ``/`` or
    starts with ``~`` or ``.``, or is an existing directory) and could be one (no file in the way).
    Refuses anything else with a ValueError about ``cache``, e.g. ``yes``, ``on`` or ``1``, which would
    otherwise name a directory "yes" and find no cache there, or (``0``) silently score live.
    """
    allowed = "allowed false, true or a directory path such as ./scores or /data/scores"
    if cache is None or isinstance(cache, bool):
        return bool(cache)
    if not isinstance(cache, str):
        raise ValueError(f"cache={cache!r} is not allowed: {allowed}")
    if cache.strip().lower() in _BOOLEAN_WORDS:
        raise ValueError(f"cache={cache!r} is not allowed: {allowed} (write true or false unquoted; "
                         f"./{cache.strip() or '<name>'} for a directory of that name)")
    path = Path(cache).expanduser()
    if not (os.sep in cache or "/" in cache or cache.startswith(("~", ".")) or path.is_dir()):
        raise ValueError(f"cache={cache!r} is not allowed: {allowed} (./{cache} for a directory of that name)")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"cache={cache!r} cannot be a directory: {existing} is a file; {allowed}")
    return path
