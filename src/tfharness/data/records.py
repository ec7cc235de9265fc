"""What a run records about its data: digests, MLflow dataset descriptions and class names.

Everything here is plain Python (no TensorFlow, no MLflow): a :class:`DatasetRecord` is sent as a
dict to the tracker, which turns it into ``mlflow.entities.Dataset`` and logs it with
the run's inputs (what ``mlflow.log_input`` does), one per context: ``pretrain``, ``finetune``
and ``test``. The schema and source strings follow the JSON forms MLflow's own datasets write
(``mlflow_tensorspec``, ``mlflow_colspec``, ``{"uri": ...}``), so the UI shows them as it shows
its own.

Digests identify the data itself, cheaply: a file's or a folder's bytes when they are small
(``CONTENT_HASH_LIMIT``), else each file's relative path, size and modification time; arrays by
their bytes; generated data by what generates it. :func:`sha256_of` is the building block other
parts of tfharness reuse (the pretraining fingerprint of a run), :func:`files_digest` the one
for data on disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

# Up to this many bytes in all, files are digested by their content; beyond, by path, size and
# modification time (reading gigabytes of images to name them would cost more than training).
CONTENT_HASH_LIMIT = 256 * 2 ** 20
# Rows hashed from a large array (beyond a quarter of CONTENT_HASH_LIMIT).
SAMPLED_ROWS = 10_000
# MLflow's dataset digest column holds 36 characters; 16 hex digits (64 bits) name a data set.
MLFLOW_DIGEST_CHARS = 16
CONTEXTS = ("pretrain", "finetune", "test")
# Run tags holding each phase's class names (JSON lists), and the artifact beside each model.
CLASS_NAMES_TAG = "tfharness.class_names"
CLASS_NAMES_FILE = "class_names.json"
# Run tag holding the digest of everything the data option reads (see dataset_digest).
DATA_DIGEST_TAG = "tfharness.data_digest"
TAG_VALUE_LIMIT = 5000


def sha256_of(*parts) -> str:
    """The sha256 (hex) of ``parts``: strings, bytes, numbers, or JSON-able values, in order."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, bytes):
            payload = part
        elif isinstance(part, str):
            payload = part.encode()
        else:
            payload = json.dumps(part, sort_keys=True, default=str).encode()
        # Length-prefixed, so ("ab", "c") and ("a", "bc") never collide.
        digest.update(len(payload).to_bytes(8, "little"))
        digest.update(payload)
    return digest.hexdigest()


def files_digest(files: Sequence[Path], root: Optional[Path]) -> str:
    """Digest of ``files``, named relative to ``root`` (None: by content alone, for one file
    whose name is not part of the data): content when small, else name, size and mtime."""
    files = sorted(files)
    stats = [f.stat() for f in files]
    names = [f.relative_to(root).as_posix() if root is not None else "" for f in files]
    if sum(s.st_size for s in stats) <= CONTENT_HASH_LIMIT:
        digest = hashlib.sha256(b"content\0")
        for name, path in zip(names, files):
            digest.update(name.encode() + b"\0")
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()
    return sha256_of("stat", [[n or f.name, s.st_size, s.st_mtime_ns]
                              for n, f, s in zip(names, files, stats)])


def file_digest(path: Path) -> str:
    """Digest of one file's content (its size and mtime when it is large)."""
    return files_digest([Path(path)], None)


def arrays_digest(*arrays: np.ndarray) -> str:
    """Digest of arrays by dtype, shape and bytes; of a large array, by its shape and rows
    sampled evenly through it (``SAMPLED_ROWS``), as MLflow's own NumPy datasets are."""
    digest = hashlib.sha256(b"arrays\0")
    for array in arrays:
        array = np.asarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        if array.nbytes > CONTENT_HASH_LIMIT // 4 and len(array) > SAMPLED_ROWS:
            array = array[np.linspace(0, len(array) - 1, SAMPLED_ROWS).astype(np.int64)]
        digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return digest.hexdigest()


@dataclass
class DatasetRecord:
    """One MLflow dataset input of a run, as plain data (see the module docstring)."""

    name: str
    digest: str
    context: str
    source_type: str
    source: str
    schema: Optional[str] = None
    profile: Optional[str] = None

    def to_dict(self) -> Dict[str, Optional[str]]:
        return dataclasses.asdict(self)


def local_source(path) -> tuple:
    """``(source_type, source)`` of data read from a file or folder, as MLflow writes it."""
    return "local", json.dumps({"uri": str(Path(path).expanduser().resolve())})


def code_source(origin: str) -> tuple:
    """``(source_type, source)`` of data made by code (generated, or shipped in a package)."""
    return "code", json.dumps({"tags": {"mlflow.source.name": origin}})


def tensor_schema(feature_shape: Sequence[int], feature_dtype: str = "float32",
                  label_dtype: str = "int32") -> str:
    """MLflow's tensor schema of ``(features, labels)`` batches (``-1``: any batch size)."""

    def spec(dtype: str, shape: Sequence[int]) -> str:
        return json.dumps([{"type": "tensor",
                            "tensor-spec": {"dtype": dtype, "shape": [-1, *shape]}}])

    return json.dumps({"mlflow_tensorspec": {"features": spec(feature_dtype, feature_shape),
                                             "targets": spec(label_dtype, [])}})


def column_schema(features: Sequence[str], label: str, label_type: str) -> str:
    """MLflow's column schema of a table: numeric features and the label column."""
    columns = [{"type": "double", "name": c, "required": True} for c in features]
    columns.append({"type": label_type, "name": label, "required": True})
    return json.dumps({"mlflow_colspec": columns})


@dataclass
class DataDescription:
    """What a data source says about itself beyond the samples.

    ``class_names``: the names of each phase's class indices (``pretrain``, ``finetune``).
    ``splits``: a :class:`DatasetRecord` per ``"<phase>/<split>"`` (``pretrain/train``,
    ``finetune/test``, ...), without a context yet: :meth:`records` gives each its context.
    ``digest``: the digest of everything the data option reads (the ``tfharness.data_digest``
    tag).
    """

    class_names: Dict[str, List[str]] = field(default_factory=dict)
    splits: Dict[str, DatasetRecord] = field(default_factory=dict)
    digest: Optional[str] = None

    def records(self, finetune: bool) -> List[DatasetRecord]:
        """The run's inputs: pretraining and fine-tuning data, and the test data of the last
        phase (the run's ``test/*`` metrics are measured on it)."""
        wanted = [("pretrain", "pretrain/train")]
        if finetune:
            wanted.append(("finetune", "finetune/train"))
        wanted.append(("test", "finetune/test" if finetune else "pretrain/test"))
        return [dataclasses.replace(self.splits[key], context=context)
                for context, key in wanted if key in self.splits]

    def tags(self) -> Dict[str, str]:
        """Run tags: the data digest and each phase's class names."""
        tags = {DATA_DIGEST_TAG: self.digest} if self.digest else {}
        for phase, names in self.class_names.items():
            tags[f"{CLASS_NAMES_TAG}.{phase}"] = names_text(names)
        return tags


def names_text(names: Sequence[str]) -> str:
    """A JSON list of class names, cut to what a tag holds (the artifact keeps them all)."""
    text = json.dumps(list(names))
    if len(text) <= TAG_VALUE_LIMIT:
        return text
    kept: List[str] = []
    for name in names:
        if len(json.dumps(kept + [name, "..."])) > TAG_VALUE_LIMIT:
            break
        kept.append(name)
    return json.dumps(kept + [f"... {len(names) - len(kept)} more"])


def split_record(*, label: str, base_digest: str, selection,
                 source: tuple, schema: Optional[str], rows: Optional[int],
                 class_names: Sequence[str], extra: Optional[Dict] = None) -> DatasetRecord:
    """The record of one split of a source: its digest is the source's digest and what part of
    it the split takes (``selection``: phase, split, classes, seed, fractions...)."""
    profile = {"num_rows": rows, "num_classes": len(class_names), **(extra or {})}
    return DatasetRecord(
        name=label, digest=sha256_of(base_digest, selection)[:MLFLOW_DIGEST_CHARS],
        context="", source_type=source[0], source=source[1], schema=schema,
        profile=json.dumps({k: v for k, v in profile.items() if v is not None}))


def read_class_names(path: Path) -> Optional[List[str]]:
    """The names a ``class_names.json`` written by ``write_class_names`` holds; None when the
    file is absent or holds no list of names."""
    try:
        names = json.loads(Path(path).read_text()).get("class_names")
    except (OSError, ValueError, AttributeError):
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


def write_class_names(path: Path, names: Sequence[str]) -> Path:
    """Writes ``{"class_names": [...]}`` to ``path`` (the artifact logged beside a model)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"class_names": list(names)}, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def index_names(count: int) -> List[str]:
    """Class names of data whose labels are bare indices: ``"0"``, ``"1"``, ..."""
    return [str(i) for i in range(count)]


def files_under(root: Path) -> Iterable[Path]:
    for folder, _, names in sorted(os.walk(root, followlinks=True)):
        for name in sorted(names):
            yield Path(folder) / name


def part_record(part, *, label: str, source: tuple, base: str, class_names: Sequence[str]
                ) -> "DatasetRecord":
    """The record of a part the source did not describe: arrays by their content, a dataset by
    what made it (``base``: the digest of the data option) and its element spec."""
    if part is None:
        rows, shape, dtype, digest = 0, [], "float32", sha256_of(base, "empty")
    elif hasattr(part, "element_spec"):
        spec = part.element_spec[0]
        rows, digest = None, sha256_of(base, str(part.element_spec))
        shape, dtype = list(spec.shape)[1:], spec.dtype.name
    else:
        x, y = part[0], part[1]
        rows, digest = len(x), arrays_digest(x, y)
        shape, dtype = list(np.asarray(x).shape[1:]), np.asarray(x).dtype.name
    return split_record(label=label, base_digest=digest, selection=None, source=source,
                        schema=tensor_schema(shape, dtype), rows=rows, class_names=class_names)


def describe_bundle(bundle, options: Dict, target: Optional[str]) -> DataDescription:
    """What a run records about its data (:class:`DataDescription`): each phase's class names
    and a record per part, the source's own where it gave one (``Split.mlflow_datasets``).

    ``options``: the data option's keys (its ``path`` or ``pretrain_dir`` names the source on
    disk; otherwise the ``_target_`` is the source, as code).
    """
    name = str(options.get("name") or target or "data")
    on_disk = options.get("path") or options.get("pretrain_dir")
    source = local_source(on_disk) if on_disk else code_source(str(target or name))
    base = sha256_of(target, {k: v for k, v in options.items() if not k.startswith("_")})
    description = DataDescription()
    for phase in ("pretrain", "finetune"):
        split = getattr(bundle, phase)
        names = [str(n) for n in (split.class_names or index_names(split.num_classes))]
        description.class_names[phase] = names
        given = split.mlflow_datasets or {}
        for part in ("train", "val", "test"):
            record = given.get(part)
            if record is None:
                record = part_record(getattr(split, part), label=f"{name}/{phase}/{part}",
                                     source=source, base=base, class_names=names)
            elif isinstance(record, dict):
                record = DatasetRecord(**{"context": "", **record})
            description.splits[f"{phase}/{part}"] = record
    description.digest = sha256_of("data", sorted(
        (key, r.name, r.digest) for key, r in description.splits.items()),
        description.class_names)
    return description
