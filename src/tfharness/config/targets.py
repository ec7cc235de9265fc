"""``_target_``: how a config option names a callable, and how the harness calls it.

Every swappable part (``model``, ``data``, an optimizer, loss or metric given as a mapping, each
callback) is a mapping with ``_target_: <dotted path>`` and keyword arguments, as Hydra's
``instantiate`` takes it; the shipped options are such mappings too (their schemas default
``_target_``). :func:`call` resolves the path, checks the arguments against the callable's
signature and calls it, turning each way this can fail into one :class:`ConfigError` that names
the key (``model._target_``, ``trainer.callbacks[0]._target_``), what it got and what is
expected. Nested ``_target_`` mappings among the arguments are called first, the same way, so a
builder can take, say, an initializer object.

A user's modules import from the current folder, as ``python -m`` would allow: the command
``tfharness`` (a script in the environment's ``bin/``) would not otherwise see them.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

from tfharness.errors import ConfigError, HarnessError

TARGET = "_target_"


def is_target(node: Any) -> bool:
    """Whether ``node`` is a mapping (or schema instance) that names a ``_target_``."""
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return hasattr(node, TARGET)
    return isinstance(node, Mapping) and TARGET in node


def options_of(node: Any) -> Dict[str, Any]:
    """The keys of an option as a plain dict (a schema instance, a dict or a DictConfig)."""
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
    if hasattr(node, "_metadata"):  # a DictConfig
        from omegaconf import OmegaConf

        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def option_name(node: Any) -> str:
    """What to call an option in tags and run names: its ``name``, else its ``_target_``."""
    options = options_of(node)
    return str(options.get("name") or options.get(TARGET) or "?")


def import_current_folder() -> None:
    """Lets ``_target_`` paths import the user's modules from the current folder."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _import(path: str) -> Any:
    """The object at a dotted path: the longest importable module, then attributes.

    Hydra's ``get_object`` does the same but logs an error line of its own and, for a missing
    attribute, reports the path as a module that is "not a package".
    """
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        module_name = ".".join(parts[:end])
        try:
            found = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and (module_name + ".").startswith(exc.name + "."):
                continue  # this prefix is no module: try a shorter one
            raise  # the module exists, something it imports does not
        for depth, attribute in enumerate(parts[end:], start=end):
            if not hasattr(found, attribute):
                raise AttributeError(f"{'.'.join(parts[:depth])} has no attribute "
                                     f"'{attribute}'")
            found = getattr(found, attribute)
        return found
    raise ModuleNotFoundError(f"No module named '{parts[0]}'")


def resolve(key: str, path: Any) -> Callable:
    """The callable a ``_target_`` names; ``key`` is the option's key (``model``)."""
    if not isinstance(path, str) or not path.strip() or path != path.strip():
        raise ConfigError(f"{key}.{TARGET}", path,
                          "the dotted path of a callable, such as my_models.build")
    import_current_folder()
    try:
        target = _import(path)
    except Exception as exc:  # noqa: BLE001 - the user's module may fail in any way
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{key}.{TARGET}", path,
                          f"an importable dotted path to a callable (importing it failed: "
                          f"{reason}; modules import from the current folder "
                          f"{os.getcwd()})") from None
    if not callable(target):
        raise ConfigError(f"{key}.{TARGET}", path,
                          f"a callable (it is a {type(target).__name__})")
    return target


def arguments(key: str, node: Any, target: Callable, extra: Mapping[str, Any],
              optional: Iterable[str] = ()) -> Dict[str, Any]:
    """The keyword arguments ``target`` is called with: ``extra``, then the option's keys.

    Keys in ``optional`` (the ones the harness itself reads, such as ``data.seed``) are passed
    only when ``target`` takes them; every other key must be a parameter of ``target``.
    """
    kwargs = {k: v for k, v in options_of(node).items() if k != TARGET}
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # some builtins have no signature: let the call decide
        return {**kwargs, **extra}
    params = signature.parameters.values()
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    names = {p.name for p in params}
    for name in optional:
        if name in kwargs and not takes_any and name not in names:
            del kwargs[name]
    kwargs.update(extra)
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{key}.{TARGET}", options_of(node).get(TARGET),
                          f"a callable that accepts the keyword arguments "
                          f"{', '.join(sorted(kwargs)) or '(none)'} ({exc})") from None
    return kwargs


def call(key: str, node: Any, *, optional: Iterable[str] = (), **extra) -> Any:
    """Resolves ``node``'s ``_target_`` and calls it with its keys and ``extra``.

    Raises:
        ConfigError: naming ``<key>._target_`` when the path does not import, is not callable,
            rejects the arguments or raises; a :class:`HarnessError` raised by the callable
            itself (a shipped source naming its own bad key) passes through unchanged.
    """
    if not is_target(node):
        raise ConfigError(f"{key}.{TARGET}", None,
                          "a mapping with _target_ (the dotted path of a callable) and its "
                          "keyword arguments")
    path = options_of(node)[TARGET]
    target = resolve(key, path)
    kwargs = arguments(key, node, target, extra, optional)
    kwargs = {k: _instantiated(f"{key}.{k}", v) for k, v in kwargs.items()}
    try:
        return target(**kwargs)
    except HarnessError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code: report it on one line
        raise ConfigError(f"{key}.{TARGET}", path,
                          f"a callable that succeeds with these arguments; it raised "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                          ) from exc


def _instantiated(key: str, value: Any) -> Any:
    """Nested ``_target_`` mappings (and lists of them) among the arguments, instantiated."""
    if isinstance(value, list):
        return [_instantiated(f"{key}[{i}]", v) for i, v in enumerate(value)]
    if isinstance(value, Mapping) and TARGET in value:
        return call(key, value)
    return value


def check_result(key: str, node: Any, value: Any, expected: type, described: str) -> Any:
    """``value`` if it is an ``expected``, else a ConfigError naming ``<key>._target_``."""
    if not isinstance(value, expected):
        reject(key, node, value, described)
    return value


def reject(key: str, node: Any, value: Any, described: str) -> None:
    """Raises the ConfigError for a ``_target_`` that returned the wrong kind of object."""
    raise ConfigError(f"{key}.{TARGET}", options_of(node).get(TARGET),
                      f"a callable that returns {described} (it returned "
                      f"{type(value).__module__}.{type(value).__qualname__})")


def target_or_none(node: Any) -> Optional[str]:
    """The ``_target_`` of a mapping option, or None for a plain name."""
    return options_of(node).get(TARGET) if is_target(node) else None
