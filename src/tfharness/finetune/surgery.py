"""Head surgery on a model's graph: cut it where the config says and attach a new head.

Works on any single-input, single-output Keras model, Sequential or functional, branches and
residual connections inside: the cut is a functional rebuild on the existing graph,
``keras.Model(model.inputs, cut_output)``, never a re-stacking of ``model.layers`` (which cannot
express branches and fails on functional models). The pretrained layers are shared with the
model they came from, weights and all.

Where to cut: ``finetune.head.cut=<layer>`` names a top-level layer; ``finetune.head.pop=N``
walks N layers back from the output along the output path (``0``: the head goes on top). What
follows the cut must hang from it alone: a layer after it that also reads a tensor from before
the cut (a residual ``Add`` whose other branch starts earlier) would lose that branch, so that
is an error naming the layer.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from tfharness.config import HEAD_POOLING, HeadConfig
from tfharness.errors import ConfigError

HEAD_NAME = "head"
POOLING = HEAD_POOLING


def check_single_io(model, key: str, shown: str) -> None:
    """Raises :class:`ConfigError` unless ``model`` has exactly one input and one output."""
    try:
        inputs, outputs = len(model.inputs or []), len(model.outputs or [])
    except (AttributeError, ValueError):
        inputs = outputs = 0
    if not inputs:
        raise ConfigError(key, shown, "a Sequential or functional model with one input and one "
                          "output (this one has no graph of layers to cut or freeze: a "
                          "subclassed model?)")
    if inputs != 1 or outputs != 1:
        raise ConfigError(key, shown, f"a model with one input and one output; this one has "
                          f"{inputs} input(s) ({', '.join(t.name for t in model.inputs)}) and "
                          f"{outputs} output(s)")


def _producer(tensor):
    history = tensor._keras_history
    return history.operation, history.operation._inbound_nodes[history.node_index]


def graph_nodes(model) -> Dict[int, Tuple[object, object]]:
    """``id(operation) -> (operation, node)`` for each call in ``model``'s graph."""
    found: Dict[int, Tuple[object, object]] = {}
    stack = list(model.outputs)
    while stack:
        operation, node = _producer(stack.pop())
        if id(operation) not in found:
            found[id(operation)] = (operation, node)
            stack.extend(node.input_tensors)
    return found


def _inputs_of(node) -> List:
    return [_producer(t)[0] for t in node.input_tensors]


def _popped(model, pop: int):
    """The operation ``pop`` steps back from the output along the output path."""
    import keras

    operation, node = _producer(model.outputs[0])
    for step in range(pop):
        inputs = _inputs_of(node)
        if isinstance(operation, keras.layers.InputLayer) or not inputs:
            raise ConfigError("finetune.head.pop", pop, f"at most {step - 1}: the output path "
                              f"has only {step} layers after the input")
        if len(inputs) != 1:
            raise ConfigError("finetune.head.pop", pop, f"at most {step}: layer "
                              f"'{operation.name}' merges {len(inputs)} inputs "
                              f"({', '.join(i.name for i in inputs)}), so there is no single "
                              f"layer to hang the head from; name one with finetune.head.cut")
        operation, node = _producer(node.input_tensors[0])
    if isinstance(operation, keras.layers.InputLayer):
        raise ConfigError("finetune.head.pop", pop, f"at most {pop - 1}: popping {pop} layers "
                          f"leaves only the input")
    return operation, node


def _named(model, name: str, nodes):
    import keras

    for operation, node in nodes.values():
        if operation.name == name and not isinstance(operation, keras.layers.InputLayer):
            return operation, node
    names = [layer.name for layer in model.layers
             if not isinstance(layer, keras.layers.InputLayer)]
    nested = (" (a layer inside a nested model cannot be cut at: cut at the nested model)"
              if "/" in name else "")
    raise ConfigError("finetune.head.cut", name, f"a top-level layer of the model{nested}: "
                      f"{', '.join(names)}")


def _check_single_entry(cut, nodes) -> None:
    """Every layer after ``cut`` reads only from the cut or from layers after it."""
    producers = {key: _inputs_of(node) for key, (_, node) in nodes.items()}
    consumers: Dict[int, List[int]] = {}
    for key, inputs in producers.items():
        for producer in inputs:
            consumers.setdefault(id(producer), []).append(key)
    after, frontier = set(), [id(cut)]
    while frontier:
        for key in consumers.get(frontier.pop(), []):
            if key not in after:
                after.add(key)
                frontier.append(key)
    for key in after:
        for producer in producers[key]:
            if producer is not cut and id(producer) not in after:
                raise ConfigError(
                    "finetune.head.cut", cut.name,
                    f"a layer that everything after it hangs from: layer '{nodes[key][0].name}' "
                    f"after the cut also reads '{producer.name}', which comes before it, so the "
                    f"layers after '{cut.name}' do not form a single path to the output")


def cut_point(model, head: HeadConfig):
    """The layer the head hangs from and its output tensor in ``model``'s graph."""
    nodes = graph_nodes(model)
    if head.cut:
        operation, node = _named(model, head.cut, nodes)
        _check_single_entry(operation, nodes)
    else:
        operation, node = _popped(model, head.pop)
    if len(node.output_tensors) != 1:
        raise ConfigError("finetune.head.cut" if head.cut else "finetune.head.pop",
                          head.cut or head.pop, f"a layer with one output; '{operation.name}' "
                          f"has {len(node.output_tensors)}")
    return operation, node.output_tensors[0]


def unique_name(wanted: str, taken) -> str:
    name, n = wanted, 1
    while name in taken:
        name, n = f"{wanted}_{n}", n + 1
    return name


def _pooling_layer(kind: str, rank: int, name: str):
    import keras

    layers = keras.layers
    if kind == "flatten":
        return layers.Flatten(name=name)
    classes = {"avg": (layers.GlobalAveragePooling1D, layers.GlobalAveragePooling2D,
                       layers.GlobalAveragePooling3D),
               "max": (layers.GlobalMaxPooling1D, layers.GlobalMaxPooling2D,
                       layers.GlobalMaxPooling3D)}[kind]
    return classes[rank - 3](name=name)


def attach_head(model, head: HeadConfig):
    """A new model sharing ``model``'s layers up to the cut, then the new head.

    Returns ``(new_model, head_names)``: the top-level names of the layers the head added
    (pooling, dropout, the Dense layer), which ``@base`` leaves out.
    """
    import keras

    cut, tensor = cut_point(model, head)
    taken = {op.name for op, _ in graph_nodes(model).values()}
    rank = len(tensor.shape)
    added = []
    if rank > 2:
        if head.pooling is None:
            raise ConfigError("finetune.head.pooling", None, f"one of {', '.join(POOLING)}: the "
                              f"output of '{cut.name}' is a feature map of shape "
                              f"{tuple(tensor.shape)}, and a Dense head needs one vector per "
                              f"sample")
        if rank > 5 and head.pooling != "flatten":
            raise ConfigError("finetune.head.pooling", head.pooling,
                              f"flatten: the output of '{cut.name}' has shape "
                              f"{tuple(tensor.shape)}, beyond what global pooling takes")
        added.append(_pooling_layer(head.pooling, rank, unique_name(f"{HEAD_NAME}_pool", taken)))
    if head.dropout > 0:
        added.append(keras.layers.Dropout(head.dropout,
                                          name=unique_name(f"{HEAD_NAME}_dropout", taken)))
    added.append(keras.layers.Dense(head.num_classes, activation=head.activation,
                                    name=unique_name(HEAD_NAME, taken)))
    outputs = tensor
    for layer in added:
        outputs = layer(outputs)
    # One input tensor, not a list of one: Keras warns on every call otherwise.
    tuned = keras.Model(model.inputs[0], outputs, name=f"{model.name}_finetuned")
    return tuned, [layer.name for layer in added]
