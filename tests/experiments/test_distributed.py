"""One run on two real processes (DistributedDataParallel over gloo, on this CPU).

What it must equal: for plain SGD, the one-process run of the same global batch, up to the
order of float additions (each process averages its half, then DDP averages the halves); for
SAM, not one-process SAM (each process perturbs with its own half's gradient: m-sharpness) but
one-process micro-batch SAM with as many micro-batches as processes, whose micro-batches are
the processes' shards (contiguous, sizes as ``torch.tensor_split``) on a model without
BatchNorm. The batches below are uneven on purpose (63 = 32 + 31, the last one 33 = 17 + 16):
the processes' losses are weighed by their shares, so the result is still the global batch's.

Starting two processes costs several seconds (each imports torch), so the checks share runs.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from flatminima.cli import main
from flatminima.experiments import distributed
from flatminima.experiments.config import ConfigError, RunConfig, make_run_config
from flatminima.experiments.data import load_dataset
from flatminima.experiments.distributed import (
    RankFailedError,
    check_process_budget,
    shard,
    train_distributed,
)
from flatminima.experiments.runner import TrainingOutcome, execute_run, train
from flatminima.experiments.store import Store
from flatminima.experiments.summary import summarize

pytestmark = pytest.mark.skipif(
    distributed.available_cores() < 2, reason="two training processes need two CPU cores"
)

SETTING: dict[str, Any] = {
    "dataset": "digits",
    "model": "mlp",  # no BatchNorm: micro-batch SAM's equality holds exactly
    "epochs": 2,
    "batch_size": 63,
    "train_size": 600,
    "label_noise": 0.2,
    "validation_size": 100,
}

RELATIVE_TOLERANCE = 1e-5
"""Between the 2-process and 1-process SGD runs' losses, and their weights (absolute, 1e-6):
float reduction order only (measured: 1e-7 relative on the losses, 1e-8 on the weights)."""


def _config(method: str, processes: int, **hyperparameters: Any) -> RunConfig:
    return make_run_config(
        method=method, hyperparameters=hyperparameters, processes=processes, **SETTING
    )


def _train(config: RunConfig) -> TrainingOutcome:
    data = load_dataset(
        config.dataset,
        seed=config.seed,
        train_size=config.train_size,
        label_noise=config.label_noise,
        validation_size=config.validation_size,
    )
    return train(config, data)


def _largest_weight_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def test_shards_are_contiguous_and_cut_like_micro_batches() -> None:
    rows = torch.arange(63)
    parts = [rows[shard(63, rank, 2)] for rank in range(2)]
    expected = torch.tensor_split(rows, 2)
    assert all(torch.equal(p, e) for p, e in zip(parts, expected, strict=True))
    assert [len(rows[shard(10, rank, 3)]) for rank in range(3)] == [4, 3, 3]


def test_two_processes_of_sgd_store_one_run_with_the_one_process_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "runs.db"
    common = ["--dataset", "digits", "--model", "mlp", "--epochs", "2", "--batch-size", "63"]
    common += ["--train-size", "600", "--label-noise", "0.2", "--validation-size", "100"]
    common += ["--db", str(db), "--quiet"]
    assert main(["run", *common]) == 0
    assert main(["run", *common, "--processes", "2"]) == 0
    one, two = _config("base", 1), _config("base", 2)
    assert one.config_hash != two.config_hash
    with Store(db) as store:
        runs = store.runs()
        assert len(runs) == 2 and all(run.status == "finished" for run in runs)
        single, double = store.find(one.config_hash), store.find(two.config_hash)
        assert single is not None and double is not None
        assert double.config["processes"] == 2
        single_epochs, double_epochs = store.epochs(single.id), store.epochs(double.id)
        # Two settings in the report (the process count is part of the configuration).
        trainings = sorted(setting.training for setting in summarize(store))
    assert len(trainings) == 2
    assert trainings[0].endswith("batch size 63") and trainings[1].endswith(
        "batch size 63 over 2 processes"
    )
    assert len(double_epochs) == len(single_epochs) == 2
    for a, b in zip(single_epochs, double_epochs, strict=True):
        for key in ("train_loss", "test_loss"):
            assert b[key] == pytest.approx(a[key], rel=RELATIVE_TOLERANCE), key
        # Rank 0's forward-only measurements: the same as one process's.
        for key in ("test_accuracy", "train_accuracy_noisy", "validation_accuracy"):
            assert b[key] == a[key] and b[key] is not None, key
        assert b["learning_rate"] == pytest.approx(a["learning_rate"], rel=1e-12)
        # Two processes each running one pass on half the batch: one pass of the global batch.
        assert b["passes"] == a["passes"]
    for key in (
        "final_train_accuracy_noisy",
        "final_train_accuracy_clean",
        "final_validation_accuracy",
        "passes",
    ):
        assert double.final[key] == single.final[key], key
    weights = [torch.load(db.parent / run.weights_path) for run in (single, double)]
    assert _largest_weight_difference(*weights) < 1e-6
    assert "2 trained" not in capsys.readouterr().out  # one run per command


def test_sam_on_two_processes_is_micro_batch_sam_and_repeats_exactly() -> None:
    sam_config = _config("sam", 2, rho=0.1)
    first, again = _train(sam_config), _train(sam_config)
    # Same configuration and seed: bit-identical, run after run.
    assert [e.test_loss for e in first.epochs] == [e.test_loss for e in again.epochs]
    assert [e.train_loss for e in first.epochs] == [e.train_loss for e in again.epochs]
    assert _largest_weight_difference(first.state_dict, again.state_dict) == 0.0

    one_process_sam = _train(_config("sam", 1, rho=0.1))
    micro_batch_sam = _train(_config("msam", 1, rho=0.1, micro_batches=2))
    # Per-process ε: not SAM's one ε of the whole batch...
    assert _largest_weight_difference(first.state_dict, one_process_sam.state_dict) > 1e-4
    # ...but one ε per shard, which is micro-batch SAM with the shards as micro-batches.
    assert _largest_weight_difference(first.state_dict, micro_batch_sam.state_dict) < 1e-6
    for a, b in zip(micro_batch_sam.epochs, first.epochs, strict=True):
        assert b.train_loss == pytest.approx(a.train_loss, rel=RELATIVE_TOLERANCE)
        assert b.test_loss == pytest.approx(a.test_loss, rel=RELATIVE_TOLERANCE)
        # micro-batch SAM adds its uneven micro-batches' shares: equal up to float rounding.
        assert b.passes == pytest.approx(a.passes, rel=1e-12)
    assert first.final["passes"] == pytest.approx(micro_batch_sam.final["passes"], rel=1e-12)
    assert first.final["passes"] == 2 * 10 * 2  # 2 passes, 10 steps an epoch, 2 epochs


def _raise_in_process_1(rank: int, epoch: int) -> None:
    if rank == 1 and epoch == 2:
        raise ValueError("injected failure")


def _kill_process_1(rank: int, epoch: int) -> None:
    if rank == 1 and epoch == 2:
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_process_that_raises_fails_the_run_with_its_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = distributed.train_distributed

    def with_fault(*args: Any, **kwargs: Any) -> TrainingOutcome:
        return original(*args, fault=_raise_in_process_1, **kwargs)

    monkeypatch.setattr(distributed, "train_distributed", with_fault)
    config = _config("sam", 2)
    started = time.monotonic()
    with Store(tmp_path / "runs.db") as store:
        with pytest.raises(RankFailedError, match="process 1 of 2 failed: ValueError: injected"):
            execute_run(config, store)
        run = store.find(config.config_hash)
        assert run is not None and run.status == "failed"
        assert "ValueError: injected failure" in (run.error or "")
        # Rank 0 recorded the first epoch before the failure; nothing else.
        assert len(store.epochs(run.id)) == 1
    assert time.monotonic() - started < 60  # no hang


@pytest.mark.slow  # the same path as a raising process, but for the message
def test_a_killed_process_fails_the_run_and_ends_the_others() -> None:
    config = _config("base", 2)
    data = load_dataset("digits", seed=0, train_size=600, label_noise=0.2)
    started = time.monotonic()
    with pytest.raises(RankFailedError, match="process 1 of 2 was killed by SIGKILL"):
        train_distributed(config, data, fault=_kill_process_1)
    assert time.monotonic() - started < 60


def test_configurations_a_multi_process_run_cannot_take_are_refused() -> None:
    with pytest.raises(ConfigError, match="processes must be at most the epoch's last batch"):
        make_run_config(**{**SETTING, "train_size": 631}, method="base", processes=2)
    with pytest.raises(ConfigError, match="track sharpness is not supported with processes"):
        make_run_config(**SETTING, method="base", processes=2, track_sharpness=1)
    with pytest.raises(ConfigError, match="--jobs 2 with --processes 2"):
        check_process_budget(2, 2, cores=8)
    with pytest.raises(ConfigError, match="--processes must be at most the 2 CPU core"):
        check_process_budget(1, 3, cores=2)
    check_process_budget(1, 2, cores=2)
    check_process_budget(4, 1, cores=2)  # one-process runs: as before


def test_compare_refuses_jobs_with_processes_before_writing_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "runs.db"
    arguments = ["compare", "--methods", "base,sam", "--seeds", "0", "--dataset", "digits"]
    arguments += ["--model", "mlp", "--db", str(db), "--jobs", "2", "--processes", "2"]
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert "--jobs 2 with --processes 2" in error and len(error.strip().splitlines()) == 1
    assert not db.exists()


def _training_processes_of(pid: int) -> list[int]:
    """The processes ``pid`` started with multiprocessing's spawn (its training processes)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid and b"spawn_main" in command:
            children.append(int(entry.name))
    return children


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie, exited but not yet reaped by init, counts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


DEFAULT_CTRL_C = (
    "import signal, sys\n"
    "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    "from flatminima.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
"""`flatminima` with Ctrl-C raising KeyboardInterrupt, as in a terminal's foreground job, even
when the test suite itself runs as a background job of a shell without job control (which
starts it with SIGINT ignored, a disposition every child inherits)."""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize(
    "stop",
    [
        "ctrl-c",
        pytest.param("sigterm", marks=pytest.mark.slow),
        pytest.param("sigkill", marks=pytest.mark.slow),
    ],
)
def test_stopping_the_command_stops_every_process(tmp_path: Path, stop: str) -> None:
    """Ctrl-C reaches the whole process group (as in a terminal); SIGTERM reaches the command
    only, which ends its training processes; after SIGKILL they notice it is gone and stop."""
    db = tmp_path / "runs.db"
    command = [
        sys.executable, "-c", DEFAULT_CTRL_C, "run", "--processes", "2", "--dataset", "digits",
        "--model", "mlp", "--epochs", "500", "--train-size", "600", "--db", str(db), "--quiet",
    ]  # fmt: skip
    # Its own process group, as a terminal's foreground job.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 120
    training: list[int] = []
    try:
        while True:  # until an epoch is recorded: both training processes are at work
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the run recorded no epoch"
            try:
                with sqlite3.connect(db) as connection:
                    epochs = connection.execute("SELECT COUNT(*) FROM epochs").fetchone()[0]
            except sqlite3.OperationalError:
                epochs = 0
            if epochs:
                break
            time.sleep(0.05)
        training = _training_processes_of(process.pid)
        assert len(training) == 2
        if stop == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGTERM if stop == "sigterm" else signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)
        while not all(_gone(pid) for pid in training):
            assert time.monotonic() < deadline + 60, "training processes left running"
            time.sleep(0.1)
    finally:
        process.kill()
        for pid in training:  # only if the test failed: leave nothing behind
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
    if stop != "sigkill":
        assert process.returncode == 130, stderr
        assert "Traceback" not in stderr, stderr
