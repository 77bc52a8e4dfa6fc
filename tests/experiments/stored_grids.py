"""What a grid left in its database, in a form two databases can be compared by: the check
that a resumed, interrupted or remotely trained grid equals an uninterrupted local one."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from flatminima.experiments.store import EPOCH_COLUMNS, FINAL_COLUMNS

TIMED = {"train_time_s"}
"""Wall-clock columns: the only ones allowed to differ between two trainings of a run."""


def stored_runs(db_path: Path, *, environment: bool = False) -> dict[str, Any]:
    """Every run by configuration hash: its row (times and bookkeeping aside; the environment
    record only when asked), its epochs (times aside) and its weights' bytes."""
    connection = sqlite3.connect(db_path)
    connection.row_factory = sqlite3.Row
    try:
        stored = {}
        for run in connection.execute("SELECT * FROM runs ORDER BY config_hash"):
            epochs = connection.execute(
                f"SELECT {', '.join(EPOCH_COLUMNS)} FROM epochs WHERE run_id = ? ORDER BY epoch",
                (run["id"],),
            ).fetchall()
            stored[run["config_hash"]] = {
                "status": run["status"],
                "config": run["config"],
                "error": run["error"],
                **({"environment": run["environment"]} if environment else {}),
                "data": run["data_fingerprint"] if "data_fingerprint" in run.keys() else None,
                "final": {c: run[c] for c in FINAL_COLUMNS if c not in TIMED},
                "epochs": [{c: row[c] for c in EPOCH_COLUMNS if c not in TIMED} for row in epochs],
                "weights": (db_path.parent / run["weights_path"]).read_bytes()
                if run["weights_path"]
                else None,
            }
        return stored
    finally:
        connection.close()


def count_rows(db_path: Path, query: str, parameters: tuple[object, ...] = ()) -> int:
    """``query``'s count, read-only while a grid writes the database; -1 before the database or
    its schema exists."""
    try:
        connection = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
        try:
            return connection.execute(query, parameters).fetchone()[0]
        finally:
            connection.close()
    except sqlite3.Error:  # not created yet, or its schema not yet written
        return -1
