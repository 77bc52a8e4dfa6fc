"""The experiment database: one SQLite file, written through the standard library.

Tables:

* ``runs``: one row per configuration (unique configuration hash) with the full configuration
  as JSON, its status (``running``, ``finished`` or ``failed``), how many attempts it took, the
  process that runs it, the library versions, timestamps and the final metrics;
* ``epochs``: one row per run and epoch with that epoch's metrics;
* ``sharpness``: at most one row per finished run and measurement settings, its flatness
  measured from the saved weights by :mod:`flatminima.experiments.sharpness_runs` (the scalars
  of :func:`flatminima.sharpness.measure_sharpness`, the settings and examples used, optionally
  a 1-D loss landscape). Measurements with different settings are different rows, never
  averaged together. Measuring never changes a row of ``runs``.

Deleting a run deletes its epochs and sharpness rows with it (foreign keys with cascades, on in
every connection); :meth:`Store.forget` also deletes its weights. A database edited by hand with
foreign keys off may hold rows of runs that no longer exist: a writer deletes them on opening.

The final weights of every finished run are saved beside the database, in
``<database stem>-weights/<configuration hash>.pt``, so that sharpness can be measured later.

Schema changes keep every row: opening a database written by an earlier version of flatminima
adds the missing tables and columns (``PRAGMA user_version`` says which version wrote it;
version 3 keys the sharpness table by run and settings, copying its rows into the new table);
a database written by a newer version is refused.

Several processes may read and write the file at once (the workers of a grid, a report run
while the grid trains): the database is in WAL mode, every write is one short transaction, a
run is claimed inside an ``IMMEDIATE`` transaction so that two processes never train the same
configuration, and opening a database that is already up to date writes nothing, so that a
reader never competes with the writers for the lock.

The processes must run on one machine: WAL mode shares an index through memory, and SQLite
does not support it over a network filesystem. Containers on one machine sharing a volume are
fine, and they are why hostnames can differ. A run's owner (``hostname:pid@start``, the
process's start time where the system tells it) refreshes the
run's ``heartbeat_at`` at every epoch. A run left ``running`` is taken over by another process
when its owner is known to be dead (same hostname, and no such process, or a process of that
PID that started at another time: the PID was reused) or when its heartbeat is older than
``stale_after_s`` (see :meth:`Store.claim`). A process whose run was taken over can no longer
write it (:class:`RunLostError`).

Damage is refused in one line (:class:`StoreError`) rather than read on: opening checks the file
(``PRAGMA quick_check``), and a path that is not a regular file (``/dev/null``) is no database.
Readers open the file read-only, so that a report can be written from a database in a read-only
directory.
"""

from __future__ import annotations

import errno
import functools
import io
import itertools
import json
import logging
import math
import os
import socket
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 5

BUSY_TIMEOUT_S = 60.0
"""How long a connection waits for another process's write to end before giving up."""

DEFAULT_STALE_AFTER_S = 2 * 3600.0
"""How long a run another host left ``running`` may go without a heartbeat (an epoch recorded)
before another process takes it over: longer than any epoch this runner trains on a CPU."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    config_hash TEXT NOT NULL UNIQUE,
    config TEXT NOT NULL,
    dataset TEXT NOT NULL,
    model TEXT NOT NULL,
    method TEXT NOT NULL,
    seed INTEGER NOT NULL,
    label_noise REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'finished', 'failed')),
    attempts INTEGER NOT NULL,
    owner TEXT,
    environment TEXT,
    error TEXT,
    created_at TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    train_time_s REAL,
    passes INTEGER,
    passes_per_step INTEGER,
    final_test_accuracy REAL,
    final_test_loss REAL,
    final_train_accuracy_noisy REAL,
    final_train_accuracy_clean REAL,
    weights_path TEXT,
    heartbeat_at TEXT,
    diverged_at_epoch INTEGER,
    data_fingerprint TEXT,
    final_validation_accuracy REAL
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    epoch INTEGER NOT NULL,
    train_loss REAL,
    test_loss REAL,
    test_accuracy REAL,
    learning_rate REAL,
    train_time_s REAL,
    passes INTEGER,
    train_accuracy_noisy REAL,
    validation_loss REAL,
    validation_accuracy REAL,
    top_eigenvalue REAL,
    sharpness_time_s REAL,
    gradient_norm REAL,
    PRIMARY KEY (run_id, epoch)
);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs(status);
CREATE TABLE IF NOT EXISTS sharpness (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    config_hash TEXT NOT NULL,
    examples INTEGER NOT NULL,
    data TEXT NOT NULL,
    settings TEXT NOT NULL,
    loss REAL,
    hessian_top_eigenvalue REAL,
    hessian_more_eigenvalues TEXT,
    hessian_trace REAL,
    hessian_trace_stderr REAL,
    worst_case_sharpness REAL,
    average_sharpness REAL,
    adaptive_worst_case_sharpness REAL,
    adaptive_average_sharpness REAL,
    landscape TEXT,
    measure_time_s REAL NOT NULL,
    environment TEXT,
    measured_at TEXT NOT NULL,
    PRIMARY KEY (run_id, settings)
);
"""


def _add_column(db: sqlite3.Connection, table: str, definition: str) -> None:
    """``ALTER TABLE table ADD COLUMN definition`` unless the column is there already."""
    name = definition.split()[0]
    if name not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
        db.execute(f"ALTER TABLE {table} ADD COLUMN {definition}")


def _key_sharpness_by_settings(db: sqlite3.Connection) -> None:
    """Version 2 kept one sharpness row per run (``run_id`` its key); version 3 one per run and
    settings. SQLite cannot change a key in place: copy the rows into the new table."""
    exists = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sharpness'"
    ).fetchone()
    if not exists:
        return  # created by SCHEMA below
    db.execute("ALTER TABLE sharpness RENAME TO sharpness_version_2")
    sharpness_table = SCHEMA[SCHEMA.index("CREATE TABLE IF NOT EXISTS sharpness") :]
    db.execute(sharpness_table[: sharpness_table.index(";")])
    db.execute("INSERT INTO sharpness SELECT * FROM sharpness_version_2")
    db.execute("DROP TABLE sharpness_version_2")


MIGRATIONS: dict[int, tuple[str | Callable[[sqlite3.Connection], None], ...]] = {
    # From the version on the left to the next one.
    1: (
        "ALTER TABLE runs ADD COLUMN heartbeat_at TEXT",
        "ALTER TABLE runs ADD COLUMN diverged_at_epoch INTEGER",
        # A run an older flatminima is still training gets a full grace period from now.
        "UPDATE runs SET heartbeat_at = strftime('%Y-%m-%dT%H:%M:%S+00:00', 'now') "
        "WHERE status = 'running'",
    ),
    2: (
        lambda db: _add_column(db, "runs", "data_fingerprint TEXT"),
        _key_sharpness_by_settings,
    ),
    # Per-epoch accuracy on the (noisy) training labels, the validation split, and the
    # sharpness tracked during training; the run's final validation accuracy.
    3: tuple(
        (lambda db, table=table, column=column: _add_column(db, table, column))
        for table, column in (
            ("epochs", "train_accuracy_noisy REAL"),
            ("epochs", "validation_loss REAL"),
            ("epochs", "validation_accuracy REAL"),
            ("epochs", "top_eigenvalue REAL"),
            ("epochs", "sharpness_time_s REAL"),
            ("runs", "final_validation_accuracy REAL"),
        )
    ),
    # The mean mini-batch gradient norm measured with the tracked λ_max (normalised SAM's edge
    # of stability depends on it).
    4: (lambda db: _add_column(db, "epochs", "gradient_norm REAL"),),
}

EPOCH_COLUMNS = (
    "epoch",
    "train_loss",
    "test_loss",
    "test_accuracy",
    "learning_rate",
    "train_time_s",
    "passes",
    "train_accuracy_noisy",
    "validation_loss",
    "validation_accuracy",
    "top_eigenvalue",
    "sharpness_time_s",
    "gradient_norm",
)
OPTIONAL_EPOCH_COLUMNS = frozenset(EPOCH_COLUMNS[7:])
"""Columns an epoch may leave out (stored as NULL): no validation split, sharpness not
measured at that epoch."""
FINAL_COLUMNS = (
    "train_time_s",
    "passes",
    "passes_per_step",
    "final_test_accuracy",
    "final_test_loss",
    "final_train_accuracy_noisy",
    "final_train_accuracy_clean",
    "diverged_at_epoch",
    "final_validation_accuracy",
)

SHARPNESS_COLUMNS = (
    "loss",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "hessian_trace_stderr",
    "worst_case_sharpness",
    "average_sharpness",
    "adaptive_worst_case_sharpness",
    "adaptive_average_sharpness",
)
"""The scalars :func:`flatminima.sharpness.measure_sharpness` always returns, one column each;
the eigenvalues after the first (``hessian_eigenvalue_<i>``, with ``top_k`` > 1) are stored as a
JSON list in ``hessian_more_eigenvalues``."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks since boot (Linux's ``/proc``), or ``None``
    where that cannot be read (no such process, another system): with the PID it names one
    process, where a PID alone may since have been given to another."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: count after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None  # field 22, `starttime`


@functools.cache
def _owner_name(pid: int) -> str:
    start = _process_start(pid)
    return f"{socket.gethostname()}:{pid}" + (f"@{start}" if start else "")


def _this_process() -> str:
    """``host:pid@start`` (``host:pid`` where the start time is unknown)."""
    return _owner_name(os.getpid())


def _owner_is_alive(owner: str | None, heartbeat_age_s: float, stale_after_s: float) -> bool:
    """Whether the process named ``owner`` (see :func:`_this_process`) may still train its run.

    A run whose heartbeat is older than ``stale_after_s`` is abandoned whoever owns it: stealing
    a live run would train it twice, waiting forever on a dead one would leave it unfinished.
    On this host the system also knows: an owner whose PID is gone, or belongs to a process that
    started at another time than the owner (the PID was reused), is dead at once.
    """
    if not owner or heartbeat_age_s > stale_after_s:
        return False
    host, _, process = owner.rpartition(":")
    if host != socket.gethostname():
        return True
    pid_text, _, start = process.partition("@")
    if not pid_text.isdigit():
        return True  # not written by this module: judged by its heartbeat alone
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # a process of another user holds the PID: judged by its start time below
    if start:
        now_started = _process_start(pid)
        return now_started is None or now_started == start
    return True


def _age_s(timestamp: str | None) -> float:
    """Seconds since ``timestamp`` (written by :func:`_now`); infinite when there is none."""
    if timestamp is None:
        return math.inf
    return (datetime.now(timezone.utc) - datetime.fromisoformat(timestamp)).total_seconds()


def _finite_or_none(value: float | None) -> float | None:
    # SQLite has no NaN: a diverged run's loss is stored as NULL rather than silently as 0.
    return None if value is None or not math.isfinite(value) else value


@dataclass(frozen=True)
class RunRecord:
    """One row of ``runs``, with its configuration decoded."""

    id: int
    config_hash: str
    config: dict[str, Any]
    status: str
    attempts: int
    environment: dict[str, Any]
    created_at: str
    started_at: str
    finished_at: str | None
    error: str | None
    final: dict[str, Any]
    """The final metrics and costs (``FINAL_COLUMNS``), ``None`` where not yet known."""
    weights_path: str | None
    data_fingerprint: str | None = None
    """The fingerprint of the dataset it trained on (``None`` in databases older than that)."""

    @property
    def diverged(self) -> bool:
        """Whether this finished run's training diverged (the runner's verdict,
        :func:`has_diverged`): recorded so (``diverged_at_epoch``), or, in a database written
        before that was recorded, a final test loss that was not finite (stored as NULL)."""
        return self.status == "finished" and (
            self.final.get("diverged_at_epoch") is not None
            or self.final.get("final_test_loss") is None
        )


@dataclass(frozen=True)
class SharpnessRecord:
    """One row of ``sharpness``: a finished run's flatness, measured from its saved weights."""

    run_id: int
    config_hash: str
    metrics: dict[str, float]
    """Keyed as :func:`flatminima.sharpness.measure_sharpness` returns them (NaN where the
    measurement was not finite, e.g. the trace's standard error with one probe)."""
    examples: int
    """How many training examples the loss was measured on."""
    data: str
    """Which examples, in words (e.g. a seeded subset of the training set, noisy labels)."""
    settings: dict[str, Any]
    """Every argument of the measurement (radii, probes, seed...)."""
    landscape: dict[str, Any] | None
    """``{"alphas": [...], "losses": [...], ...}`` of a 1-D filter-normalised loss slice, or
    ``None`` when none was measured."""
    measure_time_s: float
    environment: dict[str, Any]
    measured_at: str


class StoreError(Exception):
    """The file is not an experiment database this version of flatminima can use, or cannot be
    written where writing is needed; the message says which and what to do."""


class DataMismatchError(StoreError):
    """The data a run is about to train on is not the data the database's runs trained on."""


class RunLostError(Exception):
    """The run was taken over by another process: this one must stop writing it."""


def out_of_space(error: BaseException) -> bool:
    """Whether ``error`` says the disk (or the user's quota) is full: then every later write
    fails too, and a grid must stop rather than try each remaining run."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(error, sqlite3.Error):
        return getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return False


def has_diverged(train_loss: float, test_loss: float, weights_are_finite: bool) -> bool:
    """The one verdict of divergence, used by the runner (which stops training and records
    the epoch), the report and the sharpness measurement: a loss that is not finite, on the
    training batches or the test set, or weights that are not finite."""
    return not (math.isfinite(train_loss) and math.isfinite(test_loss) and weights_are_finite)


class Store:
    """A connection to the experiment database.

    ``create=False`` is for readers (report): a missing file is an error rather than a new empty
    database, and the file is opened read-only (a database in a read-only directory can be
    reported on). A reader writes only to bring a database of an older flatminima up to date.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a directory, not a database file")
        if self.path.exists() and not self.path.is_file():
            # /dev/null, a pipe...: SQLite would read it as an empty database and create
            # <path>-journal beside it.
            raise StoreError(f"{self.path} is not a regular file: give --db a database file")
        if not create and not self.path.exists():
            raise FileNotFoundError(f"no database at {self.path}")
        self._connection = self._connect(read_only=not create)
        try:
            self._connection.row_factory = sqlite3.Row
            self._connection.execute("PRAGMA foreign_keys=ON")
            self._refuse_what_is_not_ours()
            if not create and self._schema_version() == 0:
                # An empty file (or an empty SQLite database): a reader must not give it a
                # schema and call it an empty report.
                raise StoreError(
                    f"{self.path} is not a flatminima database: it holds no runs table"
                )
            self._refuse_damage()
            if create:
                # Before anything is written: writers need WAL (a copy made by VACUUM INTO or a
                # restored dump comes back in the default rollback mode).
                self._use_write_ahead_log()
            if self._schema_version() != SCHEMA_VERSION:
                if not create:
                    # Upgrading is a write: reopen writable for it (an error where it cannot).
                    self._connection.close()
                    self._connection = self._connect(read_only=False)
                    self._connection.row_factory = sqlite3.Row
                    self._connection.execute("PRAGMA foreign_keys=ON")
                self._create_or_migrate()
            if create:
                self._delete_orphans()
            self._connection.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.OperationalError as error:
            self._connection.close()
            if create and not (
                os.access(self.path.parent, os.W_OK)
                and (not self.path.exists() or os.access(self.path, os.W_OK))
            ):
                raise StoreError(
                    f"cannot write the database {self.path}: it or its folder is read-only "
                    f"({error}); `flatminima report` reads it as it is"
                ) from error
            # Locked past the timeout, disk I/O...: the file may well be ours; the caller
            # reports the error as it is.
            raise
        except sqlite3.DatabaseError as error:
            self._connection.close()
            raise StoreError(f"{self.path} is not a flatminima database: {error}") from error
        except BaseException:
            self._connection.close()
            raise

    def _connect(self, *, read_only: bool) -> sqlite3.Connection:
        try:
            if not read_only:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # Autocommit mode: transactions are opened explicitly and kept short.
                return sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            try:
                connection = sqlite3.connect(
                    uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None
                )
                connection.execute("PRAGMA user_version").fetchone()
                return connection
            except sqlite3.OperationalError:
                wal = self.path.with_name(self.path.name + "-wal")
                if os.access(self.path.parent, os.W_OK) or (wal.exists() and wal.stat().st_size):
                    raise
            # A WAL database in a directory this process cannot write, without a write-ahead
            # log: SQLite cannot create the shared-memory index a reader needs, but there is
            # nothing outside the file to read, and nobody here can change it.
            return sqlite3.connect(
                uri + "&immutable=1", uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None
            )
        except sqlite3.OperationalError as error:
            raise StoreError(f"cannot open {self.path} as a database: {error}") from error
        except sqlite3.DatabaseError as error:
            raise StoreError(f"{self.path} is not a flatminima database: {error}") from error
        except (OSError, sqlite3.Error) as error:
            raise StoreError(f"cannot open {self.path} as a database: {error}") from error

    def _refuse_damage(self) -> None:
        """Raise :class:`StoreError` when SQLite finds the file damaged (a corrupted page):
        reading on would give wrong numbers or fail half-way."""
        problems = [row[0] for row in self._connection.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            first = " ".join(problems[0].replace("*** in database main ***", "").split())
            raise StoreError(
                f"{self.path} is damaged ({first}; {len(problems)} problem(s) found by "
                "PRAGMA quick_check): restore a copy, or recover it with the sqlite3 shell's "
                "`.recover` into a new file"
            )

    def _delete_orphans(self) -> None:
        """Delete epoch and sharpness rows of runs that no longer exist (a run deleted by hand
        with foreign keys off): they belong to nothing, and a new run given the deleted run's
        id would collide with them."""
        if not self._connection.execute("PRAGMA foreign_key_check").fetchone():
            return
        with self._transaction("IMMEDIATE") as db:
            for table in ("epochs", "sharpness"):
                cursor = db.execute(
                    f"DELETE FROM {table} WHERE run_id NOT IN (SELECT id FROM runs)"
                )
                if cursor.rowcount:
                    logger.warning(
                        "%s: deleted %d %s row(s) of runs that no longer exist",
                        self.path,
                        cursor.rowcount,
                        table,
                    )

    def check_writable(self, *, weights: bool = True) -> None:
        """Raise :class:`StoreError` unless this process can write the database and (with
        ``weights``) the weights folder: asked once before the work rather than discovered
        after it."""
        try:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                # A write that is rolled back: SQLite refuses it on a read-only file or folder.
                self._connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            finally:
                self._connection.execute("ROLLBACK")
        except sqlite3.OperationalError as error:
            raise StoreError(f"cannot write the database {self.path}: {error}") from error
        if not weights:
            return
        try:
            self.weights_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.weights_dir) as probe:
                probe.write(b"flatminima")
                probe.flush()
                os.fsync(probe.fileno())
        except OSError as error:
            raise StoreError(
                f"cannot write the weights folder {self.weights_dir}: {error.strerror or error}"
            ) from error

    def _schema_version(self) -> int:
        return int(self._connection.execute("PRAGMA user_version").fetchone()[0])

    def _refuse_what_is_not_ours(self) -> None:
        """Raise :class:`StoreError` for a database of a newer flatminima or of another
        program, by reading only: such a file is left exactly as it was."""
        # One read transaction: the version and the tables of the same moment (another
        # process may be creating the schema right now).
        with self._transaction() as db:
            version = self._schema_version()
            tables = [
                row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            ]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer flatminima (schema version {version}); "
                f"this one reads versions up to {SCHEMA_VERSION}"
            )
        if version == 0:
            if tables:
                raise StoreError(
                    f"{self.path} is an SQLite database of something else (tables: "
                    f"{', '.join(sorted(tables))}), not a flatminima database"
                )

    def _use_write_ahead_log(self) -> None:
        """Switch the file to WAL mode unless it is in it already.

        SQLite does not wait on its busy timeout for this switch: a process that opens a new
        file while another is switching it gets "database is locked" at once, so retry.
        """
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                mode = self._connection.execute("PRAGMA journal_mode").fetchone()[0]
                if mode == "wal":
                    return
                # Outside any transaction: the journal mode cannot change inside one.
                self._connection.execute("PRAGMA journal_mode=WAL")
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _create_or_migrate(self) -> None:
        """Bring the file to ``SCHEMA_VERSION`` (only when it is not there: readers of an
        up-to-date database write nothing)."""
        with self._transaction("IMMEDIATE") as db:
            version = self._schema_version()  # again: another process may have just done it
            if version == SCHEMA_VERSION:
                return
            for step in range(version, SCHEMA_VERSION) if version else ():
                for statement in MIGRATIONS[step]:
                    if callable(statement):
                        statement(db)
                    else:
                        db.execute(statement)
            # A new file's tables, or those added since `version` (IF NOT EXISTS keeps the rest).
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @property
    def weights_dir(self) -> Path:
        return self.path.parent / f"{self.path.stem}-weights"

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self, mode: str = "DEFERRED") -> Iterator[sqlite3.Connection]:
        self._connection.execute(f"BEGIN {mode}")
        try:
            yield self._connection
        except BaseException:
            self._connection.execute("ROLLBACK")
            raise
        self._connection.execute("COMMIT")

    # --- writing -------------------------------------------------------------------------------

    def claim(
        self,
        config_hash: str,
        config: Mapping[str, Any],
        environment: Mapping[str, Any],
        passes_per_step: int,
        *,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
        data_fingerprint: str | None = None,
    ) -> int | None:
        """Reserve the run of ``config`` for this process and return its id, or ``None`` when
        it is already finished or being trained by another live process.

        A run left ``running`` by a process that died, or ``failed``, is redone: its epochs are
        deleted and its attempt count goes up. An owner counts as dead once the run's last
        heartbeat (its last epoch, or its start) is older than ``stale_after_s`` seconds, and
        on its own host as soon as its process is gone (see :func:`_owner_is_alive`).

        ``data_fingerprint`` (:func:`flatminima.experiments.data.fingerprint`) is recorded with
        the run; :class:`DataMismatchError` when runs of the same dataset in the database
        trained on data with another fingerprint.
        """
        if not stale_after_s > 0:
            raise ValueError(f"stale_after_s must be > 0, got {stale_after_s}")
        owner = _this_process()
        now = _now()
        with self._transaction("IMMEDIATE") as db:
            if data_fingerprint is not None:
                self._refuse_other_data(db, config["dataset"], data_fingerprint)
            row = db.execute(
                "SELECT id, status, owner, COALESCE(heartbeat_at, started_at) AS heartbeat "
                "FROM runs WHERE config_hash = ?",
                (config_hash,),
            ).fetchone()
            if row is None:
                cursor = db.execute(
                    "INSERT INTO runs (config_hash, config, dataset, model, method, seed, "
                    "label_noise, status, attempts, owner, environment, created_at, started_at, "
                    "heartbeat_at, passes_per_step, data_fingerprint) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, 'running', 1, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        config_hash,
                        json.dumps(config, sort_keys=True),
                        config["dataset"],
                        config["model"],
                        config["method"],
                        config["seed"],
                        config["label_noise"],
                        owner,
                        json.dumps(environment, sort_keys=True),
                        now,
                        now,
                        now,
                        passes_per_step,
                        data_fingerprint,
                    ),
                )
                return int(cursor.lastrowid)  # type: ignore[arg-type]
            if row["status"] == "finished":
                return None
            if (
                row["status"] == "running"
                and row["owner"] != owner
                and _owner_is_alive(row["owner"], _age_s(row["heartbeat"]), stale_after_s)
            ):
                return None
            db.execute("DELETE FROM epochs WHERE run_id = ?", (row["id"],))
            db.execute(
                "UPDATE runs SET status = 'running', attempts = attempts + 1, owner = ?, "
                "environment = ?, error = NULL, started_at = ?, heartbeat_at = ?, "
                "finished_at = NULL, diverged_at_epoch = NULL, data_fingerprint = ? WHERE id = ?",
                (
                    owner,
                    json.dumps(environment, sort_keys=True),
                    now,
                    now,
                    data_fingerprint,
                    row["id"],
                ),
            )
            return int(row["id"])

    def _refuse_other_data(
        self, db: sqlite3.Connection, dataset: str, data_fingerprint: str
    ) -> None:
        other = db.execute(
            "SELECT data_fingerprint, COUNT(*) AS runs FROM runs WHERE dataset = ? AND "
            "status != 'failed' AND data_fingerprint IS NOT NULL AND data_fingerprint != ? "
            "GROUP BY data_fingerprint",
            (dataset, data_fingerprint),
        ).fetchone()
        if other is not None:
            raise DataMismatchError(
                f"{other['runs']} {dataset} run(s) in {self.path} trained on other data "
                f"(fingerprint {other['data_fingerprint']}, this data {data_fingerprint}): "
                "give --data-dir the data they trained on, or use another --db"
            )

    def data_fingerprints(self, dataset: str) -> set[str]:
        """The fingerprints of the data this dataset's runs (failed ones aside) trained on."""
        rows = self._connection.execute(
            "SELECT DISTINCT data_fingerprint FROM runs WHERE dataset = ? AND "
            "status != 'failed' AND data_fingerprint IS NOT NULL",
            (dataset,),
        )
        return {row[0] for row in rows}

    def check_data(self, dataset: str, data_fingerprint: str) -> None:
        """:class:`DataMismatchError` unless every run of ``dataset`` with a recorded
        fingerprint trained on data with ``data_fingerprint``."""
        self._refuse_other_data(self._connection, dataset, data_fingerprint)

    def _check_still_owned(self, db: sqlite3.Connection, run_id: int) -> None:
        """Raise :class:`RunLostError` unless this process still trains ``run_id``: a run
        taken over by another process (its heartbeat looked stale) is no longer ours to write."""
        row = db.execute(
            "SELECT 1 FROM runs WHERE id = ? AND owner = ? AND status = 'running'",
            (run_id, _this_process()),
        ).fetchone()
        if row is None:
            raise RunLostError(f"run {run_id} was taken over by another process")

    def record_epoch(self, run_id: int, metrics: Mapping[str, Any]) -> None:
        """Store one epoch's metrics (keys: ``EPOCH_COLUMNS``) and refresh the run's heartbeat.
        :class:`RunLostError` when the run is no longer this process's."""
        values = [metrics["epoch"]] + [
            _finite_or_none(
                metrics.get(column) if column in OPTIONAL_EPOCH_COLUMNS else metrics[column]
            )
            for column in EPOCH_COLUMNS[1:]
        ]
        placeholders = ", ".join("?" for _ in EPOCH_COLUMNS)
        with self._transaction("IMMEDIATE") as db:
            self._check_still_owned(db, run_id)
            db.execute(
                f"INSERT INTO epochs (run_id, {', '.join(EPOCH_COLUMNS)}) "
                f"VALUES (?, {placeholders})",
                (run_id, *values),
            )
            db.execute("UPDATE runs SET heartbeat_at = ? WHERE id = ?", (_now(), run_id))

    def save_weights(
        self, run_id: int, config_hash: str, state_dict: Mapping[str, torch.Tensor]
    ) -> str:
        """Write the run's final weights beside the database and return their path relative to
        it. The file appears whole (written aside, then renamed) and only while the run is
        still this process's (else :class:`RunLostError`, and nothing is replaced). Nothing is
        left behind when writing fails (a full disk raises ``OSError``), and partial files an
        earlier, killed attempt of this run left are deleted."""
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        target = self.weights_dir / f"{config_hash}.pt"
        for leftover in self.weights_dir.glob(f"{config_hash}.pt.*.partial"):
            # This process owns the run now: no other writes these.
            leftover.unlink(missing_ok=True)
        # Serialised in memory: the file's bytes then depend on the weights alone (torch names
        # the archive's records after the file), and writing them raises a plain OSError.
        buffer = io.BytesIO()
        torch.save(dict(state_dict), buffer)
        partial = target.with_name(f"{target.name}.{uuid.uuid4().hex}.partial")
        try:
            with open(partial, "wb") as stream:
                stream.write(buffer.getbuffer())
                stream.flush()
                os.fsync(stream.fileno())
            with self._transaction("IMMEDIATE") as db:
                self._check_still_owned(db, run_id)
                os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return str(target.relative_to(self.path.parent))

    def finish(self, run_id: int, final: Mapping[str, Any], weights_path: str) -> None:
        """Mark the run finished with its final metrics (keys: ``FINAL_COLUMNS``;
        ``diverged_at_epoch`` may be left out for a run that did not diverge, and
        ``final_validation_accuracy`` for a run without a validation split).
        :class:`RunLostError` when the run is no longer this process's."""
        final = {"diverged_at_epoch": None, "final_validation_accuracy": None, **final}
        assignments = ", ".join(f"{column} = ?" for column in FINAL_COLUMNS)
        values = [_finite_or_none(final[column]) for column in FINAL_COLUMNS]
        with self._transaction("IMMEDIATE") as db:
            self._check_still_owned(db, run_id)
            db.execute(
                f"UPDATE runs SET status = 'finished', finished_at = ?, weights_path = ?, "
                f"{assignments} WHERE id = ?",
                (_now(), weights_path, *values, run_id),
            )

    def fail(self, run_id: int, error: str) -> bool:
        """Mark the run failed with ``error``; ``False``, and nothing written, when the run is
        no longer this process's (its new owner's outcome stands)."""
        with self._transaction("IMMEDIATE") as db:
            try:
                self._check_still_owned(db, run_id)
            except RunLostError:
                return False
            db.execute(
                "UPDATE runs SET status = 'failed', error = ?, finished_at = ? WHERE id = ?",
                (error, _now(), run_id),
            )
            return True

    def record_sharpness(
        self,
        run_id: int,
        *,
        metrics: Mapping[str, float],
        examples: int,
        data: str,
        settings: Mapping[str, Any],
        measure_time_s: float,
        environment: Mapping[str, Any],
        landscape: Mapping[str, Any] | None = None,
    ) -> None:
        """Store the run's sharpness measured with ``settings``, replacing any earlier
        measurement of it with the same settings (one row a run and settings; measurements with
        other settings are kept beside it).

        ``metrics`` is what :func:`flatminima.sharpness.measure_sharpness` returned. A landscape
        already stored is kept when ``landscape`` is ``None`` (it records its own seed and
        number of examples).
        """
        more: list[float] = []
        for i in itertools.count(2):  # hessian_eigenvalue_2, _3, ... up to top_k
            if f"hessian_eigenvalue_{i}" not in metrics:
                break
            more.append(metrics[f"hessian_eigenvalue_{i}"])
        values = [_finite_or_none(float(metrics[column])) for column in SHARPNESS_COLUMNS]
        columns = (
            "run_id, config_hash, examples, data, settings, hessian_more_eigenvalues, landscape, "
            "measure_time_s, environment, measured_at, " + ", ".join(SHARPNESS_COLUMNS)
        )
        placeholders = ", ".join("?" for _ in range(10 + len(SHARPNESS_COLUMNS)))
        with self._transaction("IMMEDIATE") as db:
            row = db.execute(
                "SELECT config_hash FROM runs WHERE id = ? AND status = 'finished'", (run_id,)
            ).fetchone()
            if row is None:
                raise ValueError(f"no finished run with id {run_id} in {self.path}")
            # An upsert on the run and settings: a re-measurement (--force) never leaves two
            # rows for them.
            updates = ", ".join(
                f"{name} = excluded.{name}"
                for name in (name.strip() for name in columns.split(","))
                if name not in ("run_id", "settings", "landscape")
            )
            db.execute(
                f"INSERT INTO sharpness ({columns}) VALUES ({placeholders}) "
                f"ON CONFLICT(run_id, settings) DO UPDATE SET {updates}, "
                "landscape = COALESCE(excluded.landscape, sharpness.landscape)",
                (
                    run_id,
                    row["config_hash"],
                    examples,
                    data,
                    settings_key(settings),
                    json.dumps([_finite_or_none(v) for v in more]) if more else None,
                    json.dumps(dict(landscape)) if landscape is not None else None,
                    measure_time_s,
                    json.dumps(dict(environment), sort_keys=True),
                    _now(),
                    *values,
                ),
            )

    def record_landscape(
        self, run_id: int, settings: Mapping[str, Any], landscape: Mapping[str, Any]
    ) -> None:
        """Add a 1-D landscape to the run's existing sharpness row of ``settings``."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE sharpness SET landscape = ? WHERE run_id = ? AND settings = ?",
                (json.dumps(dict(landscape)), run_id, settings_key(settings)),
            )
            if cursor.rowcount != 1:
                raise ValueError(
                    f"run {run_id} has no sharpness row with these settings to add a landscape to"
                )

    def forget(self, config_hash: str) -> RunRecord:
        """Delete the run of ``config_hash`` with its epochs, sharpness rows and weights file,
        and return what it was. :class:`StoreError` for a run another live process trains."""
        with self._transaction("IMMEDIATE") as db:
            row = db.execute(
                "SELECT *, COALESCE(heartbeat_at, started_at) AS heartbeat FROM runs "
                "WHERE config_hash = ?",
                (config_hash,),
            ).fetchone()
            if row is None:
                raise StoreError(f"no run with configuration hash {config_hash} in {self.path}")
            if (
                row["status"] == "running"
                and row["owner"] != _this_process()
                and _owner_is_alive(row["owner"], _age_s(row["heartbeat"]), DEFAULT_STALE_AFTER_S)
            ):
                raise StoreError(
                    f"run {config_hash} is being trained by {row['owner']}: stop that process first"
                )
            db.execute("DELETE FROM runs WHERE id = ?", (row["id"],))  # cascades
        # After the rows: a file left by a crash here is overwritten by the next run of it.
        for path in self.weights_dir.glob(f"{config_hash}.pt*"):
            path.unlink(missing_ok=True)
        return _record(row)

    # --- reading -------------------------------------------------------------------------------

    def find(self, config_hash: str) -> RunRecord | None:
        """The run of this configuration, whatever its status, or ``None``."""
        row = self._connection.execute(
            "SELECT * FROM runs WHERE config_hash = ?", (config_hash,)
        ).fetchone()
        return None if row is None else _record(row)

    def runs(self, status: str | None = None) -> list[RunRecord]:
        """Every run, oldest first; only those with ``status`` when given."""
        query = "SELECT * FROM runs"
        parameters: tuple[Any, ...] = ()
        if status is not None:
            query += " WHERE status = ?"
            parameters = (status,)
        rows = self._connection.execute(query + " ORDER BY id", parameters).fetchall()
        return [_record(row) for row in rows]

    def live_runs(self, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> set[str]:
        """Configuration hashes of the ``running`` runs whose process is still alive, judged as
        :meth:`claim` judges them; the other running runs were interrupted."""
        rows = self._connection.execute(
            "SELECT config_hash, owner, COALESCE(heartbeat_at, started_at) AS heartbeat "
            "FROM runs WHERE status = 'running'"
        ).fetchall()
        return {
            row["config_hash"]
            for row in rows
            if _owner_is_alive(row["owner"], _age_s(row["heartbeat"]), stale_after_s)
        }

    def epochs(self, run_id: int) -> list[dict[str, Any]]:
        """The run's epoch rows in order, as dictionaries keyed by ``EPOCH_COLUMNS``."""
        rows = self._connection.execute(
            f"SELECT {', '.join(EPOCH_COLUMNS)} FROM epochs WHERE run_id = ? ORDER BY epoch",
            (run_id,),
        ).fetchall()
        return [dict(row) for row in rows]

    def sharpness_records(self) -> list[SharpnessRecord]:
        """Every sharpness row, whatever its settings, by run then settings."""
        rows = self._connection.execute(
            "SELECT * FROM sharpness ORDER BY run_id, settings"
        ).fetchall()
        return [_sharpness_record(row) for row in rows]

    def sharpness(self, settings: Mapping[str, Any] | None = None) -> dict[str, SharpnessRecord]:
        """The sharpness rows measured with ``settings``, keyed by the run's configuration
        hash. Without ``settings``: every row, when they all share their settings; a
        ``ValueError`` when they do not (rows of different settings are never mixed)."""
        if settings is not None:
            rows = self._connection.execute(
                "SELECT * FROM sharpness WHERE settings = ? ORDER BY run_id",
                (settings_key(settings),),
            ).fetchall()
            return {row["config_hash"]: _sharpness_record(row) for row in rows}
        records = self.sharpness_records()
        kinds = {settings_key(record.settings) for record in records}
        if len(kinds) > 1:
            raise ValueError(
                f"{self.path} holds sharpness measured with {len(kinds)} different settings: "
                "ask for the rows of one"
            )
        return {record.config_hash: record for record in records}


def settings_key(settings: Mapping[str, Any]) -> str:
    """The canonical text of measurement settings: their key in the ``sharpness`` table."""
    return json.dumps(dict(settings), sort_keys=True)


def _as_float(value: float | None) -> float:
    # NULL is how a non-finite number was stored (see _finite_or_none).
    return math.nan if value is None else float(value)


def _sharpness_record(row: sqlite3.Row) -> SharpnessRecord:
    metrics = {column: _as_float(row[column]) for column in SHARPNESS_COLUMNS}
    for i, value in enumerate(json.loads(row["hessian_more_eigenvalues"] or "[]"), start=2):
        metrics[f"hessian_eigenvalue_{i}"] = _as_float(value)
    return SharpnessRecord(
        run_id=row["run_id"],
        config_hash=row["config_hash"],
        metrics=metrics,
        examples=row["examples"],
        data=row["data"],
        settings=json.loads(row["settings"]),
        landscape=json.loads(row["landscape"]) if row["landscape"] is not None else None,
        measure_time_s=row["measure_time_s"],
        environment=json.loads(row["environment"] or "{}"),
        measured_at=row["measured_at"],
    )


def _record(row: sqlite3.Row) -> RunRecord:
    return RunRecord(
        id=row["id"],
        config_hash=row["config_hash"],
        config=json.loads(row["config"]),
        status=row["status"],
        attempts=row["attempts"],
        environment=json.loads(row["environment"] or "{}"),
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        error=row["error"],
        final={column: row[column] for column in FINAL_COLUMNS},
        weights_path=row["weights_path"],
        data_fingerprint=row["data_fingerprint"],
    )
