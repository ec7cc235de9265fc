"""The layers of a model as a tree, and the freeze selectors that pick from it.

A model's layers are its ``model.layers`` without the ``InputLayer`` (a functional model lists
it, a Sequential one does not; it holds no weights). A layer that is itself a Keras model (the
Keras guide's ``base`` called inside a functional model, a ``keras.applications`` backbone) is a
nested model: its own layers sit below it and are named by their path, ``base/block_16_project``.
Keras forbids ``/`` in layer names, so a path is never ambiguous.

Selectors pick layers at one level: an index (``0``, ``-2``), a slice (``0:-1``), a name, a glob
(``conv*``), or ``@base`` (every top-level layer the pretrained model brought, not the new head).
``<nested>/<selector>`` applies any of them to a nested model's own layers, recursively
(``base/block_16_*``, ``base/0:-20``, ``outer/inner/conv*``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Set

from tfharness.config import SELECTOR_INDEX, SELECTOR_SLICE
from tfharness.errors import ConfigError

BASE_SELECTOR = "@base"
# How many layers an error message lists before it says how many more there are.
LISTED_LAYERS = 60


@dataclass
class LayerNode:
    """One layer of the tree: its path, the layer, its index among its siblings, and the
    nested models it sits inside (outermost first)."""

    path: str
    layer: object
    index: int
    ancestors: tuple

    @property
    def effectively_trainable(self) -> bool:
        """False when the layer or any nested model around it is frozen."""
        return bool(self.layer.trainable) and all(a.trainable for a in self.ancestors)


def visible_layers(model) -> List:
    """``model.layers`` without the InputLayer."""
    import keras

    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def is_nested(layer) -> bool:
    """Whether ``layer`` is a Keras model with layers of its own."""
    import keras

    return isinstance(layer, keras.Model)


def walk(model, prefix: str = "", ancestors: tuple = ()) -> Iterable[LayerNode]:
    """Every layer under ``model``, depth first: a nested model, then its own layers."""
    for index, layer in enumerate(visible_layers(model)):
        yield LayerNode(prefix + layer.name, layer, index, ancestors)
        if is_nested(layer):
            yield from walk(layer, f"{prefix}{layer.name}/", (*ancestors, layer))


def leaves(model) -> List[LayerNode]:
    """The layers that hold weights themselves: every layer except nested models."""
    return [node for node in walk(model) if not is_nested(node.layer)]


def _listing(layers: Sequence) -> str:
    shown = ", ".join(f"{i}:{layer.name}" for i, layer in enumerate(layers[:LISTED_LAYERS]))
    more = len(layers) - LISTED_LAYERS
    return shown + (f", ... ({more} more)" if more > 0 else "")


def match_level(selector: str, names: Sequence[str]) -> List[int]:
    """Indices of ``names`` that one plain selector (index, slice, name or glob) picks."""
    if SELECTOR_INDEX.match(selector):
        index = int(selector)
        return [index % len(names)] if -len(names) <= index < len(names) else []
    if SELECTOR_SLICE.match(selector):
        start, stop = (int(p) if p else None for p in selector.split(":"))
        return list(range(len(names)))[start:stop]
    return [i for i, n in enumerate(names) if fnmatch.fnmatchcase(n, selector)]


def _resolve(selector: str, model, prefix: str, key: str, shown: str) -> List[str]:
    layers = visible_layers(model)
    if "/" in selector:
        outer, rest = selector.split("/", 1)
        nested = [layer for layer in layers if is_nested(layer)
                  and fnmatch.fnmatchcase(layer.name, outer)]
        if not nested:
            names = [layer.name for layer in layers if is_nested(layer)]
            raise ConfigError(key, shown, f"a selector whose '{outer}/' names a nested model "
                              f"of {prefix or 'the model'}: "
                              f"{', '.join(names) or 'it has none'}")
        return [path for layer in nested
                for path in _resolve(rest, layer, f"{prefix}{layer.name}/", key, shown)]
    matched = match_level(selector, [layer.name for layer in layers])
    if not matched:
        where = f" of {prefix[:-1]}" if prefix else ""
        raise ConfigError(key, shown, f"a selector matching at least one layer{where}: "
                          f"{_listing(layers)}")
    return [prefix + layers[i].name for i in matched]


def resolve_selectors(selectors: Sequence[str], model, head_names: Sequence[str],
                      key: str) -> Set[str]:
    """The paths of the layers that ``selectors`` pick out of ``model``.

    Args:
        selectors: the stage's freeze list.
        model: the fine-tune model (the new head attached).
        head_names: the top-level layers of the new head, which ``@base`` leaves out.
        key: the config key of the list, for errors (``finetune.freeze``).

    Raises:
        ConfigError: a selector matches no layer (the message lists the layers it could match).
    """
    chosen: Set[str] = set()
    for position, raw in enumerate(selectors):
        selector = str(raw).strip()
        if selector == BASE_SELECTOR:
            chosen.update(layer.name for layer in visible_layers(model)
                          if layer.name not in head_names)
            continue
        chosen.update(_resolve(selector, model, "", f"{key}[{position}]", selector))
    return chosen


def is_selected(path: str, chosen: Set[str]) -> bool:
    """Whether ``path`` or a nested model around it was chosen."""
    parts = path.split("/")
    return any("/".join(parts[:i]) in chosen for i in range(1, len(parts) + 1))


def find(model, path: str) -> Optional[LayerNode]:
    return next((node for node in walk(model) if node.path == path), None)
