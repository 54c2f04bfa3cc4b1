"""What a sweep was asked (``SweepOptions``), where it came from (``Provenance``), and
the run's record: ``sweep.json``, ``space.yaml`` and ``dataset.json``."""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata

from covid_tune.core.space import SearchSpace
from covid_tune.core.space_file import dump_space, load_space, parse_space_text
from covid_tune.errors import UserError
from covid_tune.runs.checkpoint import bytes_digest
from covid_tune.runs.folder import DATASET_FILE, END_FILE, SPACE_FILE, SWEEP_FILE, RunFolder, brief
from covid_tune.runs.storage import join, remove, write_bytes

RECORD_FORMAT = "covid-tune run 2"
"""``sweep.json``'s ``format``; runs of an older format are refused with a message."""
VERSIONED = ("covid-tune", "torch", "torchvision", "ray", "optuna")


# what a sweep was asked, and where it came from ----------------------------------

def at_least(least: float, inclusive: bool = True) -> dict:
    """Field metadata of a numeric option: its least value (``inclusive=False``: it must
    be more than that). ``covid-tune`` refuses a flag below it, naming the flag."""
    return {"least": least, "inclusive": inclusive}


@dataclass(frozen=True)
class SweepOptions:
    """What ``covid-tune sweep`` was asked to do.

    Each field is a flag of ``covid-tune sweep`` (``--num-samples`` for ``num_samples``;
    ``metadata["flag"]`` where it is named otherwise), with the field's type, default,
    least value (``at_least``) and, as its help, the docstring under the field."""

    space_file: str = field(metadata={"flag": "--space"})
    """The search-space YAML file, or a shipped space (binary, multilabel, demo), as
    given (the run keeps its own copy, ``space.yaml``)."""
    data: str
    """The dataset folder, or a CSV manifest (path,labels[,split]), as given (the run
    records its absolute path too)."""
    name: str = ""
    """The run's folder name under ``storage_path`` (default ``<task>-<time>``)."""
    storage_path: str = "runs"
    """A folder or an ``s3://`` / ``gs://`` URI holding run folders."""
    num_samples: int | None = field(default=None, metadata=at_least(1))
    """Trials to run; overrides the space's ``num_samples``."""
    max_epochs: int | None = field(default=None, metadata=at_least(1))
    """Overrides the space's ``max_epochs``."""
    image_size: int | None = field(default=None, metadata=at_least(32))
    """Overrides the space's ``image_size``."""
    pretrained: str | None = None
    """Overrides the space's ``pretrained``: imagenet, none, or a local state-dict file."""
    max_concurrent: int | None = field(default=None, metadata=at_least(1))
    """Most trials at once (default: as many as the cluster fits)."""
    address: str | None = None
    """The Ray cluster to join (``auto``, ``HOST:PORT``); none starts Ray on this machine."""
    cpus_per_trial: float = field(default=1.0, metadata=at_least(0, inclusive=False))
    """CPUs Ray reserves for each trial (also its torch threads)."""
    gpus_per_trial: float = field(default=0.0, metadata=at_least(0))
    """GPUs per trial; a fraction packs several trials on one GPU (0.25: four)."""
    seed: int = field(default=0, metadata=at_least(0))
    """Seeds TPE and the draw of a ``selection`` split."""
    max_failures: int = field(default=2, metadata=at_least(-1))
    """Retries of a crashed trial from its last checkpoint (-1: no limit)."""
    keep_checkpoints: int = field(default=1, metadata=at_least(1))
    """Checkpoints Ray keeps per running trial, the best by the sweep's metric, besides
    its newest (a finished trial keeps its best only: ``sweep.CheckpointTrim``)."""
    strict: bool = False
    """Unreadable images are fatal instead of skipped."""
    shared_storage: bool = False
    """Skip the check that every node sees a local ``storage_path``."""
    verbose: bool = False
    """Ray Tune's own per-trial tables instead of covid-tune's one status line."""
    mlflow: str | None = None
    """An MLflow tracking server (http://HOST:PORT) or store: the sweep is logged there,
    one parent run with a nested run per trial; overrides the space's
    mlflow.tracking_uri."""
    time_budget: str | None = None
    """End the sweep when this much time has passed (90m, 2h, 1h30m), as Ctrl-C does:
    every trial keeps its last checkpoint, and resume goes on."""
    warm_start: list[str] = field(default_factory=list, metadata={"nargs": "+"})
    """Earlier runs of the same task and metric whose finished trials TPE starts from
    (their parameters outside this space are left out)."""

    def space(self) -> SearchSpace:
        """The space file with this sweep's overrides applied."""
        return load_space(self.space_file).with_overrides(
            max_epochs=self.max_epochs, image_size=self.image_size,
            pretrained=self.pretrained, num_samples=self.num_samples)

    def run_dir(self) -> str:
        return join(self.storage_path, self.name)


@dataclass(frozen=True)
class Provenance:
    """Where a run came from, recorded when it starts."""

    data: str
    """Absolute path of the dataset folder."""
    data_fingerprint: str
    """Hash of the dataset's relative paths and sizes (``dataset.json`` lists them)."""
    data_files: int
    """Images in the dataset."""
    command: list[str]
    """The command line that started the run."""
    versions: dict[str, str]
    """covid-tune, torch, torchvision, Ray and Optuna versions of the driver."""
    started: str
    """UTC time the run started, ISO 8601."""
    host: str
    """The driver's host name."""
    python: str = field(default_factory=platform.python_version)


@dataclass(frozen=True)
class SweepRecord:
    """``sweep.json``."""

    options: SweepOptions
    provenance: Provenance
    files: dict[str, dict] = field(default_factory=dict)
    """Size and SHA-256 of the run's own files (``space.yaml``), checked when read."""


def manifest_fingerprint(files: dict[str, int]) -> str:
    """A hash of relative paths and sizes: a moved copy of a dataset still matches."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]}\n".encode())
    return digest.hexdigest()


def versions() -> dict[str, str]:
    """Installed versions of what shapes a run, read without importing the packages."""
    found = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def write_record(opts: SweepOptions, space: SearchSpace, data_root: str,
                 files: dict[str, int], selection: list[str] = (),
                 splits: dict[str, str] | None = None,
                 grouping: dict | None = None) -> SweepRecord:
    """Write ``space.yaml``, ``dataset.json`` (with the names held out of Train as the
    selection split, if any, the split of each image of a collection split here,
    ``data.assignment``, and how the drawn splits grouped images by patient,
    ``Grouping.record``) and, last, ``sweep.json`` (whose presence marks the folder as
    a run); UserError if the storage refuses them."""
    run_dir = opts.run_dir()
    provenance = Provenance(
        data=data_root, data_fingerprint=manifest_fingerprint(files), data_files=len(files),
        command=list(sys.argv), versions=versions(),
        started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), host=platform.node())
    header = f"The resolved search space of run {opts.name} (from {opts.space_file})."
    space_text = dump_space(space, header).encode()
    record = SweepRecord(opts, provenance, {SPACE_FILE: bytes_digest(space_text)})
    contents = {
        SPACE_FILE: space_text,
        DATASET_FILE: json.dumps({"root": data_root, "fingerprint": provenance.data_fingerprint,
                                  "files": files, "selection": list(selection),
                                  "splits": splits or {}, "grouping": grouping or {}},
                                 indent=0).encode(),
        SWEEP_FILE: json.dumps({"format": RECORD_FORMAT, "options": asdict(opts),
                                "provenance": asdict(provenance), "files": record.files},
                               indent=1).encode(),
    }
    written: list[str] = []
    for name, data in contents.items():
        path = join(run_dir, name)
        try:
            write_bytes(path, data)
        except OSError as exc:
            for done in written:  # a run is all of its record or none of it
                remove(done)
            raise UserError(f"{path}: cannot write it ({getattr(exc, 'strerror', None) or exc}); "
                            f"nothing of the run was kept; free space (or fix the storage) "
                            f"and run the sweep again") from None
        written.append(path)
    return record


def read_record(run_dir: str | RunFolder) -> SweepRecord:
    """``sweep.json`` of a run folder (local or URI); UserError naming what is wrong."""
    run = RunFolder(run_dir)
    path = run.where(SWEEP_FILE)
    if not run.exists(SWEEP_FILE):
        raise UserError(f"{run.where()}: not a covid-tune run (no {SWEEP_FILE}); pass the "
                        f"run folder `covid-tune sweep` printed")
    raw = run.read_json(SWEEP_FILE, what="the run's record cannot be recovered; start the "
                                         "sweep again")
    if not isinstance(raw, dict) or raw.get("format") != RECORD_FORMAT:
        found = raw.get("format", "none") if isinstance(raw, dict) else type(raw).__name__
        raise UserError(f"{path}: not a run record this version reads (format {found!r}, "
                        f"expected {RECORD_FORMAT!r}); start the sweep again with this "
                        f"version of covid-tune")
    files = raw.get("files", {})
    try:
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            raise TypeError("files should map names to sizes and digests")
        return SweepRecord(_build(SweepOptions, raw["options"]),
                           _build(Provenance, raw["provenance"]), files)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: damaged run record ({brief(exc)}); start the sweep "
                        f"again") from None


def _build(cls, raw: dict):
    """A dataclass from a JSON object, refusing unknown or mistyped fields."""
    if not isinstance(raw, dict):
        raise TypeError(f"{cls.__name__} is not an object")
    names = {f.name for f in fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise TypeError(f"unknown {cls.__name__} keys {sorted(unknown)}")
    value = cls(**raw)
    for f in fields(cls):
        wanted = {"str": str, "int": int, "float": (int, float), "bool": bool,
                  "list[str]": list, "dict[str, str]": dict}.get(str(f.type))
        if wanted is not None and not isinstance(getattr(value, f.name), wanted):
            raise TypeError(f"{f.name} should be {f.type}")
    return value


def read_space(run_dir: str | RunFolder, record: SweepRecord) -> SearchSpace:
    """The run's own resolved search space, never the original YAML file; refused if it
    differs from the size and SHA-256 ``sweep.json`` recorded (a YAML file cut short
    at a line end may still parse, to another space)."""
    run = RunFolder(run_dir)
    path = run.where(SPACE_FILE)
    if not run.exists(SPACE_FILE):
        raise UserError(f"{path}: missing; this run's search space is gone, so its "
                        f"results cannot be read; start the sweep again")
    try:
        data = run.read_bytes(SPACE_FILE)
        text = data.decode()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the file ({brief(exc)})") from None
    expected = record.files.get(SPACE_FILE)
    if expected is not None and expected != bytes_digest(data):
        raise UserError(f"{path}: cut short or altered (its size or SHA-256 differs from "
                        f"{SWEEP_FILE}); this run's search space is lost, so its results "
                        f"cannot be read; start the sweep again")
    return parse_space_text(text, path)


def read_manifest(run_dir: str | RunFolder) -> dict[str, int]:
    """``dataset.json``'s files: relative path -> bytes."""
    run = RunFolder(run_dir)
    path = run.where(DATASET_FILE)
    raw = run.read_json(DATASET_FILE, what="the run's dataset cannot be checked; pass "
                                           "--allow-changed-data to use a dataset folder "
                                           "unchecked")
    files = raw.get("files") if isinstance(raw, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, int) for v in files.values()):
        raise UserError(f"{path}: damaged (no files mapping of path -> bytes); pass "
                        f"--allow-changed-data to use a dataset folder unchecked")
    return files


def read_splits(run_dir: str | RunFolder) -> dict[str, str]:
    """The split of each image of a collection the run split itself (``dataset.json``);
    empty when the dataset has split folders, or the record cannot be read (the
    manifest check then says so)."""
    return _dataset_mapping(run_dir, "splits")


def read_grouping(run_dir: str | RunFolder) -> dict:
    """How the run's drawn splits grouped images by patient (``dataset.json``,
    ``covid_tune.data.groups.Grouping.record``); empty when it drew none, or the record
    cannot be read."""
    return _dataset_mapping(run_dir, "grouping")


def _dataset_mapping(run_dir: str | RunFolder, key: str) -> dict:
    """``dataset.json``'s mapping under ``key``; empty when absent or unreadable."""
    try:
        raw = json.loads(RunFolder(run_dir).read_bytes(DATASET_FILE))
    except (OSError, ValueError):
        return {}
    found = raw.get(key) if isinstance(raw, dict) else None
    return found if isinstance(found, dict) else {}


def read_selection(run_dir: str | RunFolder, space: SearchSpace) -> list[str]:
    """The Train images the run held out as its selection split (``dataset.json``);
    empty when the space holds none out."""
    if not space.selection.holdout:
        return []
    run = RunFolder(run_dir)
    path = run.where(DATASET_FILE)
    raw = run.read_json(DATASET_FILE, what="the run's selection split is recorded there and "
                                           "cannot be rebuilt without it; start the sweep "
                                           "again")
    names = raw.get("selection") if isinstance(raw, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise UserError(f"{path}: damaged (no list of the images held out for selection); "
                        f"the run's selection split cannot be rebuilt; start the sweep again")
    return names


def write_num_samples(run_dir: str | RunFolder, num_samples: int) -> None:
    """Record a new trial budget in ``sweep.json`` (``resume --num-samples``): the one
    file, rewritten whole; its other fields as they were."""
    run = RunFolder(run_dir)
    raw = run.read_json(SWEEP_FILE, what="the run's record cannot be recovered")
    raw["options"]["num_samples"] = num_samples
    try:
        run.write_bytes(SWEEP_FILE, data=json.dumps(raw, indent=1).encode())
    except OSError as exc:
        raise UserError(f"{run.where(SWEEP_FILE)}: cannot record the new budget "
                        f"({brief(exc)}); nothing was changed") from None


# why the sweep ended --------------------------------------------------------------

END_KINDS = ("finished", "goal", "converged", "time budget", "stopped")
"""How a sweep's driver ends: every trial run, ``stop.at`` reached, ``stop.converged``,
``--time-budget`` spent (resume goes on), a signal (resume goes on)."""


@dataclass(frozen=True)
class SweepEnd:
    """``end.json``: why the sweep's last driver ended."""

    kind: str
    """One of ``END_KINDS``."""
    reason: str
    """What happened, in a sentence the summary and the leaderboard show."""
    time: str = ""
    """UTC time, ISO 8601."""

    @property
    def resumable(self) -> bool:
        return self.kind in ("time budget", "stopped")


def write_end(run_dir: str | RunFolder, kind: str, reason: str) -> SweepEnd:
    """Record why the sweep ended (one whole file); a storage error is one note."""
    end = SweepEnd(kind, reason, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    try:
        RunFolder(run_dir).write_bytes(END_FILE, data=json.dumps(asdict(end), indent=1).encode())
    except OSError as exc:
        print(f"note: could not record why the sweep ended ({brief(exc)})", flush=True)
    return end


def read_end(run_dir: str | RunFolder) -> SweepEnd | None:
    """Why the sweep ended, or None (running, written before 0.5, or unreadable)."""
    try:
        raw = json.loads(RunFolder(run_dir).read_bytes(END_FILE))
        return SweepEnd(str(raw["kind"]), str(raw["reason"]), str(raw.get("time", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clear_end(run_dir: str | RunFolder) -> None:
    """A resumed sweep goes on: its last end no longer holds."""
    run = RunFolder(run_dir)
    if run.exists(END_FILE):
        run.fs.delete_file(run.path(END_FILE))
