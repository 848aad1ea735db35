"""Types of a configuration against the constructors its ``_target_`` nodes name (rules: :mod:`lctw.config`);
:func:`build` instantiates a checked node and reports a constructor's ValueError under its config key."""

from __future__ import annotations

import collections.abc
import contextlib
import difflib
import inspect
import os
import re
import types
import typing
from pathlib import PurePath
from typing import Any, Literal

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from lctw.errors import ConfigError, named


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


def _hints(fn) -> dict[str, Any]:
    """``fn``'s annotations, each resolved on its own: one that cannot be (a name imported only for type
    checkers) is left out, so it accepts anything, instead of losing the others with it."""
    fn, hints = inspect.unwrap(fn), {}
    for name, annotation in getattr(fn, "__annotations__", {}).items():
        with contextlib.suppress(Exception):  # evaluating an annotation can raise anything
            hints[name] = eval(annotation, fn.__globals__) if isinstance(annotation, str) else annotation  # noqa: S307
    return hints


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
    params, accepts_any = parameters(target_of(node, key))
    for name in node:
        if name.startswith("_"):
            continue
        if name not in params and not accepts_any:
            near = difflib.get_close_matches(name, list(params), n=1)
            advice = f"did you mean {key}.{near[0]}?" if near else f"allowed: {sorted(params)}"
            raise ConfigError(f"{key}.{name} is not an option of {key} ({node._target_}): {advice}")
        _check_entry(node, name, f"{key}.{name}", params.get(name, Any))


def check_keys(cfg: DictConfig, keys: dict[str, Any]) -> None:
    """The top-level keys' types, then every ``_target_`` node anywhere in ``cfg``."""
    for key, annotation in keys.items():
        if key in cfg.keys():  # `key in cfg` is False for a missing (???) value
            _check_entry(cfg, key, key, annotation)

    def walk(node, key):
        if _is_target(node):
            check_node(node, key)
        elif isinstance(node, DictConfig):
            for name in node:
                if not OmegaConf.is_missing(node, name):
                    walk(node[name], f"{key}.{name}" if key else name)

    walk(cfg, "")


def _check_entry(node: DictConfig, name: str, full: str, annotation) -> None:
    """One entry ``full`` of ``node``: given, a nested ``_target_`` node (or a list of them) checked in turn, or
    a value of the annotated type."""
    if OmegaConf.is_missing(node, name):
        raise ConfigError(f"{full} is missing (???): give it on the command line, {full}=<{describe(annotation)}>")
    value = node[name]
    if _is_target(value):
        return check_node(value, full)
    if isinstance(value, ListConfig) and any(_is_target(v) for v in value):
        for i, item in enumerate(value):
            if _is_target(item):
                check_node(item, f"{full}[{i}]")
        return None
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if not matches(value, annotation):  # the key it was set under only for the message
        check_value(_source(node, name, full), value, annotation)
    return None


def _source(node: DictConfig, name: str, full: str) -> str:
    """The key a value was set under: ``trainer.max_steps`` for ``scheduler.num_training_steps:
    ${trainer.max_steps}``, so that an error names the key the user wrote, not the one that copies it."""
    if OmegaConf.is_interpolation(node, name):
        match = re.fullmatch(r"\$\{([\w.]+)\}", str(OmegaConf.to_container(node, resolve=False)[name]))
        if match:
            return match.group(1)
    return full
