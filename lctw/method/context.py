"""Context extension of θ from its pretraining length n to N, through transformers' RoPE settings.

Each method of ``conf/context`` writes ``config.rope_parameters`` (transformers 5.x), sets
``config.max_position_embeddings = N`` and rebuilds the model's rotary-embedding modules so that the
inverse frequencies are transformers' own for those settings (``dynamic`` is the one exception to the
maximum positions: it keeps n there, see ``apply``). It is applied to θ only; a frozen θ0 is
copied before (``lctw.training.module``) and keeps its original RoPE.

    method   parameters (conf/context/<method>.yaml)
    none     -
    theta    rope_theta (RoPE base scaling, "ABF"; null = base · (N/n)^(d/(d-2)) over the d rotated
             dimensions per head, the NTK-aware rule)
    linear   factor (position interpolation; N/n)
    dynamic  factor (dynamic NTK: frequencies rescale with the current length beyond n)
    yarn     factor, original_max_position_embeddings n, beta_fast, beta_slow
    llama3   factor, low_freq_factor, high_freq_factor, original_max_position_embeddings n
"""

from __future__ import annotations

METHODS = ("none", "theta", "linear", "dynamic", "yarn", "llama3")
# the numeric rope parameters of transformers' methods (yarn's ``truncate`` is a bool)
NUMBERS = ("factor", "rope_theta", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
           "mscale", "mscale_all_dim", "low_freq_factor", "high_freq_factor")


class ContextExtension:
    """Set RoPE scaling on a model's config and rebuild its rotary embeddings.

    ``params`` are the method's rope parameters; ``None`` values are dropped so that transformers'
    defaults apply (e.g. yarn's beta_fast = 32).
    """

    def __init__(self, method: str, max_len: int, n: int, **params):
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not allowed: choose one of {list(METHODS)}")
        if n > max_len or (n == max_len and method != "none"):
            raise ValueError(f"n={n} must be smaller than max_len={max_len} (context extension goes from n to N)")
        # The method parameters come through **params, so the config layer cannot check their types
        # against annotations; transformers would compare a string with a number and fail with a TypeError.
        for key in NUMBERS:
            value = params.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{key}={value!r} has the wrong type: expected a number")
        factor = params.get("factor")
        if factor is not None and factor < 1:
            raise ValueError(f"factor={factor} is out of range: allowed >= 1 (typically N/n)")
        theta = params.get("rope_theta")
        if theta is not None and theta <= 0:
            raise ValueError(f"rope_theta={theta} is out of range: allowed > 0")
        # transformers only warns about these, then fails with a math domain error (a negative beta) or
        # divides by zero (equal frequency factors) when the rotary embeddings are rebuilt; a beta of 0 it
        # silently replaces by its default.
        for key in ("beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor"):
            value = params.get(key)
            if value is not None and value <= 0:
                raise ValueError(f"{key}={value} is out of range: allowed > 0")
        fast, slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1  # transformers' defaults
        if fast <= slow:
            raise ValueError(f"beta_fast={fast} must be greater than beta_slow={slow} (null: 32 and 1)")
        low, high = params.get("low_freq_factor"), params.get("high_freq_factor")
        if low is not None and high is not None and high <= low:
            raise ValueError(f"high_freq_factor={high} must be greater than low_freq_factor={low}")
        self.method, self.max_len, self.n = method, int(max_len), int(n)
        self.params = {k: v for k, v in params.items() if v is not None}

    def rope_parameters(self, config) -> dict:
        """The ``rope_parameters`` this method gives a model whose current ones are ``config``'s."""
        old = dict(config.rope_parameters)
        if self.method == "none":
            return old
        if self.method == "theta":
            theta = self.params.get("rope_theta")
            if theta is None:
                d = rotary_dim(config)
                theta = old["rope_theta"] * (self.max_len / self.n) ** (d / (d - 2))
            return {**old, "rope_type": old.get("rope_type", "default"), "rope_theta": float(theta)}
        new = {"rope_theta": old["rope_theta"], "rope_type": self.method, **self.params}
        new.setdefault("factor", self.max_len / self.n)
        return new

    def apply(self, model) -> None:
        config = model.config
        config.rope_parameters = self.rope_parameters(config)
        # transformers' dynamic NTK reads max_position_embeddings as the *original* length and rescales
        # only beyond it; setting it to N would switch the method off for every length up to N.
        config.max_position_embeddings = self.n if self.method == "dynamic" else self.max_len
        config.validate_rope()
        _rebuild_rotary(model)


def head_dim(config) -> int:
    """The attention head size: ``config.head_dim`` where set, else hidden size / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rotary_dim(config) -> int:
    """The number of rotated dimensions per head, as transformers computes it: head size × the
    ``partial_rotary_factor`` (phi-2 rotates 32 of its 80). The NTK base rule's exponent d/(d-2) is
    over these dimensions, because only they carry RoPE frequencies."""
    factor = (config.rope_parameters or {}).get("partial_rotary_factor",
                                                 getattr(config, "partial_rotary_factor", None) or 1.0)
    return int(head_dim(config) * factor)


def _rebuild_rotary(model) -> None:
    """Re-create every rotary-embedding module from the (changed) config, keeping device and dtype."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RotaryEmbedding") and hasattr(child, "inv_freq"):
                fresh = type(child)(config=child.config)
                setattr(parent, name, fresh.to(child.inv_freq.device))
