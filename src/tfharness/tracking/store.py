"""Opening an MLflow tracking store safely: the one place that creates a store and an experiment.

MLflow creates and migrates a SQLite database's schema on first use, and that is not safe when
several processes open a fresh database at once (one creates a table that another then creates
again, or two alembic migrations race on the version row). So every tfharness process opens a
SQLite store under an inter-process lock beside the database file, with a bounded wait: the first
one creates and migrates it, the others find it ready. An MLflow client that tfharness does not
control (``mlflow ui``, a script) may still be creating the schema at that moment; the errors
such a race leaves are retried, a bounded number of times, before they count as real. A
migration that failed or was killed half-way can leave alembic's copy of a table behind, which
makes every later migration of that table fail, MLflow's own included; tfharness drops such
leftovers under its lock before each try and once the store is open.

A store that cannot be opened is a :class:`~tfharness.errors.TrackingError` that names
``tracking.uri``, what it got and why, raised before any run is opened.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Callable, List, Optional, Tuple, TypeVar

from tfharness.errors import TrackingError
from tfharness.tracking.retries import retrying

log = logging.getLogger("tfharness")

SQLITE_PREFIX = "sqlite:///"
# How long a process waits for another one to finish creating the store.
LOCK_TIMEOUT_S = 300.0
# Attempts at opening a store whose schema another, unlocked client may be creating.
OPEN_ATTEMPTS = 8
# The text of errors a concurrent schema creation or migration leaves behind on a server's
# database (SQLAlchemy, alembic); anything else from a server is not a race and fails at once.
# A SQLite file that another client is creating can fail in more ways than can be listed
# (circular dependencies between half-made tables, constraints not there yet): any error while
# opening one is retried.
RACE_MARKERS = ("already exists", "duplicate column", "no such table", "database is locked",
                "alembic_version", "Online migration expected", "UNIQUE constraint failed",
                "No such constraint", "Circular dependency")

# The name alembic's batch migrations give a table's copy on SQLite.
ALEMBIC_COPY_PREFIX = "_alembic_tmp_"

T = TypeVar("T")


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a ``sqlite:///`` URI (None for any other store)."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    return Path(uri[len(SQLITE_PREFIX):]).expanduser().resolve()


def sqlite_artifact_root(uri: str) -> Optional[str]:
    """Artifacts of a SQLite store go in ``mlartifacts/`` beside the database file.

    Without this MLflow would put them in ``./mlruns`` of whatever directory the run started in.
    """
    path = sqlite_path(uri)
    return None if path is None else (path.parent / "mlartifacts").as_uri()


def store_error(uri: str, why: str, cause: Optional[BaseException] = None) -> TrackingError:
    """The one-line error for a store that cannot be used."""
    if cause is not None:
        why = f"{why}: {type(cause).__name__}: {_first_line(cause)}"
    return TrackingError(f"Invalid value for 'tracking.uri': got {uri!r}; cannot open the MLflow "
                         f"tracking store ({why}).")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else ""
    schemes = re.search(r"Supported URI schemes are: (\[[^\]]*\])", line)
    if schemes:
        # MLflow's own list, from the plugins installed here, without its paragraph.
        return f"unsupported URI scheme; MLflow here supports {schemes.group(1)}"
    return line[:400]


def is_race(error: BaseException) -> bool:
    """Whether ``error`` is what a concurrent schema creation or migration leaves."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if any(marker in str(error) for marker in RACE_MARKERS):
            return True
        error = error.__cause__ or error.__context__
    return False


def _lock_for(db: Path, uri: str):
    from filelock import FileLock

    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise store_error(uri, f"cannot create the folder {db.parent}: {exc.strerror}") from None
    lock_path = db.with_name(db.name + ".lock")
    return FileLock(str(lock_path), timeout=LOCK_TIMEOUT_S)


def drop_leftover_copies(db: Path) -> List[str]:
    """Drop the tables alembic's batch migrations left in the SQLite file ``db``; their names.

    On SQLite a batch migration copies a table into ``_alembic_tmp_<table>``, then drops the
    table and renames the copy. A migration that failed (it raced with another client) or was
    killed after creating the copy leaves it behind, and the next migration of that table fails
    with "table _alembic_tmp_<table> already exists", for every client. Should another client's
    migration be live, dropping the copy it has just created makes it fail before it touches
    the table: the copy is filled, swapped in and the table dropped in one transaction, and
    SQLite lets one writer at a time, so the store stays at its last finished migration.

    A copy is dropped only while its table is there too, or when it holds no row: a copy with
    rows whose table is gone may be the only copy of them, so it is kept, with a warning.
    """
    if not db.exists():
        return []
    dropped = []
    with closing(sqlite3.connect(db, timeout=60)) as conn:
        tables = {name for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        for name in sorted(t for t in tables if t.startswith(ALEMBIC_COPY_PREFIX)):
            original = name[len(ALEMBIC_COPY_PREFIX):]
            empty = conn.execute(f'SELECT 1 FROM "{name}" LIMIT 1').fetchone() is None
            if original in tables or empty:
                conn.execute(f'DROP TABLE "{name}"')
                dropped.append(name)
            else:
                log.warning("%s holds the only rows of the table %s, which a schema migration "
                            "that did not finish left behind; it is kept", name, original)
        conn.commit()
    if dropped:
        log.info("Dropped %s from %s, left by a schema migration that did not finish",
                 ", ".join(dropped), db)
    return dropped


def _with_retries(uri: str, attempt: Callable[[], T], retry_any: bool) -> T:
    return retrying(attempt, lambda error: retry_any or is_race(error), what=f"Opening {uri} "
                    "raced with another MLflow client", attempts=OPEN_ATTEMPTS,
                    first_delay_s=0.2, max_delay_s=2.0, level=logging.DEBUG)


def open_experiment(uri: str, experiment: str) -> Tuple[object, str]:
    """An ``MlflowClient`` on ``uri`` and the id of ``experiment``, created if missing.

    The store is created and migrated here, in one process at a time for a SQLite file.

    Raises:
        TrackingError: the store cannot be opened (unsupported scheme, unwritable path, a
            server that does not answer, a broken database), naming ``tracking.uri``.
    """

    def attempt():
        import mlflow

        client = mlflow.MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            return client, found.experiment_id
        try:
            return client, client.create_experiment(
                experiment, artifact_location=sqlite_artifact_root(uri))
        except Exception:
            # Another process (a server's other client, say) created it in the meantime.
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise
            return client, found.experiment_id

    db = sqlite_path(uri)
    try:
        if db is None:
            return _with_retries(uri, attempt, retry_any=False)
        lock = _lock_for(db, uri)

        def attempt_on_file():
            drop_leftover_copies(db)  # a copy that a dead migration left would fail this try
            return attempt()

        try:
            with lock:
                opened = _with_retries(uri, attempt_on_file, retry_any=True)
                try:
                    drop_leftover_copies(db)  # so that no later migration trips on them
                except sqlite3.Error as exc:  # the store is open; the next run tries again
                    log.debug("Could not drop leftover copies in %s: %s", db, exc)
                return opened
        except TimeoutError as exc:  # filelock.Timeout
            raise store_error(uri, f"another process held {lock.lock_file} for more than "
                                   f"{LOCK_TIMEOUT_S:.0f} s") from exc
    except TrackingError:
        raise
    except OSError as exc:
        raise store_error(uri, exc.strerror or type(exc).__name__, None) from exc
    except Exception as exc:  # noqa: BLE001 - whatever MLflow raises, one line that says why
        raise store_error(uri, f"experiment {experiment!r}", exc) from exc
