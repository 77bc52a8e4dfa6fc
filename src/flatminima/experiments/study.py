"""Studies as files: a comparison grid written down in TOML, to read, version and rerun.

A study names the data and training settings, the methods with their hyperparameters (a list
is a sweep), the seeds and how the report chooses each method's hyperparameters; it expands
through the same grid as the command line (:func:`~flatminima.experiments.grid.expand_grid`),
so it trains exactly the runs of the equivalent ``flatminima compare`` command::

    seeds = "0-4"                 # or [0, 1, 2, 3, 4]
    select_by = "validation"      # optional

    [training]
    dataset = "digits"
    model = "mlp"
    epochs = 60
    label_noise = 0.2
    validation_size = 300

    [methods.base]

    [methods.sam]
    rho = [0.02, 0.05, 0.1, 0.2]  # swept

    [output]                      # optional; relative to this file's directory
    database = "runs.db"
    report = "report"

``[training]`` takes the keys of ``compare``'s data and training options, ``dataset``,
``model`` and ``epochs`` required, the others at the command line's defaults. A bad file is
one error line naming the file, the line and the key.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from flatminima.experiments.config import (
    ConfigError,
    RunConfig,
    make_run_config,
    resolve_hyperparameters,
)
from flatminima.experiments.grid import Assignment, expand_grid, parse_seeds
from flatminima.experiments.sharpness_runs import SharpnessSettings
from flatminima.experiments.summary import SELECTION_RULES
from flatminima.registry import canonical_method_name, get_method

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 reads TOML with the tomli backport
    import tomli as tomllib

TRAINING_TYPES: dict[str, tuple[type, ...]] = {
    "dataset": (str,),
    "model": (str,),
    "optimizer": (str,),
    "lr": (int, float),
    "momentum": (int, float),
    "weight_decay": (int, float),
    "schedule": (str,),
    "epochs": (int,),
    "batch_size": (int,),
    "label_noise": (int, float),
    "train_size": (int,),
    "validation_size": (int,),
    "track_sharpness": (int,),
    "processes": (int,),
}
"""The keys of ``[training]`` (``make_run_config``'s arguments) and the TOML types they take."""

REQUIRED_TRAINING = ("dataset", "model", "epochs")
TOP_LEVEL = ("seeds", "select_by", "training", "methods", "sharpness", "output")
OUTPUT_KEYS = ("database", "report")

ERROR_PHRASES = {"lr": "learning rate"}
"""How ``make_run_config``'s messages name a training key, where not by its own words."""

PACKAGED = "studies"
"""The directory of the package holding the shipped studies (``demo.toml``...)."""


@dataclass(frozen=True)
class Study:
    """A parsed, validated study."""

    name: str
    """Where it was read from (the file's path as given), for messages."""
    seeds: list[int]
    methods: dict[str, dict[str, Any]]
    """Method → hyperparameter → its value, or the list of values swept; in the file's order."""
    training: dict[str, Any]
    """``make_run_config``'s data and training arguments (absent keys at their defaults)."""
    select_by: str | None = None
    database: Path | None = None
    """Where the study's runs go by default (``[output] database``, resolved against the
    study file's directory); ``None``: the command's own default."""
    report: Path | None = None
    sharpness: SharpnessSettings | None = None
    """How to measure the sharpness of the study's trained models (``[sharpness]``, the
    ``sharpness`` command's settings); ``None``: not measured."""
    lines: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    @property
    def fixed(self) -> list[Assignment]:
        """The hyperparameters given one value, as ``--param METHOD:NAME=VALUE``."""
        return [
            Assignment(method, name, (_as_text(value),))
            for method, values in self.methods.items()
            for name, value in values.items()
            if not isinstance(value, list)
        ]

    @property
    def sweeps(self) -> list[Assignment]:
        """The hyperparameters given a list, as ``--sweep METHOD:NAME=V1,V2``."""
        return [
            Assignment(method, name, tuple(_as_text(item) for item in value))
            for method, values in self.methods.items()
            for name, value in values.items()
            if isinstance(value, list)
        ]

    def configs(self) -> list[RunConfig]:
        """Every run of the study, as ``flatminima compare`` would plan it."""
        return expand_grid(list(self.methods), self.seeds, self.fixed, self.sweeps, self.training)

    @property
    def config_hashes(self) -> frozenset[str]:
        """The configuration hashes of the study's runs: what its report and verdicts read in a
        database other studies may share."""
        return frozenset(config.config_hash for config in self.configs())

    def with_budget(self, *, seeds: list[int] | None = None, epochs: int | None = None) -> Study:
        """The study with other seeds or another number of epochs (the demo's options)."""
        training = self.training if epochs is None else {**self.training, "epochs": epochs}
        return replace(self, seeds=self.seeds if seeds is None else seeds, training=training)


def _as_text(value: Any) -> str:
    """A TOML value as the command line writes it (``repr`` round-trips every float)."""
    return repr(value) if isinstance(value, float) else str(value)


# --- where a key is written ------------------------------------------------------------------

_TABLE = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
_PART = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
_KEY = re.compile(rf"^\s*({_PART}(?:\s*\.\s*{_PART})*)\s*=")


def _dotted(text: str) -> list[str]:
    parts = re.findall(_PART, text)
    return [part.strip("\"'") for part in parts]


def key_lines(text: str) -> dict[str, int]:
    """The line (from 1) where each table and key of a TOML document is first written, by its
    dotted path (``methods.sam.rho``). Line-based: a key inside an inline table or a multi-line
    value is found through the key that opens it (see :func:`line_of`)."""
    lines: dict[str, int] = {}
    table: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        header = _TABLE.match(line)
        if header:
            table = _dotted(header.group(1))
            lines.setdefault(".".join(table), number)
            continue
        key = _KEY.match(line)
        if key:
            lines.setdefault(".".join([*table, *_dotted(key.group(1))]), number)
    return lines


def line_of(lines: Mapping[str, int], path: str) -> int | None:
    """The line of ``path``, or of the nearest enclosing key or table that is written."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        found = lines.get(".".join(parts[:end]))
        if found is not None:
            return found
    return None


class _Reader:
    """Checks a parsed document key by key; every error names the file, line and key."""

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.lines = key_lines(text)

    def error(self, path: str, message: str) -> ConfigError:
        line = line_of(self.lines, path)
        where = f"{self.name}:{line}" if line is not None else self.name
        return ConfigError(f"{where}: {path}: {message}")

    def table(self, document: Mapping[str, Any], path: str) -> dict[str, Any]:
        value = document.get(path.rsplit(".", 1)[-1], {})
        if not isinstance(value, dict):
            raise self.error(path, f"must be a table ([{path}]), got {_kind(value)}")
        return value

    def known(self, table: Mapping[str, Any], path: str, accepted: tuple[str, ...]) -> None:
        for key in table:
            if key not in accepted:
                where = f"{path}.{key}" if path else key
                raise self.error(where, f"unknown key; accepted: {', '.join(accepted)}")


def _kind(value: Any) -> str:
    names = {bool: "a boolean", str: "a string", int: "an integer", float: "a number"}
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return names.get(type(value), type(value).__name__)


def _is(value: Any, types: tuple[type, ...]) -> bool:
    """``isinstance``, except that a boolean is not a number here (TOML's ``true`` is no 1)."""
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def _type_words(types: tuple[type, ...]) -> str:
    if types == (str,):
        return "a string"
    if types == (int,):
        return "an integer"
    if types == (bool,):
        return "true or false"
    return "a number"


# --- reading ---------------------------------------------------------------------------------


def parse_study(text: str, name: str = "<study>", directory: Path | None = None) -> Study:
    """The study written in ``text`` (its output paths resolved against ``directory``);
    :class:`ConfigError` names the first problem: ``NAME:LINE: KEY: what is wrong``."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{name}: not valid TOML: {error}") from None
    reader = _Reader(name, text)
    reader.known(document, "", TOP_LEVEL)
    training = _read_training(reader, reader.table(document, "training"))
    seeds = _read_seeds(reader, document)
    select_by = document.get("select_by")
    if select_by is not None and select_by not in SELECTION_RULES:
        raise reader.error(
            "select_by", f"takes {', '.join(map(repr, SELECTION_RULES))}, got {select_by!r}"
        )
    if select_by == "validation" and not training.get("validation_size"):
        raise reader.error(
            "select_by",
            "'validation' chooses on a validation split: set training.validation_size above 0",
        )
    methods = _read_methods(reader, reader.table(document, "methods"), training)
    output = reader.table(document, "output")
    reader.known(output, "output", OUTPUT_KEYS)
    paths: dict[str, Path | None] = {}
    for key in OUTPUT_KEYS:
        value = output.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise reader.error(f"output.{key}", f"must be a path (a string), got {value!r}")
        paths[key] = None if value is None else (directory or Path()) / value
    sharpness = _read_sharpness(reader, document)
    study = Study(
        name,
        seeds,
        methods,
        training,
        select_by,
        paths["database"],
        paths["report"],
        sharpness,
        reader.lines,
    )
    try:
        study.configs()  # the whole grid, as `compare` checks it (its size, every combination)
    except ConfigError as error:
        raise ConfigError(f"{name}: {error}") from None
    return study


def _read_sharpness(reader: _Reader, document: Mapping[str, Any]) -> SharpnessSettings | None:
    """``[sharpness]``: the measurement's settings, each of the type of its default; an empty
    table measures at the defaults, no table not at all."""
    if "sharpness" not in document:
        return None
    table = reader.table(document, "sharpness")
    defaults = {item.name: item.default for item in fields(SharpnessSettings)}
    reader.known(table, "sharpness", tuple(defaults))
    for key, value in table.items():
        types: tuple[type, ...] = (int,) if isinstance(defaults[key], int) else (int, float)
        if not _is(value, types):
            raise reader.error(
                f"sharpness.{key}", f"takes {_type_words(types)}, got {_kind(value)} ({value!r})"
            )
    settings = SharpnessSettings(**table)
    try:
        settings.check()
    except ConfigError as error:
        key = next((key for key in table if str(error).startswith(key)), "")
        raise reader.error(f"sharpness.{key}" if key else "sharpness", str(error)) from None
    return settings


def _read_training(reader: _Reader, table: Mapping[str, Any]) -> dict[str, Any]:
    reader.known(table, "training", tuple(TRAINING_TYPES))
    for key in REQUIRED_TRAINING:
        if key not in table:
            raise reader.error("training", f"training.{key} is required")
    for key, value in table.items():
        if not _is(value, TRAINING_TYPES[key]):
            raise reader.error(
                f"training.{key}",
                f"takes {_type_words(TRAINING_TYPES[key])}, got {_kind(value)} ({value!r})",
            )
    training = dict(table)
    try:
        make_run_config(method="base", **training)
    except ConfigError as error:
        key = _named_key(str(error), training)
        raise reader.error(f"training.{key}" if key else "training", str(error)) from None
    return training


def _named_key(message: str, training: Mapping[str, Any]) -> str:
    """The training key a ``make_run_config`` message is about (its words open the message);
    the table itself when none is recognised."""
    for key in training:
        words = ERROR_PHRASES.get(key, key.replace("_", " "))
        if message.startswith((words, f"unknown {words}")):
            return key
    return ""


def _read_seeds(reader: _Reader, document: Mapping[str, Any]) -> list[int]:
    if "seeds" not in document:
        raise reader.error("seeds", "is required: a list such as [0, 1, 2] or a range '0-4'")
    value = document["seeds"]
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list) and value and all(_is(seed, (int,)) for seed in value):
        if len(set(value)) != len(value):
            raise reader.error("seeds", f"lists a seed twice: {value}")
        texts = [",".join(str(seed) for seed in value)]
    else:
        raise reader.error(
            "seeds", f"takes a non-empty list of integers or a range such as '0-4', got {value!r}"
        )
    try:
        return parse_seeds(texts)
    except ConfigError as error:
        raise reader.error("seeds", str(error).replace("--seeds ", "")) from None


def _read_methods(
    reader: _Reader, table: Mapping[str, Any], training: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    if not table:
        raise reader.error(
            "methods", "at least one method is required, e.g. [methods.sam] with rho = 0.1"
        )
    methods: dict[str, dict[str, Any]] = {}
    for method, values in table.items():
        path = f"methods.{method}"
        try:
            spec = get_method(method)
        except ValueError as error:
            raise reader.error(path, str(error)) from None
        if canonical_method_name(method) in methods:
            raise reader.error(path, f"{method} is listed twice (under another name)")
        if not isinstance(values, dict):
            raise reader.error(path, f"must be a table of hyperparameters, got {_kind(values)}")
        reader.known(values, path, tuple(spec.hyperparameters))
        for name, value in values.items():
            default = spec.hyperparameters[name]
            for item in value if isinstance(value, list) else [value]:
                _check_hyperparameter(
                    reader, f"{path}.{name}", method, name, default, item, training
                )
            if isinstance(value, list):
                if not value:
                    raise reader.error(f"{path}.{name}", "an empty list sweeps nothing")
                if len({_as_text(item) for item in value}) != len(value):
                    raise reader.error(f"{path}.{name}", f"lists a value twice: {value}")
        methods[canonical_method_name(method)] = dict(values)
    return methods


def _check_hyperparameter(
    reader: _Reader,
    path: str,
    method: str,
    name: str,
    default: Any,
    value: Any,
    training: Mapping[str, Any],
) -> None:
    """One value: the type of the method's default (a number for a number, true or false for
    a flag), then accepted by the method itself."""
    if isinstance(default, bool):
        types: tuple[type, ...] = (bool,)
    elif isinstance(default, (int, float)):
        types = (int, float)
    elif isinstance(default, str):
        types = (str,)
    else:
        types = (bool, int, float, str)
    if not _is(value, types):
        raise reader.error(path, f"takes {_type_words(types)}, got {_kind(value)} ({value!r})")
    optimizer = training.get("optimizer", "sgd")
    momentum = training.get("momentum", None if optimizer == "adamw" else 0.9)
    try:
        resolve_hyperparameters(method, {name: value}, optimizer=optimizer, momentum=momentum)
    except ConfigError as error:
        raise reader.error(path, str(error)) from None


def load_study(path: str | Path) -> Study:
    """The study in the file at ``path``; its ``[output]`` paths are relative to the file's
    directory (so a study runs the same from any working directory)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--study {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"--study {path}: cannot be read ({error})") from None
    return parse_study(text, str(path), path.parent)


def packaged_study(file_name: str) -> Study:
    """A study shipped inside the package (``flatminima/studies/``), e.g. the demo's. It has
    no ``[output]``: the command that runs it decides where its runs go."""
    text = (resources.files("flatminima") / PACKAGED / file_name).read_text(encoding="utf-8")
    return parse_study(text, f"flatminima/{PACKAGED}/{file_name}")
