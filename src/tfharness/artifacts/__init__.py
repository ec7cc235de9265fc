"""Artifacts: everything a run writes to disk (or memory) and reads back.

- ``serialization``: atomic saves, SavedModel -> Keras reload, output verification;
- ``serving``: SavedModel signatures and TensorFlow Serving's numbered versions;
- ``inmemory``: a model to bytes and back, no file written;
- ``integrity``: sha256 records of artifacts and the check before loading;
- ``checkpoint``: per-epoch checkpoints, run state, resume, signals, NaN stop.
"""
