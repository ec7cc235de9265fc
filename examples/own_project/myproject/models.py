"""The model: any callable that takes input_shape and num_classes and returns a keras.Model."""

import keras


def tower(input_shape, num_classes, width=32, depth=2, dropout=0.0):
    """Dense layers of ``width`` units, ``depth`` of them, then a softmax output.

    tfharness passes ``input_shape`` and ``num_classes`` (both from the data) and every other
    key of ``configs/model/tower.yaml`` as keyword arguments.
    """
    model = keras.Sequential(name="tower")
    model.add(keras.Input(shape=input_shape))
    model.add(keras.layers.Flatten(name="flatten"))
    for i in range(depth):
        model.add(keras.layers.Dense(width, activation="relu", name=f"hidden_{i}"))
        if dropout:
            model.add(keras.layers.Dropout(dropout, name=f"dropout_{i}"))
    model.add(keras.layers.Dense(num_classes, activation="softmax", name="output"))
    return model
