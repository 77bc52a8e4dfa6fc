"""The ``flatminima`` command: train, compare, measure sharpness, report, and the demo that does
all of them.

    flatminima demo --quick                           # a first taste: base vs SAM, a minute or two
    flatminima demo                                   # the main job (see the README for times)
    flatminima run --method sam --param rho=0.1 --label-noise 0.4 --seed 0
    flatminima compare --methods base,sam --sweep rho=0.05,0.1,0.2 --seeds 0-2 --jobs 2
    flatminima compare --study noisy-digits.toml --jobs 2   # the grid as a TOML file
    flatminima compare --methods base,sam --seeds 0-9 --executor ray --ray-address auto
    flatminima sharpness --db flatminima.db --landscape --jobs 2
    flatminima report --db flatminima.db --out flatminima-report --select-by validation
    flatminima forget 3f2a --db flatminima.db          # a run, its rows and weights (or --failed)
    flatminima methods                                # every method and its hyperparameters

:mod:`~flatminima.cli.options` declares the options (each shared one once),
:mod:`~flatminima.cli.commands` holds the commands, which check and print; this module runs one
and turns errors and interruptions into one line. The work is done by
:mod:`flatminima.experiments`. Bad input ends with one line naming the argument and what it
accepts, exit status 2, before anything is written to the database. Exit status 1: a run
failed, or the grid stopped (a full disk); 3: the grid is incomplete because another process
still trains some of its runs. Ctrl-C and SIGTERM
stop the same way: workers stopped, finished runs and measurements kept, one line saying how to
go on.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

from flatminima.cli.commands import COMMANDS, selected_methods, sharpness_settings
from flatminima.cli.options import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_RUN_FAILED,
    build_parser,
    given_options,
)
from flatminima.experiments.config import ConfigError
from flatminima.experiments.data import DatasetUnavailableError
from flatminima.experiments.runner import WeightsFileError
from flatminima.experiments.sharpness_runs import select_runs
from flatminima.experiments.store import Store, StoreError

__all__ = ["build_parser", "interrupted_message", "main"]


def interrupted_message(args: argparse.Namespace, started_at: str) -> str:
    """What an interrupted command kept and how to go on, for this command."""
    if args.command == "sharpness":
        if not args.force:
            return (
                "interrupted; the measurements finished are stored, run the same command again "
                "to measure the rest"
            )
        return (
            "interrupted; the runs measured again before it have their new rows. The same "
            "command would measure every selected run again (--force)"
            + _left_to_measure(args, started_at)
        )
    if args.command in ("report", "methods"):
        return "interrupted"
    return "interrupted; finished runs are kept, run the same command again to resume"


def _left_to_measure(args: argparse.Namespace, started_at: str) -> str:
    """For ``sharpness --force``: the command that measures only the runs not yet measured
    again (their rows are older than this command)."""
    try:
        with Store(args.db, create=False) as store:
            selected = select_runs(store, args.runs, selected_methods(args))
            rows = store.sharpness(asdict(sharpness_settings(args)))
    except (OSError, sqlite3.Error, StoreError, ConfigError):
        return ""
    left = [
        run.config_hash
        for run in selected
        if run.config_hash not in rows or rows[run.config_hash].measured_at < started_at
    ]
    if not left:
        return ""
    return f"; to measure only the {len(left)} left: flatminima sharpness --force --runs " + (
        " ".join(left)
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: workers stopped, what finished kept."""


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def interrupt(signum: int, frame: Any) -> None:
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave the signal alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.given = given_options(parser, argv, args)
    logging.basicConfig(level=logging.WARNING, format="flatminima: %(levelname)s: %(message)s")
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    try:
        with _sigterm_as_interrupt():
            status = COMMANDS[args.command](args)
            sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
        return status
    except (ConfigError, DatasetUnavailableError, FileNotFoundError, StoreError) as error:
        print(f"flatminima {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        # The reader of our output went away (`flatminima methods | head`): not an error of
        # ours. Point stdout at /dev/null so that the interpreter's final flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_RUN_FAILED
    except (sqlite3.Error, OSError, WeightsFileError) as error:
        # The database or an output path went wrong mid-way (another program locked the file
        # past the timeout, a full disk, a path without permission, a damaged weights file):
        # one line, and the runs already finished stay in the database.
        print(f"flatminima {args.command}: error: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except KeyboardInterrupt:
        print(f"\nflatminima: {interrupted_message(args, started_at)}", file=sys.stderr)
        return EXIT_INTERRUPTED
