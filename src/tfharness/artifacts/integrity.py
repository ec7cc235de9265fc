"""Integrity: the sha256 of every artifact tfharness writes, and the check before it is loaded.

A file's digest is the sha256 of its bytes. A directory (a SavedModel) is hashed as a manifest:
one ``<relative path> <sha256>`` line per file, sorted, and the digest is the sha256 of that
text, so the record also says *which* file changed. The record is written beside the artifact as
``<artifact>.sha256.json`` and, by the runner, into MLflow (run tag ``tfharness.sha256.<name>``
and the logged model's tag ``tfharness.sha256``), which is the copy to trust when the artifact
and its side file travelled together.

Why it matters: Keras reports a truncated ``.keras`` as "File not found", and a SavedModel with
a damaged ``variables/`` fails deep inside TensorFlow. Checking the digest first turns both into
one error that says the bytes changed, and which.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

from tfharness.artifacts.serialization import atomic_write
from tfharness.errors import IntegrityError

RECORD_SUFFIX = ".sha256.json"
RECORD_FORMAT = "tfharness-sha256/1"
_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest(path: str | os.PathLike) -> Dict[str, str]:
    """``{relative path: sha256}`` of every file of an artifact (one entry for a plain file)."""
    path = Path(path)
    if path.is_file():
        return {path.name: file_sha256(path)}
    return {p.relative_to(path).as_posix(): file_sha256(p)
            for p in sorted(path.rglob("*")) if p.is_file()}


def digest_of(files: Dict[str, str], is_file: bool) -> str:
    if is_file:
        return next(iter(files.values()))
    text = "".join(f"{name} {sha}\n" for name, sha in sorted(files.items()))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Record:
    """The sha256 of an artifact and of each of its files."""

    sha256: str
    files: Dict[str, str] = field(default_factory=dict)
    is_file: bool = True


def record_of(path: str | os.PathLike) -> Record:
    path = Path(path)
    files = manifest(path)
    return Record(sha256=digest_of(files, path.is_file()), files=files, is_file=path.is_file())


def record_path(artifact: str | os.PathLike) -> Path:
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + RECORD_SUFFIX)


def write_record(artifact: str | os.PathLike) -> Record:
    """Hashes ``artifact`` and writes ``<artifact>.sha256.json`` beside it (atomically)."""
    record = record_of(artifact)
    text = json.dumps({"format": RECORD_FORMAT, "sha256": record.sha256,
                       "kind": "file" if record.is_file else "directory",
                       "files": record.files}, indent=1, sort_keys=True)
    atomic_write(record_path(artifact), lambda tmp: tmp.write_text(text))
    return record


def read_record(artifact: str | os.PathLike) -> Optional[Record]:
    """The record written beside ``artifact``, or None when there is none."""
    side = record_path(artifact)
    if not side.is_file():
        return None
    try:
        data = json.loads(side.read_text())
        return Record(sha256=data["sha256"], files=dict(data.get("files", {})),
                      is_file=data.get("kind", "file") == "file")
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"The integrity record {side} is unreadable ({exc}); it should "
                             f"hold the sha256 of {Path(artifact).name}.") from exc


def verify(artifact: str | os.PathLike, expected: Optional[str] = None,
           recorded_files: Optional[Dict[str, str]] = None) -> Record:
    """Checks ``artifact`` against an expected sha256; raises :class:`IntegrityError` on mismatch.

    Args:
        artifact: the file or directory to check.
        expected: the digest recorded when it was written (from MLflow, say). When None, the
            side file ``<artifact>.sha256.json`` is used; without either, nothing is compared.
        recorded_files: per-file digests, to name which files differ.

    Returns:
        The artifact's actual record.
    """
    artifact = Path(artifact)
    actual = record_of(artifact)
    side = None
    if expected is None or recorded_files is None:
        side = read_record(artifact)
    if expected is None and side is not None:
        expected = side.sha256
    if recorded_files is None and side is not None and side.sha256 == expected:
        recorded_files = side.files
    if expected is None or actual.sha256 == expected:
        return actual
    details = []
    if recorded_files:
        for name in sorted(set(recorded_files) | set(actual.files)):
            if name not in actual.files:
                details.append(f"{name} is missing")
            elif name not in recorded_files:
                details.append(f"{name} was added")
            elif recorded_files[name] != actual.files[name]:
                size = (artifact / name if not actual.is_file else artifact).stat().st_size
                details.append(f"{name} changed (now {size} bytes)")
    where = "; ".join(details) if details else f"now {artifact_bytes(artifact)} bytes"
    raise IntegrityError(
        f"{artifact} does not match the sha256 recorded when it was written (expected "
        f"{expected[:16]}..., found {actual.sha256[:16]}...): it was truncated or altered "
        f"({where}). Use an intact copy.")


def artifact_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
