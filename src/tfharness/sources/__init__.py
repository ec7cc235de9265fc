"""Where a run starts: find, check, load and verify a saved model (the ``source`` group).

``loading`` recognises each kind of artifact and loads it; ``legacy_keras`` is the script a
child process runs to convert a Keras 2 SavedModel with tf_keras.
"""

from tfharness.sources.loading import (  # noqa: F401
    H5_FILE,
    HARNESS_SAVEDMODEL,
    KERAS_FILE,
    LEGACY_EXTRA,
    LEGACY_SAVEDMODEL,
    OPAQUE_SAVEDMODEL,
    SHA256_TAG,
    LoadedSource,
    SourceArtifact,
    block_class,
    block_report,
    block_variable_name,
    check_frozen_block_variables,
    detect_kind,
    frozen_block_variables,
    legacy_keras_available,
    lineage_tags,
    load_source,
    resolve,
    resolve_mlflow,
    source_key,
    source_location,
)
