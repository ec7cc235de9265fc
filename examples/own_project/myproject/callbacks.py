"""A callback: any keras.callbacks.Callback, listed under trainer.callbacks by _target_."""

import keras


class StopAtAccuracy(keras.callbacks.Callback):
    """Stops training once the training accuracy reaches ``target``."""

    def __init__(self, target=0.99):
        super().__init__()
        self.target = target

    def on_epoch_end(self, epoch, logs=None):
        if (logs or {}).get("accuracy", 0.0) >= self.target:
            self.model.stop_training = True
