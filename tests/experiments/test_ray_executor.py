"""The Ray executor: a grid's runs as Ray tasks on a local Ray instance (2 CPUs, shared by the
module), the database written by the driver alone. What it stores must be what the local
executor stores for the same grid (metrics, configuration hashes, weights byte for byte), also
after a worker is killed mid-run and after the driver is killed mid-grid.

Workers are killed by a hook every worker process of the module's Ray instance installs at
start (Ray's ``worker_process_setup_hook``): it wraps the training a task runs and, when the
plan file says so, kills its own process with SIGKILL (or raises) at a given epoch of a given
configuration, once.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from stored_grids import count_rows, stored_runs

from flatminima.cli import main
from flatminima.experiments.config import make_run_config
from flatminima.experiments.runner import run_grid
from flatminima.experiments.store import Store

TRAINING = {
    "dataset": "digits",
    "model": "mlp",
    "epochs": 3,
    "train_size": 512,
    "batch_size": 64,
    "label_noise": 0.4,
}
METHODS = ("sgd", "sam")
SEEDS = (0, 1)
CONFIGS = [make_run_config(method=m, seed=s, **TRAINING) for s in SEEDS for m in METHODS]
VICTIM = CONFIGS[1]
"""The configuration whose worker the fault tests kill."""


def _attempts(db_path: Path) -> dict[str, int]:
    with Store(db_path) as store:
        return {run.config_hash: run.attempts for run in store.runs()}


def _no_partial_files(db_path: Path) -> bool:
    return not [path for path in db_path.parent.rglob("*") if "partial" in path.name]


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What the local executor stores for the grid."""
    db_path = tmp_path_factory.mktemp("local") / "grid.db"
    summary = run_grid(CONFIGS, db_path, progress=False)
    assert summary.finished == len(CONFIGS)
    return stored_runs(db_path, environment=True)


@pytest.fixture(scope="module")
def fault_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The file the workers' hook reads at every epoch: no file, no fault."""
    return tmp_path_factory.mktemp("faults") / "plan.json"


def _plan(path: Path, action: str, epoch: int) -> Path:
    """Make the worker training ``VICTIM`` ``action`` (kill or raise) after recording
    ``epoch``, on its first attempt only; the marker file says it happened."""
    marker = path.with_name(f"{action}-done")
    marker.unlink(missing_ok=True)
    plan = {"hash": VICTIM.config_hash, "epoch": epoch, "action": action, "marker": str(marker)}
    path.write_text(json.dumps(plan))
    return marker


def _fault_hook(plan_path: str) -> Any:
    """The setup hook of every worker process (pickled by value: a closure)."""

    HOLD_S = 120.0

    def install() -> None:
        import json
        import os
        import signal
        import time
        from pathlib import Path

        from flatminima.experiments import ray_executor

        train = ray_executor.load_and_train

        def load_and_train_with_faults(config, data_dir=None, on_epoch=None):  # type: ignore[no-untyped-def]
            def after_epoch(metrics):  # type: ignore[no-untyped-def]
                on_epoch(metrics)  # reported (and recorded by the driver) first
                plan_file = Path(plan_path)
                if not plan_file.exists():
                    return
                plan = json.loads(plan_file.read_text())
                marker = Path(plan["marker"])
                if (
                    plan["hash"] == config.config_hash
                    and plan["epoch"] == metrics.epoch
                    and not marker.exists()
                ):
                    marker.touch()
                    if plan["action"] == "hold":
                        # Stay part-way through (until the driver, and with it this task,
                        # is killed): the driver-kill test needs a run caught mid-training,
                        # whatever the machine's speed.
                        time.sleep(HOLD_S)
                    if plan["action"] == "kill":
                        # Reports are sent without waiting: give them a moment to leave, so
                        # that the test can see the epochs recorded while the task ran.
                        time.sleep(1.0)
                        os.kill(os.getpid(), signal.SIGKILL)
                    raise RuntimeError("injected failure")

            return train(config, data_dir, on_epoch=after_epoch)

        ray_executor.load_and_train = load_and_train_with_faults

    return install


@pytest.fixture(scope="module")
def ray_session(fault_plan: Path) -> Iterator[Any]:
    """One local Ray instance of 2 CPUs for the module; the executor uses it as it is."""
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        logging_level="warning",
        runtime_env={"worker_process_setup_hook": _fault_hook(str(fault_plan))},
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def run_on_ray(ray_session: Any) -> Any:
    from flatminima.experiments.ray_executor import run_grid_on_ray

    return run_grid_on_ray


def test_a_ray_grid_stores_exactly_what_the_local_executor_stores(
    run_on_ray: Any,
    local: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db_path = tmp_path / "grid.db"
    summary = run_on_ray(CONFIGS, db_path, progress=True)
    assert (summary.finished, summary.failed, summary.stopped) == (4, [], None)
    assert stored_runs(db_path, environment=True) == local
    # The progress (plain lines: stderr is not a terminal here) follows the driver's records.
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    expected = {
        f"{config.label}: finished after {TRAINING['epochs']} epoch(s), test accuracy "
        f"{local[config.config_hash]['final']['final_test_accuracy']:.3f}"
        for config in CONFIGS
    }
    assert {line.split("] ", 1)[1] for line in lines} == expected
    assert set(_attempts(db_path).values()) == {1}
    assert _no_partial_files(db_path)
    # The driver wrote every row: every run is owned by this process.
    with sqlite3.connect(db_path) as connection:
        owners = {owner for (owner,) in connection.execute("SELECT owner FROM runs")}
    assert len(owners) == 1 and f":{os.getpid()}" in owners.pop()

    again = run_on_ray(CONFIGS, db_path, progress=False)
    assert (again.already_finished, again.finished) == (4, 0)


def test_a_worker_killed_mid_run_is_retried_and_the_grid_equals_the_local_one(
    run_on_ray: Any, local: dict[str, Any], fault_plan: Path, tmp_path: Path
) -> None:
    db_path = tmp_path / "grid.db"
    killed = _plan(fault_plan, "kill", epoch=2)
    try:
        summary = run_on_ray(CONFIGS, db_path, progress=False)
    finally:
        fault_plan.unlink()
    assert killed.exists(), "the worker was not killed"
    assert (summary.finished, summary.failed) == (4, [])
    # Trained again from scratch: epochs 1 and 2 of the dead worker were deleted.
    assert _attempts(db_path)[VICTIM.config_hash] == 2
    assert stored_runs(db_path, environment=True) == local
    assert _no_partial_files(db_path)


def test_a_worker_killed_past_its_retries_leaves_the_run_to_be_redone(
    run_on_ray: Any, local: dict[str, Any], fault_plan: Path, tmp_path: Path
) -> None:
    db_path = tmp_path / "grid.db"
    killed = _plan(fault_plan, "kill", epoch=2)
    try:
        summary = run_on_ray(CONFIGS, db_path, progress=False, max_retries=0)
    finally:
        fault_plan.unlink()
    assert killed.exists()
    assert summary.finished == 3 and len(summary.failed) == 1
    assert summary.failed[0].startswith(f"{VICTIM.label}: WorkerCrashedError: ")
    with Store(db_path) as store:
        victim = store.find(VICTIM.config_hash)
        assert victim is not None and victim.status == "failed"
        assert victim.error is not None and victim.error.startswith("WorkerCrashedError")
        # The epochs reached the database while the task ran (it never returned).
        assert [row["epoch"] for row in store.epochs(victim.id)] == [1, 2]

    resumed = run_on_ray(CONFIGS, db_path, progress=False)
    assert (resumed.already_finished, resumed.finished, resumed.failed) == (3, 1, [])
    assert stored_runs(db_path, environment=True) == local
    assert _attempts(db_path)[VICTIM.config_hash] == 2


def test_a_run_that_raises_on_its_worker_is_recorded_failed_as_locally(
    run_on_ray: Any, fault_plan: Path, tmp_path: Path
) -> None:
    db_path = tmp_path / "grid.db"
    _plan(fault_plan, "raise", epoch=1)
    try:
        summary = run_on_ray(CONFIGS, db_path, progress=False)
    finally:
        fault_plan.unlink()
    # The error as the local executor words it; the grid went on with the others.
    assert summary.failed == [f"{VICTIM.label}: RuntimeError: injected failure"]
    assert summary.finished == 3
    with Store(db_path) as store:
        victim = store.find(VICTIM.config_hash)
        assert victim is not None
        assert (victim.status, victim.error) == ("failed", "RuntimeError: injected failure")


DRIVER_WITH_FAULTS = """
import sys
import ray
sys.path.insert(0, {tests!r})
from test_ray_executor import _fault_hook
ray.init(address={address!r}, logging_level="warning",
         runtime_env={{"worker_process_setup_hook": _fault_hook({plan!r})}})
from flatminima.cli import main
sys.exit(main(sys.argv[1:]))
"""
"""A ``compare`` driver whose job's workers install the fault hook too: a driver that is
another process is another Ray job, with its own workers and runtime environment."""


def _compare_arguments(db_path: Path, address: str) -> list[str]:
    return [
        "compare",
        "--methods", ",".join(METHODS), "--seeds", ",".join(map(str, SEEDS)),
        "--dataset", TRAINING["dataset"], "--model", TRAINING["model"],
        "--epochs", str(TRAINING["epochs"]), "--train-size", str(TRAINING["train_size"]),
        "--batch-size", str(TRAINING["batch_size"]),
        "--label-noise", str(TRAINING["label_noise"]),
        "--quiet", "--db", str(db_path),
        "--executor", "ray", "--ray-address", address,
    ]  # fmt: skip


def test_a_driver_killed_mid_grid_leaves_a_grid_the_same_command_completes(
    ray_session: Any, local: dict[str, Any], fault_plan: Path, tmp_path: Path
) -> None:
    db_path = tmp_path / "grid.db"
    address = ray_session.get_runtime_context().gcs_address
    # The victim's worker holds after its first epoch, so that the driver is killed with a run
    # part-way through (recorded epochs, not finished) on a machine of any speed.
    held = _plan(fault_plan, "hold", epoch=1)
    launcher = DRIVER_WITH_FAULTS.format(
        tests=str(Path(__file__).parent), address=address, plan=str(fault_plan)
    )
    driver = subprocess.Popen(
        [sys.executable, "-c", launcher, *_compare_arguments(db_path, address)],
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    try:
        while (
            count_rows(
                db_path,
                "SELECT COUNT(*) FROM runs WHERE status = 'running' AND config_hash = ? "
                "AND id IN (SELECT run_id FROM epochs)",
                (VICTIM.config_hash,),
            )
            < 1
        ):
            assert driver.poll() is None, driver.stderr.read().decode() if driver.stderr else ""
            assert time.monotonic() < deadline, "the held run's first epoch was not recorded"
            time.sleep(0.02)
        assert held.exists()
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        with Store(db_path) as store:
            victim = store.find(VICTIM.config_hash)
            assert victim is not None and victim.status == "running"

        # The same command again (here, in this process, on the module's Ray instance); the
        # plan has been carried out, so nothing holds this time.
        status = main(_compare_arguments(db_path, address))
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        fault_plan.unlink(missing_ok=True)
    assert status == 0
    assert stored_runs(db_path, environment=True) == local
    assert _no_partial_files(db_path)


def test_without_ray_the_ray_executor_is_one_line_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    db_path = tmp_path / "grid.db"
    arguments = _compare_arguments(db_path, "auto")[:-2]  # no --ray-address
    assert main(arguments) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "flatminima compare: error: --executor ray needs Ray, which is not installed: "
        "pip install 'flatminima[ray]'"
    ]
    assert not db_path.exists()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--ray-address", "auto"], "--ray-address needs --executor ray"),
        (["--executor", "dask"], "argument --executor: invalid choice: 'dask'"),
        (
            ["--executor", "ray", "--ray-address", "auto", "--jobs", "2"],
            "--jobs sizes a local Ray instance",
        ),
    ],
)
def test_executor_options_are_checked_in_one_line(
    extra: list[str], expected: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db_path = tmp_path / "grid.db"
    try:
        status = main(["compare", "--methods", "sam", "--db", str(db_path), *extra])
    except SystemExit as usage_error:  # argparse's own checks
        status = usage_error.code
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0]
    assert not db_path.exists()
