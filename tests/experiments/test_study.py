"""Studies as files: a TOML study plans exactly the runs of its command line, the demo is one,
a bad file is one line naming the key and its line, and the options it defines are refused
beside it."""

from __future__ import annotations

import re
import textwrap
from dataclasses import asdict
from pathlib import Path

import pytest
from planted_runs import plant

from flatminima.cli import build_parser, main
from flatminima.cli.commands import STUDY_DEFINES, grid_configs
from flatminima.experiments.config import ConfigError
from flatminima.experiments.demo import demo_configs
from flatminima.experiments.sharpness_runs import SharpnessSettings
from flatminima.experiments.store import Store
from flatminima.experiments.study import (
    TOP_LEVEL,
    TRAINING_TYPES,
    key_lines,
    load_study,
    packaged_study,
    parse_study,
)

ROOT = Path(__file__).resolve().parents[2]

STUDY = """\
# A ρ sweep on noisy digits.
seeds = "0-2"

[training]
dataset = "digits"
model = "mlp"
optimizer = "sgd"
lr = 0.1
momentum = 0.8
weight_decay = 1e-4
schedule = "constant"
epochs = 7
batch_size = 32
label_noise = 0.2
train_size = 900
validation_size = 200

[methods.base]

[methods.sam]
rho = [0.02, 0.05, 0.1]

[methods.fisher-sam]
rho = [0.05, 0.2]
eta = 0.5
"""

EQUIVALENT_COMMAND = [
    "compare", "--methods", "base,sam,fisher-sam", "--seeds", "0-2",
    "--sweep", "sam:rho=0.02,0.05,0.1", "--sweep", "fisher-sam:rho=0.05,0.2",
    "--param", "fisher-sam:eta=0.5",
    "--dataset", "digits", "--model", "mlp", "--optimizer", "sgd", "--lr", "0.1",
    "--momentum", "0.8", "--weight-decay", "1e-4", "--schedule", "constant", "--epochs", "7",
    "--batch-size", "32", "--label-noise", "0.2", "--train-size", "900",
]  # fmt: skip


def _hashes(configs: list) -> list[str]:
    return [config.config_hash for config in configs]


def test_a_study_plans_exactly_the_runs_of_its_command_line() -> None:
    planned = parse_study(STUDY, "digits.toml").configs()
    assert len(planned) == 3 * (1 + 3 + 2)
    assert [config.validation_size for config in planned] == [200] * len(planned)
    without_split = parse_study(STUDY.replace("validation_size = 200\n", ""), "digits.toml")
    args = build_parser().parse_args(EQUIVALENT_COMMAND)
    assert _hashes(without_split.configs()) == _hashes(grid_configs(args))
    if "validation_size" in vars(args):  # the command line's --validation-size, once it has one
        args = build_parser().parse_args([*EQUIVALENT_COMMAND, "--validation-size", "200"])
        assert _hashes(planned) == _hashes(grid_configs(args))


def test_keys_a_study_leaves_out_take_the_command_line_defaults() -> None:
    minimal = 'seeds = [0, 1]\n[training]\ndataset = "digits"\nmodel = "mlp"\nepochs = 4\n'
    minimal += "[methods.base]\n[methods.sam]\n"
    command = ["compare", "--methods", "base,sam", "--seeds", "0,1", "--dataset", "digits"]
    args = build_parser().parse_args([*command, "--model", "mlp", "--epochs", "4"])
    assert _hashes(parse_study(minimal).configs()) == _hashes(grid_configs(args))


def test_every_option_that_changes_a_run_is_one_a_study_defines() -> None:
    """An option that reaches the run's configuration but that a study cannot set would be
    silently ignored beside --study: every one is refused there, and a study key."""
    from flatminima.cli.commands import _training

    args = build_parser().parse_args(["compare", "--methods", "sam"])
    assert set(_training(args)) <= set(STUDY_DEFINES)
    assert set(_training(args)) <= set(TRAINING_TYPES)


DEMO_HASHES = [
    "fdd06e850ab1b52f", "dbc9327c3899ecc3", "74376f68b541979b", "b1ed2ecaf3b36974",
    "fe4fe306031c921c", "b3266ee2b7910fd2", "c062997cf9ce2eef", "a81f307762f4b52a",
    "af2069b06bc31d98", "5c3e6bf582779caa", "f94a21459f6ad7cf", "95c5b77d967725e6",
    "370c32e028717201", "33b7e1aaecd073ff", "4d516764526015ec", "efbe6f0c95b91220",
    "f0e95ca3f762c297", "5ebffb123e5a92d3",
]  # fmt: skip
"""The demo's runs before it became a study file (``demo_configs()`` at commit 575888d)."""


def test_the_demo_study_trains_what_the_demo_trained_before() -> None:
    assert [config.config_hash for config in demo_configs()] == DEMO_HASHES
    # --quick: base and SAM, the same runs as the full demo's (it resumes from them).
    quick = [config.config_hash for config in demo_configs(3, quick=True)]
    assert quick == [DEMO_HASHES[i] for i in (0, 1, 6, 7, 12, 13)]
    # --seeds and --epochs change only those.
    shorter = demo_configs(2, 7)
    assert [config.seed for config in shorter] == [0] * 6 + [1] * 6
    assert {config.epochs for config in shorter} == {7}
    assert shorter[0].config_hash == "9ca5b8e5d8005e61"  # also measured at 575888d


def test_the_packaged_studies_ship_with_the_package() -> None:
    import tomllib

    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["flatminima"]
    assert "studies/*.toml" in package_data
    for name in ("demo.toml", "demo-quick.toml"):
        assert (ROOT / "src" / "flatminima" / "studies" / name).is_file()
        assert packaged_study(name).database is None  # the demo command decides where


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_study(textwrap.dedent(text), "s.toml")
    message = str(caught.value)
    assert "\n" not in message
    return message


BASE = """\
seeds = [0, 1]

[training]
dataset = "mnist1d"
model = "cnn1d"
epochs = 3

[methods.sam]
rho = [0.05, 0.1]
"""


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        # Syntax: tomllib's own line and column.
        ('model = "cnn1d"', "model = cnn1d", r"^s\.toml: not valid TOML: .*line 5, column 9"),
        ("seeds = [0, 1]", "sedes = [0, 1]", r"^s\.toml:1: sedes: unknown key; accepted: seeds"),
        ("seeds = [0, 1]", "seeds = [0, 0]", r"^s\.toml:1: seeds: lists a seed twice"),
        ("seeds = [0, 1]", 'seeds = "2-1"', r"^s\.toml:1: seeds: range '2-1' is empty"),
        ("seeds = [0, 1]", "seeds = [0.5]", r"^s\.toml:1: seeds: takes a non-empty list"),
        ("seeds = [0, 1]", "", r"^s\.toml: seeds: is required"),
        ('dataset = "mnist1d"', 'dataset = "cifar"', r"^s\.toml:4: training\.dataset: unknown"),
        ('dataset = "mnist1d"', "", r"^s\.toml:3: training: training\.dataset is required"),
        ('model = "cnn1d"', 'model = "resnet20"', r"^s\.toml:5: training\.model: model"),
        ("epochs = 3", "epochs = 0", r"^s\.toml:6: training\.epochs: epochs must be >= 1"),
        ("epochs = 3", "epochs = 3.5", r"^s\.toml:6: training\.epochs: takes an integer"),
        ("epochs = 3", "epochs = 3\nlr = -1", r"^s\.toml:7: training\.lr: learning rate must"),
        ("epochs = 3", "epochs = 3\nlr = true", r"^s\.toml:7: training\.lr: takes a number, got a"),
        ("epochs = 3", "epochs = 3\nlabel_noise = 1.0", r"^s\.toml:7: training\.label_noise"),
        ("epochs = 3", "epochs = 3\nbatch_size = 0", r"^s\.toml:7: training\.batch_size"),
        ("epochs = 3", "epochs = 3\ntrain_size = 99999", r"^s\.toml:7: training\.train_size"),
        ("epochs = 3", "epochs = 3\nvalidation_size = -1", r"^s\.toml:7: training\.validation_s"),
        ("epochs = 3", "epochs = 3\ntrack_sharpness = 9", r"^s\.toml:7: training\.track_sharp"),
        ("epochs = 3", 'epochs = 3\noptimizer = "adam"', r"^s\.toml:7: training\.optimizer: unk"),
        ("epochs = 3", "epochs = 3\nepoch = 3", r"^s\.toml:7: training\.epoch: unknown key"),
        ("[methods.sam]", "[methods.adamsam]", r"^s\.toml:8: methods\.adamsam: unknown method"),
        ("rho = [0.05, 0.1]", "radius = 1.0", r"^s\.toml:9: methods\.sam\.radius: unknown key"),
        ("rho = [0.05, 0.1]", "rho = [0.05, -1]", r"^s\.toml:9: methods\.sam\.rho: .*rho must"),
        ("rho = [0.05, 0.1]", "rho = []", r"^s\.toml:9: methods\.sam\.rho: an empty list"),
        ("rho = [0.05, 0.1]", "rho = [0.1, 0.1]", r"^s\.toml:9: methods\.sam\.rho: lists a val"),
        ("rho = [0.05, 0.1]", 'rho = "0.1"', r"^s\.toml:9: methods\.sam\.rho: takes a number"),
        ("rho = [0.05, 0.1]", "rho = false", r"^s\.toml:9: methods\.sam\.rho: takes a number"),
        ("rho = [0.05, 0.1]", "rho = [[0.1]]", r"^s\.toml:9: methods\.sam\.rho: takes a number"),
        ("[methods.sam]\nrho = [0.05, 0.1]", "[methods]", r"^s\.toml:8: methods: at least one"),
        ("seeds = [0, 1]", 'seeds = [0, 1]\nselect_by = "test"', r"^s\.toml:2: select_by: takes"),
        (
            "seeds = [0, 1]",
            'seeds = [0, 1]\nselect_by = "validation"',
            r"^s\.toml:2: select_by: 'validation' .* training\.validation_size above 0",
        ),
        ("rho = [0.05, 0.1]", "rho = 0.1\n[output]\ndb = 'x'", r"^s\.toml:11: output\.db: unk"),
        ("rho = [0.05, 0.1]", "rho = 0.1\n[output]\nreport = 3", r"^s\.toml:11: output\.report"),
        ("seeds = [0, 1]", 'seeds = "0-20000"', r"^s\.toml:1: seeds: gives more than 10000"),
        ("rho = [0.05, 0.1]", "rho = 0.1\n[sharpness]\nprobes = 3", r"^s\.toml:11: sharpness\.pro"),
        (
            "rho = [0.05, 0.1]",
            "rho = 0.1\n[sharpness]\nexamples = 1.5",
            r"^s\.toml:11: sharpness\.examples: takes an integer",
        ),
        (
            "rho = [0.05, 0.1]",
            "rho = 0.1\n[sharpness]\nexamples = 64\ntop_k = 0",
            r"^s\.toml:12: sharpness\.top_k: top_k \(--top-k\) must be an integer >= 1",
        ),
        (
            "rho = [0.05, 0.1]",
            "rho = 0.1\n[sharpness]\nrho = true",
            r"^s\.toml:11: sharpness\.rho: takes a number, got a boolean",
        ),
        ("rho = [0.05, 0.1]", "rho = 0.1\nsharpness = 3", r"^s\.toml:10: methods\.sam\.sharp"),
    ],
)
def test_a_bad_study_is_one_line_naming_the_key_and_its_line(
    old: str, new: str, expected: str
) -> None:
    assert old in BASE
    message = _error(BASE.replace(old, new, 1))
    assert re.search(expected, message), message


def test_keys_in_inline_tables_and_dotted_keys_are_found_on_their_line() -> None:
    text = 'seeds = [0]\n[training]\ndataset = "digits"\nmodel = "mlp"\nepochs = 1\n[methods]\n'
    inline = text + "base = {}\nsam = { rho = [0.1, -2] }\n"
    assert re.match(r"^s\.toml:8: methods\.sam\.rho: ", _error(inline))
    dotted = text + "sam.rho = 0.1\n'fisher-sam'.eta = -1.0\n"
    assert re.match(r"^s\.toml:8: methods\.fisher-sam\.eta: ", _error(dotted))
    assert key_lines(dotted)["methods.fisher-sam.eta"] == 8


def test_a_study_and_its_command_line_name_the_same_method_once() -> None:
    twice = BASE + "\n[methods.sgd]\n[methods.base]\n"
    assert re.match(r"^s\.toml:12: methods\.base: base is listed twice", _error(twice))


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "given",
    [
        ["--methods", "sam"],
        ["--seeds", "0"],
        ["--sweep", "rho=0.1,0.2"],
        ["--param", "rho=0.1"],
        ["--epochs", "100"],  # the default value, given: still refused
        ["--epo=3"],  # an abbreviation
        ["--label-noise", "0.4"],
        ["--select-by", "validation"],
        ["--dataset", "digits"],
    ],
)
def test_options_a_study_defines_are_refused_beside_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], given: list[str]
) -> None:
    study = _write(tmp_path / "s.toml", BASE)
    assert main(["compare", "--study", str(study), "--db", str(tmp_path / "x.db"), *given]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "cannot be given with --study" in error and given[0].split("=")[0][:5] in error
    assert not (tmp_path / "x.db").exists()


def test_every_option_a_study_defines_is_a_study_key() -> None:
    keys = set(TRAINING_TYPES) | set(TOP_LEVEL) | {"param", "sweep"}
    assert set(STUDY_DEFINES) <= keys
    assert set(TRAINING_TYPES) <= set(STUDY_DEFINES)


TINY_STUDY = """\
seeds = [0]

[training]
dataset = "digits"
model = "mlp"
epochs = 1
train_size = 64
batch_size = 32

[methods.base]

[output]
database = "results/runs.db"
report = "results/report"
"""


def test_output_paths_are_relative_to_the_study_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    study = _write(tmp_path / "studies" / "tiny.toml", TINY_STUDY)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # Runtime options may be given beside the study.
    assert main(["compare", "--study", "../studies/tiny.toml", "--quiet", "--jobs", "1"]) == 0
    database = tmp_path / "studies" / "results" / "runs.db"
    with Store(database, create=False) as store:
        [run] = store.runs()
    assert run.config_hash == load_study(study).configs()[0].config_hash
    assert (tmp_path / "studies" / "results" / "report" / "report.md").is_file()
    assert list(elsewhere.iterdir()) == []
    # --db and --report still choose, beside the study.
    other = tmp_path / "other.db"
    arguments = ["compare", "--study", str(study), "--quiet", "--db", str(other)]
    assert main([*arguments, "--report", str(tmp_path / "r")]) == 0
    assert other.is_file() and (tmp_path / "r" / "report.md").is_file()
    capsys.readouterr()


def test_report_reads_the_study_database_with_its_selection_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The planted database's runs, as a study (its report shows the study's runs only).
    study_text = textwrap.dedent("""\
        seeds = [0, 1, 2]
        select_by = "validation"

        [training]
        dataset = "mnist1d"
        model = "cnn1d"
        epochs = 2
        batch_size = 64
        train_size = 256
        label_noise = 0.4
        validation_size = 100

        [methods.base]

        [methods.sam]
        rho = [0.05, 0.2]

        [methods.friendly-sam]
        rho = [0.05, 0.2]

        [output]
        database = "planted.db"
        report = "report"
        """)
    study = _write(tmp_path / "s.toml", study_text)
    plant(tmp_path / "planted.db")
    assert main(["report", "--study", str(study)]) == 0
    printed = capsys.readouterr().out
    assert "Hyperparameters chosen on validation data" in printed
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "ρ=0.05 of 0.05, 0.2" in markdown
    assert main(["report", "--study", str(study), "--select-by", "validation"]) == 2
    assert "--select-by cannot be given with --study" in capsys.readouterr().err


def test_compare_without_methods_or_study_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--seeds", "0"]) == 2
    assert "compare needs --methods (or a --study file)" in capsys.readouterr().err


def test_a_missing_study_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compare", "--study", str(tmp_path / "none.toml")]) == 2
    assert capsys.readouterr().err.strip().endswith("none.toml: no such file")


def test_the_documented_study_is_valid_and_complete() -> None:
    """docs/runner.md's example study parses, and names every key a study takes."""
    docs = (ROOT / "docs" / "runner.md").read_text()
    [example] = re.findall(r"```toml\n(.*?)```", docs, re.DOTALL)
    study = parse_study(example, "docs/runner.md", Path("/studies"))
    assert study.select_by == "validation"
    assert set(study.training) == set(TRAINING_TYPES)
    assert study.database == Path("/studies/noisy-digits.db")
    assert any(isinstance(value, list) for h in study.methods.values() for value in h.values())


def test_a_sharpness_table_sets_the_measurement_and_no_table_measures_nothing() -> None:
    assert parse_study(BASE).sharpness is None
    study = parse_study(BASE + "\n[sharpness]\nexamples = 256\nnum_probes = 4\nrho = 0.1\n")
    assert study.sharpness == SharpnessSettings(examples=256, num_probes=4, rho=0.1)
    assert parse_study(BASE + "\n[sharpness]\n").sharpness == SharpnessSettings()


SHARED = """\
seeds = [0, 1]
select_by = "validation"

[training]
dataset = "digits"
model = "mlp"
epochs = 2
train_size = 200
validation_size = 100
batch_size = 64

[methods.base]

[methods.{method}]
rho = [0.05, 0.1]
{sharpness}
[output]
database = "shared.db"
report = "{method}-report"
"""


def test_studies_sharing_a_database_train_shared_runs_once_and_report_their_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two studies with one training block and one database: the second trains only what the
    first did not (the base optimizer is shared), each report shows its own runs, and only the
    study with a [sharpness] table measures, and only its own runs."""
    sam = _write(
        tmp_path / "sam.toml",
        SHARED.format(method="sam", sharpness="\n[sharpness]\nexamples = 64\nnum_probes = 2\n"),
    )
    asam = _write(tmp_path / "asam.toml", SHARED.format(method="asam", sharpness=""))
    assert main(["compare", "--study", str(asam), "--quiet", "--jobs", "1"]) == 0
    assert main(["compare", "--study", str(sam), "--quiet", "--jobs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "6 run(s): 4 trained, 2 already in" in printed
    assert "6 run(s): 6 measured, 0 already measured" in printed

    with Store(tmp_path / "shared.db", create=False) as store:
        methods = {run.config_hash: run.config["method"] for run in store.runs()}
        measured = set(store.sharpness(asdict(SharpnessSettings(examples=64, num_probes=2))))
    assert sorted(methods.values()).count("base") == 2 and len(methods) == 10
    sam_hashes = {config.config_hash for config in load_study(sam).configs()}
    assert measured == sam_hashes

    for study, own, other in ((sam, "sam", "asam"), (asam, "asam", "sam")):
        assert main(["report", "--study", str(study)]) == 0
        markdown = (tmp_path / f"{own}-report" / "report.md").read_text()
        assert "6 finished runs (of the 6 runs asked for)" in markdown
        rerun = f"`flatminima compare --study {study}`"
        assert f"Rerun (trains what is missing, then writes this report): {rerun}." in markdown
        assert f"| {own} ρ=0.05 " in markdown and f"| {other} ρ=0.05 " not in markdown
    # Without --study, the report is the whole database's.
    assert (
        main(["report", "--db", str(tmp_path / "shared.db"), "--out", str(tmp_path / "all")]) == 0
    )
    whole = (tmp_path / "all" / "report.md").read_text()
    assert "10 finished runs," in whole and "| asam ρ=0.05 " in whole and "| sam ρ=0.05 " in whole
    capsys.readouterr()
