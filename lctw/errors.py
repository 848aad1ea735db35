"""The error of a configuration that cannot run, and how a part's own error is named under its config key.

A leaf: the config layer (:mod:`lctw.config`), the checkpoints and the score cache raise it without
importing each other.
"""

from __future__ import annotations

import contextlib
import re


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key, the value and what is allowed."""


def named(key: str, message: str) -> str:
    """A part's own error under its config key: ``lam=1.5 …`` -> ``weighting.lam=1.5 …``."""
    if message.startswith((f"{key}.", f"{key}=", f"{key}:")):
        return message
    if re.match(r"[A-Za-z_]\w*[=:]", message):
        return f"{key}.{message}"
    return f"{key}: {message}"


def check_lowest(cfg, table: dict) -> None:
    """``table``: dotted key -> (lowest allowed, what the message adds, *other allowed values); a value of ``cfg``
    below its lowest is refused, naming the key."""
    from omegaconf import OmegaConf

    for key, (lowest, note, *also) in table.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value < lowest and value not in also:
            raise ConfigError(f"{key}={value} is out of range: allowed >= {lowest}{note}")


def unknown_option(group: str, options, allowed) -> None:
    """A ValueError naming ``<group>.<key>`` for the first key of ``options`` that is not in ``allowed``."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{group}.{unknown[0]} is not an option of {group}: allowed {list(allowed)}")


@contextlib.contextmanager
def config_error(key: str | None = None):
    """A part's own ValueError raised inside, as the :class:`ConfigError` it is, named under ``key``."""
    try:
        yield
    except ValueError as err:
        raise ConfigError(named(key, str(err)) if key else str(err)) from None
