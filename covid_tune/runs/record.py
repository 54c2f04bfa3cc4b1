"""The run folder: one home for its file names, its formats, their writers and readers.

A run folder, ``<storage-path>/<name>/``, is Ray Tune's own layout plus covid-tune's
record of the run::

    sweep.json      what was asked (SweepOptions), where it came from (Provenance),
                    and the size and SHA-256 of space.yaml
    space.yaml      the resolved search space, overrides applied (load_space reads it)
    dataset.json    the dataset's manifest: relative path -> bytes of every image
    optuna.db       the Optuna study as SQLite (written by covid_tune.search.searcher)
    sweep.lock      held by the sweep or resume running now (covid_tune.runs.lock)
    experiment_state-*.json, searcher-state-*.pkl   Ray Tune's snapshot (for resume)
    lost_trials/    trials a killed driver's last snapshot did not list (set aside)
    trial_<id>/     result.json, progress.csv, events.out.tfevents.*, diverged.txt,
                    checkpoint_<n>/ (checkpoint.pt: the weights not in the base, epoch;
                                     optimizer.pt: optimizer state, only in a running
                                     trial's newest checkpoint;
                                     recipe.json: resolved config, labels, metrics,
                                     the base, size and SHA-256 of the files)

A finished trial keeps one checkpoint, its best epoch, weights only (``keep_best``); a
running one also its newest, the only one with ``optimizer.pt`` (``drop_resume_state``).
A checkpoint does not store the tensors that are still as the trial started them from
its *base*: the pretrained file (recorded by its SHA-256) or, with ``pretrained: none``,
the trial's seeded initialisation (recorded by the seed and the SHA-256 of those
tensors). A reader rebuilds them (``covid_tune.nn.inference.load_model``) and refuses
clearly when the base is missing or differs.

The training side writes through ``write_record`` and ``save_checkpoint``; ``leaderboard``,
``export`` and ``resume`` read through ``read_record``, ``read_space``, ``read_run`` and
``load_checkpoint``. Nothing else parses these files. Every problem with them becomes a
``UserError`` naming the file, or a skip noted in the output. Importing this module
imports neither torch nor Ray.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path

from covid_tune.core.space import DataSpec, SearchSpace, dump_space, load_space, parse_space_text
from covid_tune.data.csv_manifest import is_manifest
from covid_tune.data.dataset import Layout, manifest, scan
from covid_tune.errors import UserError
from covid_tune.data.preprocess import logit
from covid_tune.runs.storage import exists, is_uri, join, list_files, read_bytes, remove, write_bytes

SWEEP_FILE = "sweep.json"
SPACE_FILE = "space.yaml"
DATASET_FILE = "dataset.json"
STUDY_FILE = "optuna.db"
LOCK_FILE = "sweep.lock"
LOST_DIR = "lost_trials"
"""Where ``resume`` moves the folders of trials the run's last snapshot did not list."""
RESULT_FILE = "result.json"
DIVERGED_FILE = "diverged.txt"
"""Written in a trial folder when the trial diverges: its retries then fail at once."""
CHECKPOINT_FILE = "checkpoint.pt"
OPTIMIZER_FILE = "optimizer.pt"
"""The optimizer state, needed only to go on training: a running trial's newest
checkpoint has it, every other checkpoint has it removed."""
RECIPE_FILE = "recipe.json"
RAY_STATE_GLOB = "experiment_state-*.json"
RECORD_FORMAT = "covid-tune run 2"
"""``sweep.json``'s ``format``; runs of an older format are refused with a message."""
VERSIONED = ("covid-tune", "torch", "torchvision", "ray", "optuna")


# --- what a sweep was asked, and where it came from ----------------------------------

@dataclass(frozen=True)
class SweepOptions:
    """What ``covid-tune sweep`` was asked to do."""

    space_file: str
    """The search-space YAML file as given (the run keeps its own copy, ``space.yaml``)."""
    data: str
    """The dataset folder as given (the run records its absolute path too)."""
    name: str = ""
    """The run's folder name under ``storage_path`` (default ``<task>-<time>``)."""
    storage_path: str = "runs"
    """A folder or an ``s3://`` / ``gs://`` URI holding run folders."""
    num_samples: int | None = None
    """Overrides the space's ``num_samples``."""
    max_epochs: int | None = None
    """Overrides the space's ``max_epochs``."""
    image_size: int | None = None
    """Overrides the space's ``image_size``."""
    pretrained: str | None = None
    """Overrides the space's ``pretrained``."""
    max_concurrent: int | None = None
    """Most trials at once (default: as many as the cluster fits)."""
    address: str | None = None
    """Ray cluster to join; ``None`` starts Ray on this machine."""
    cpus_per_trial: float = 1.0
    """CPUs Ray reserves for each trial (also its torch threads)."""
    gpus_per_trial: float = 0.0
    """GPUs per trial; a fraction packs several trials on one GPU."""
    seed: int = 0
    """Seeds TPE."""
    max_failures: int = 2
    """Retries of a crashed trial from its last checkpoint."""
    keep_checkpoints: int = 1
    """Checkpoints Ray keeps per running trial, the best by the sweep's metric, besides
    its newest (a finished trial keeps its best only: ``sweep.CheckpointTrim``)."""
    strict: bool = False
    """Unreadable images are fatal instead of skipped."""
    shared_storage: bool = False
    """Skip the check that every node sees a local ``storage_path``."""
    verbose: bool = False
    """Ray Tune's own per-trial tables instead of covid-tune's one status line."""

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
                 splits: dict[str, str] | None = None) -> SweepRecord:
    """Write ``space.yaml``, ``dataset.json`` (with the names held out of Train as the
    selection split, if any, and the split of each image of a collection split here,
    ``data.assignment``) and, last, ``sweep.json`` (whose presence marks the folder as
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
                                  "splits": splits or {}},
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


def _read_json(path: str, what: str) -> object:
    """A JSON file of the run; UserError naming it if it is missing or damaged."""
    if not exists(path):
        raise UserError(f"{path}: missing; {what}")
    try:
        return json.loads(read_bytes(path))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: damaged, not readable JSON ({_short(exc)}); {what}") from None


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]


def read_record(run_dir: str) -> SweepRecord:
    """``sweep.json`` of a run folder (local or URI); UserError naming what is wrong."""
    path = join(run_dir, SWEEP_FILE)
    if not exists(path):
        raise UserError(f"{run_dir}: not a covid-tune run (no {SWEEP_FILE}); pass the run "
                        f"folder `covid-tune sweep` printed")
    raw = _read_json(path, "the run's record cannot be recovered; start the sweep again")
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
        raise UserError(f"{path}: damaged run record ({_short(exc)}); start the sweep "
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


def read_space(run_dir: str, record: SweepRecord) -> SearchSpace:
    """The run's own resolved search space, never the original YAML file; refused if it
    differs from the size and SHA-256 ``sweep.json`` recorded (a YAML file cut short
    at a line end may still parse, to another space)."""
    path = join(run_dir, SPACE_FILE)
    if not exists(path):
        raise UserError(f"{path}: missing; this run's search space is gone, so its "
                        f"results cannot be read; start the sweep again")
    try:
        data = read_bytes(path)
        text = data.decode()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the file ({_short(exc)})") from None
    expected = record.files.get(SPACE_FILE)
    if expected is not None and expected != bytes_digest(data):
        raise UserError(f"{path}: cut short or altered (its size or SHA-256 differs from "
                        f"{SWEEP_FILE}); this run's search space is lost, so its results "
                        f"cannot be read; start the sweep again")
    return parse_space_text(text, path)


def read_manifest(run_dir: str) -> dict[str, int]:
    """``dataset.json``'s files: relative path -> bytes."""
    path = join(run_dir, DATASET_FILE)
    raw = _read_json(path, "the run's dataset cannot be checked; pass --allow-changed-data "
                           "to use a dataset folder unchecked")
    files = raw.get("files") if isinstance(raw, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, int) for v in files.values()):
        raise UserError(f"{path}: damaged (no files mapping of path -> bytes); pass "
                        f"--allow-changed-data to use a dataset folder unchecked")
    return files


def read_splits(run_dir: str) -> dict[str, str]:
    """The split of each image of a collection the run split itself (``dataset.json``);
    empty when the dataset has split folders, or the record cannot be read (the
    manifest check then says so)."""
    try:
        raw = json.loads(read_bytes(join(run_dir, DATASET_FILE)))
    except (OSError, ValueError):
        return {}
    splits = raw.get("splits") if isinstance(raw, dict) else None
    return splits if isinstance(splits, dict) else {}


def read_selection(run_dir: str, space: SearchSpace) -> list[str]:
    """The Train images the run held out as its selection split (``dataset.json``);
    empty when the space holds none out."""
    if not space.selection.holdout:
        return []
    path = join(run_dir, DATASET_FILE)
    raw = _read_json(path, "the run's selection split is recorded there and cannot be "
                           "rebuilt without it; start the sweep again")
    names = raw.get("selection") if isinstance(raw, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise UserError(f"{path}: damaged (no list of the images held out for selection); "
                        f"the run's selection split cannot be rebuilt; start the sweep again")
    return names


# --- which dataset folder a run's results are scored on ------------------------------

@dataclass(frozen=True)
class DataChoice:
    """The dataset folder a reader uses for a run, and what the output should say."""

    root: Path | None
    """``None`` when the dataset is nowhere to be found (scores stay as recorded)."""
    notes: tuple[str, ...] = ()
    layout: Layout | None = None
    """The scan of ``root`` the check was made on, for ``load_dataset`` to decode."""


def choose_data(run_dir: str, record: SweepRecord, task: str, data: str | None = None,
                allow_changed: bool = False, required: bool = False,
                spec: DataSpec | None = None) -> DataChoice:
    """The run's dataset: ``data`` (a moved copy) or the recorded folder, checked
    against the run's manifest. A different dataset is refused unless
    ``allow_changed``, in which case the difference is returned as a note."""
    root = Path(data).expanduser().resolve() if data else Path(record.provenance.data)
    if not (root.is_dir() or is_manifest(root)):
        if data:
            raise UserError(f"--data {data}: no such folder or CSV manifest")
        if required:
            raise UserError(f"{root}: the dataset this run was trained on is not there any "
                            f"more; pass --data DIR pointing at a copy of it")
        return DataChoice(None, (f"The dataset folder {root} was not found, so the scores "
                                 f"are the ones recorded during training (train with "
                                 f"augmentation) and test is not scored; pass --data DIR "
                                 f"to re-score on a copy.",))
    layout = scan(root, task, read_splits(run_dir), spec)
    current = manifest(layout)
    if manifest_fingerprint(current) == record.provenance.data_fingerprint:
        return DataChoice(root, (), layout)
    try:
        change = describe_change(read_manifest(run_dir), current)
    except UserError:
        if not allow_changed:
            raise
        change = f"{DATASET_FILE} cannot be read to count the difference"
    if not allow_changed:
        raise UserError(f"{root}: not the dataset run {record.options.name} was trained on "
                        f"({change}); point --data at the right copy, or pass "
                        f"--allow-changed-data to go on anyway")
    return DataChoice(root, (f"The dataset at {root} differs from the one the run was "
                             f"trained on ({change}); scored anyway (--allow-changed-data).",),
                      layout)


def describe_change(recorded: dict[str, int], current: dict[str, int]) -> str:
    """``3 files added, 1 removed, 2 changed`` between two manifests."""
    added = len(current.keys() - recorded.keys())
    removed = len(recorded.keys() - current.keys())
    changed = sum(1 for k in recorded.keys() & current.keys() if recorded[k] != current[k])
    return f"{added} file(s) added, {removed} removed, {changed} changed in size"


# --- checkpoints ----------------------------------------------------------------------

class DamagedCheckpoint(UserError):
    """A checkpoint folder whose files are missing, cut short or altered."""


def save_checkpoint(folder: Path, state: dict, recipe: dict,
                    optimizer: dict | None = None) -> None:
    """``state`` (tensors and plain values) as ``checkpoint.pt``, ``optimizer`` (its
    state dict) as ``optimizer.pt``, and ``recipe`` (epoch, config, label names,
    metrics, base) as ``recipe.json``, with the size and SHA-256 of each file, so a copy
    cut short is told from a whole one."""
    import torch

    torch.save(state, folder / CHECKPOINT_FILE)
    files = {CHECKPOINT_FILE: file_digest(folder / CHECKPOINT_FILE)}
    if optimizer is not None:
        torch.save(optimizer, folder / OPTIMIZER_FILE)
        files[OPTIMIZER_FILE] = file_digest(folder / OPTIMIZER_FILE)
    (folder / RECIPE_FILE).write_text(json.dumps({**recipe, "files": files}, indent=1))


OPTIONAL_FILES = (OPTIMIZER_FILE,)
"""Files a recipe lists that may since have been removed (``drop_resume_state``)."""


def bytes_digest(data: bytes) -> dict:
    """``{"bytes": size, "sha256": hex digest}`` of bytes about to be written."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def file_digest(path: Path) -> dict:
    """``{"bytes": size, "sha256": hex digest}`` of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


RECIPE_KEYS = {"epoch": int, "config": dict, "metrics": dict}


def parse_recipe(folder: Path) -> dict:
    """A checkpoint's ``recipe.json``, its shape checked, files not checked."""
    try:
        recipe = json.loads((folder / RECIPE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise DamagedCheckpoint(f"{folder}: no readable {RECIPE_FILE} ({_short(exc)})") from None
    if not isinstance(recipe, dict) or not all(
            isinstance(recipe.get(k), t) for k, t in RECIPE_KEYS.items()):
        raise DamagedCheckpoint(f"{folder}: {RECIPE_FILE} lacks its epoch, config or metrics")
    config = recipe["config"]
    if not all(isinstance(config.get(k), str) for k in ("task", "metric", "mode", "backbone")):
        raise DamagedCheckpoint(f"{folder}: {RECIPE_FILE} has no usable config")
    return recipe


def read_recipe(folder: str | Path) -> dict:
    """A checkpoint's recipe, after checking its files against it; DamagedCheckpoint if not."""
    folder = Path(folder)
    recipe = parse_recipe(folder)
    for name, expected in recipe.get("files", {}).items():
        path = folder / name
        if name in OPTIONAL_FILES and not path.exists():
            continue
        if not path.is_file() or file_digest(path) != expected:
            raise DamagedCheckpoint(f"{folder}: {name} is missing, cut short or altered "
                                    f"(its size or SHA-256 differs from {RECIPE_FILE}); "
                                    f"delete this folder to use the trial's other checkpoint")
    return recipe


def is_intact(folder: str | Path) -> bool:
    """Whether a checkpoint folder's files match its recipe (a copy cut short does not)."""
    try:
        read_recipe(folder)
    except DamagedCheckpoint:
        return False
    return True


def load_checkpoint(folder: str | Path) -> tuple[dict, dict]:
    """(state, recipe) of an intact checkpoint folder, read without unpickling code."""
    import pickle

    import torch

    folder = Path(folder)
    recipe = read_recipe(folder)
    try:
        state = torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise DamagedCheckpoint(f"{folder}: {CHECKPOINT_FILE} cannot be loaded as weights "
                                f"({_short(exc)})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise DamagedCheckpoint(f"{folder}: {CHECKPOINT_FILE} holds no model weights")
    return state, recipe


def load_optimizer(folder: str | Path) -> dict | None:
    """The optimizer state of a checkpoint that still has it (checked by
    ``load_checkpoint`` first), else None."""
    import torch

    path = Path(folder) / OPTIMIZER_FILE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


@functools.lru_cache(maxsize=16)
def _digest_of(path: str, size: int, mtime_ns: int) -> dict:
    return file_digest(Path(path))


def cached_digest(path: str | Path) -> dict:
    """``file_digest``, computed once per process for a file that has not changed (a
    pretrained file is hashed by every trial and every reader)."""
    info = Path(path).stat()
    return _digest_of(str(path), info.st_size, info.st_mtime_ns)


def base_file(base: dict, folder: str | Path, elsewhere: tuple[str, ...] = ()) -> str:
    """The pretrained file a checkpoint's base names, found at its recorded path or at
    one of ``elsewhere`` (this machine's ImageNet cache) and checked by its SHA-256;
    UserError naming it when it is missing or differs."""
    recorded = base.get("sha256")
    candidates = [p for p in (base.get("path"), *elsewhere) if p]
    present = [p for p in candidates if Path(p).is_file()]
    for path in present:
        if cached_digest(path)["sha256"] == recorded:
            return path
    where = present[0] if present else (candidates[0] if candidates else "?")
    problem = "differs from the file it was trained from" if present else "is not there"
    raise UserError(f"{folder}: its frozen layers are stored as a reference to the "
                    f"pretrained file {where} (SHA-256 {str(recorded)[:12]}…), which "
                    f"{problem}; put that file back (--pretrained {base.get('source')})")


# --- keeping a trial's checkpoints to what is needed (driver side, any storage) ---------

def checkpoint_folders(fs, trial_path: str) -> list[str]:
    """The ``checkpoint_*`` folders of a trial on ``fs`` (a pyarrow file system)."""
    import pyarrow.fs

    infos = fs.get_file_info(pyarrow.fs.FileSelector(trial_path, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pyarrow.fs.FileType.Directory
                  and i.base_name.startswith("checkpoint_"))


def drop_resume_state(fs, folder: str) -> None:
    """Remove a checkpoint's optimizer state (a newer checkpoint holds the trial's)."""
    import pyarrow.fs

    path = f"{folder}/{OPTIMIZER_FILE}"
    if fs.get_file_info(path).type == pyarrow.fs.FileType.File:
        fs.delete_file(path)


def keep_best(fs, trial_path: str, metric: str, mode: str) -> str | None:
    """A finished trial's checkpoints cut to its best epoch's (``best_recipe``, as
    ``read_trial`` chooses), weights only; folders whose recipe cannot be read are
    left alone. The folder kept, or None."""
    recipes = []
    for folder in checkpoint_folders(fs, trial_path):
        try:
            with fs.open_input_stream(f"{folder}/{RECIPE_FILE}") as stream:
                recipe = json.loads(stream.read())
            recipes.append((recipe, folder))
        except (OSError, ValueError):
            continue
    recipes = [(r, f) for r, f in recipes if isinstance(r, dict)
               and isinstance(r.get("metrics"), dict) and isinstance(r.get("epoch"), int)]
    if not recipes:
        return None
    _, best = best_recipe(recipes, metric, mode)
    for _, folder in recipes:
        if folder != best:
            fs.delete_dir(folder)
    drop_resume_state(fs, best)
    return best


# --- reading a whole run --------------------------------------------------------------

@dataclass
class TrialRecord:
    """One trial at its best kept checkpoint."""

    run: str
    """The run's name (its folder name)."""
    trial_id: str
    config: dict
    """The resolved ``TrialConfig`` as a dict (from the checkpoint's recipe)."""
    checkpoint: Path
    epoch: int
    metrics: dict
    """What the trial reported at that epoch (``train_*``, ``val_*``, timings)."""
    seconds: float | None
    """Wall time of the trial up to the end of that epoch (Ray's ``time_total_s``)."""
    hand_grid: bool = False
    """Whether the config is a ``start_with`` row of the run's space."""
    thresholds: dict[str, float] = field(default_factory=dict)
    """Label -> the decision threshold tuned at that epoch, as a probability, for people
    to read (empty: 0.5 for every label)."""
    threshold_logits: dict[str, float] = field(default_factory=dict)
    """The same thresholds as log-odds, exact: what the metrics apply (empty: 0, that is
    0.5, for every label)."""
    threshold_rule: dict = field(default_factory=dict)
    """How they were tuned: ``rule``, ``target``, ``split`` and the ``untuned`` labels
    (no positive or no negative on that split, so left at 0.5)."""

    @property
    def task(self) -> str:
        return self.config["task"]

    def score(self, metric: str) -> float:
        value = self.metrics.get(metric, math.nan)
        return float(value) if isinstance(value, (int, float)) else math.nan


@dataclass
class RunInfo:
    """What ``read_run`` found in one run folder."""

    path: Path
    name: str
    record: SweepRecord
    space: SearchSpace
    """The run's own resolved space (``space.yaml``)."""
    trials: list[TrialRecord]
    notes: list[str] = field(default_factory=list)
    """Things a reader of the output should know (damaged files, skipped trials)."""
    states: dict[str, str] = field(default_factory=dict)
    """Trial id -> Ray Tune's status (TERMINATED, ERROR, ...) from the run's last
    snapshot; empty when there is none to read."""
    selection: list[str] = field(default_factory=list)
    """The Train images held out as the selection split (empty: validation chose)."""

    def summary(self) -> str:
        """``12 trials, 2 failed`` (every trial Ray knows, not only the usable ones)."""
        total = len(self.states) or len(self.trials)
        failed = sum(status == "ERROR" for status in self.states.values())
        return f"{total} trials, {failed} failed" if self.states else f"{total} trials"

    @property
    def task(self) -> str:
        return self.space.task

    @property
    def metric(self) -> str:
        return self.space.metric

    @property
    def mode(self) -> str:
        return self.space.mode

    @property
    def study_path(self) -> Path:
        return self.path / STUDY_FILE


def read_run(run_dir: str | Path) -> RunInfo:
    """Every trial of a run at its best checkpoint; UserError if there is none."""
    if is_uri(str(run_dir)):
        raise UserError(f"{run_dir}: read a local copy of the run; download it first (for "
                        f"instance `aws s3 sync` or `gsutil rsync`) and pass that folder")
    path = Path(run_dir).expanduser().resolve()
    record = read_record(str(path))
    space = read_space(str(path), record)
    name = record.options.name or path.name
    trials, notes = [], []
    for folder in sorted(path.glob("trial_*")):
        record_, why = read_trial(folder, name, space)
        if record_ is None:
            notes.append(f"{folder.name}: {why}; left out")
            continue
        if why:
            notes.append(f"{folder.name}: {why}")
        record_.hand_grid = any(matches(record_.config, row) for row in space.start_with)
        trials.append(record_)
    if not trials:
        raise UserError(f"{path}: no trial of this run has a usable checkpoint yet; wait "
                        f"for the first epoch to end, or check the trials' error.txt files")
    states = trial_states(str(path))
    if not states:
        notes.append("Ray Tune's snapshot of the run (experiment_state-*.json) is missing or "
                     "cannot be read, so failed trials are not counted")
    return RunInfo(path, name, record, space, trials, notes, states,
                   read_selection(str(path), space))


def trial_states(run_dir: str) -> dict[str, str]:
    """Trial id -> status from Ray Tune's newest snapshot of the run (plain JSON); empty
    if there is none or it cannot be read (the leaderboard then counts what it finds)."""
    newest = newest_ray_state(run_dir)
    if newest is None:
        return {}
    try:
        snapshot = json.loads(read_bytes(newest))
        trials = [json.loads(entry[0]) for entry in snapshot["trial_data"]]
        return {str(t["trial_id"]): str(t["status"]) for t in trials}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return {}


def matches(config: dict, row: dict) -> bool:
    """Whether a trial config equals a ``start_with`` row on the keys the row gives."""
    for key, wanted in row.items():
        value = config.get(key)
        if isinstance(wanted, float) or isinstance(value, float):
            if not isinstance(value, (int, float)) or not math.isclose(value, wanted,
                                                                       rel_tol=1e-9):
                return False
        elif value != wanted:
            return False
    return True


def read_trial(folder: Path, run: str, space: SearchSpace) -> tuple[TrialRecord | None, str]:
    """A trial's best kept checkpoint by the run's metric, or ``None``; and what a
    reader should know (why none, or which checkpoints were passed over).

    Checkpoints whose recipe is damaged are passed over; their weights are checked
    only when a reader loads them (``load_checkpoint``)."""
    recipes, damaged = [], 0
    for checkpoint in sorted(p for p in folder.glob("checkpoint_*") if p.is_dir()):
        try:
            recipes.append((parse_recipe(checkpoint), checkpoint))
        except DamagedCheckpoint:
            damaged += 1
    if not recipes:
        return None, (f"{damaged} checkpoint(s), none with a readable {RECIPE_FILE}" if damaged
                      else "no checkpoint (the trial failed before its first epoch ended)")
    recipe, checkpoint = best_recipe(recipes, space.metric, space.mode)
    epoch = int(recipe["epoch"])
    passed_over = (f"{damaged} checkpoint(s) without a readable {RECIPE_FILE} passed over"
                   if damaged else "")
    thresholds, threshold_logits = _thresholds(recipe)
    return TrialRecord(run=run, trial_id=folder.name.removeprefix("trial_"),
                       config=recipe["config"], checkpoint=checkpoint, epoch=epoch,
                       metrics=recipe["metrics"], seconds=training_seconds(folder, epoch),
                       thresholds=thresholds, threshold_logits=threshold_logits,
                       threshold_rule=recipe.get("threshold_rule") or {}), passed_over


def _thresholds(recipe: dict) -> tuple[dict[str, float], dict[str, float]]:
    """A recipe's tuned thresholds as (probabilities, log-odds), label -> number; both
    empty when they are not usable.

    The log-odds are the recipe's ``threshold_logits`` when they name the same labels;
    a recipe written before they were recorded has the probabilities only, turned into
    log-odds here (0.5 is 0, 0.0 is -inf)."""
    probabilities = _numbers(recipe.get("thresholds"), 0.0, 1.0)
    logits = _numbers(recipe.get("threshold_logits"), -math.inf, math.inf)
    if not probabilities:
        return {}, {}
    if logits.keys() != probabilities.keys():
        logits = {label: float(logit(p)) for label, p in probabilities.items()}
    return probabilities, logits


def _numbers(raw, low: float, high: float) -> dict[str, float]:
    """``raw`` as label -> float when it is a dict of numbers from low to high, else {}."""
    if not isinstance(raw, dict) or not all(
            isinstance(v, (int, float)) and low <= v <= high for v in raw.values()):
        return {}
    return {str(k): float(v) for k, v in raw.items()}


def rank_key(value: float, mode: str) -> float:
    """A value to maximise: NaN ranks last in either mode."""
    if not isinstance(value, (int, float)) or math.isnan(value):
        return -math.inf
    return value if mode == "max" else -value


CHECKPOINT_SCORE = "checkpoint_score"
"""The reported value Ray ranks a trial's checkpoints by (``tie_broken``)."""


def tie_broken(value: float, epoch: int, mode: str) -> float:
    """``value`` moved ``epoch`` units in the last place toward worse, so that of two
    equal values the earlier epoch ranks higher, as ``best_recipe`` has it. Ray's
    checkpoint manager keeps the later of two equal scores, and with one checkpoint
    kept it would delete the earlier first. Values apart by more than a few units in
    the last place keep their order; NaN stays NaN."""
    if not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
        return value
    step = epoch * math.ulp(value)
    return value - step if mode == "max" else value + step


def best_recipe(recipes: list[tuple[dict, Path]], metric: str, mode: str) -> tuple[dict, Path]:
    """The best ``(recipe, folder)`` by ``metric``; on a tie the earlier epoch."""
    return max(recipes, key=lambda item: (rank_key(item[0]["metrics"].get(metric), mode),
                                          -int(item[0]["epoch"])))


def best_trial(trials: list[TrialRecord], metric: str, mode: str) -> TrialRecord:
    """The trial whose best checkpoint scores best on ``metric``; ties to fewer epochs."""
    return max(trials, key=lambda t: (rank_key(t.score(metric), mode), -t.epoch))


def training_seconds(folder: Path, epoch: int) -> float | None:
    """``time_total_s`` of the last result reported for ``epoch`` in ``result.json``."""
    try:
        lines = (folder / RESULT_FILE).read_text(errors="replace").splitlines()
    except OSError:
        return None
    seconds = None
    for line in lines:
        try:
            result = json.loads(line)
        except ValueError:
            continue  # a line being written while we read, or a damaged one
        if isinstance(result, dict) and result.get("epoch") == epoch:
            value = result.get("time_total_s")
            seconds = float(value) if isinstance(value, (int, float)) else seconds
    return seconds


def choose_datasets(runs: list[RunInfo], data: list[str],
                    allow_changed: bool = False) -> dict[str, DataChoice]:
    """Each run's dataset folder: ``--data`` (one for all, or one per run) or the
    recorded one, checked against the run's manifest."""
    if len(data) > 1 and len(data) != len(runs):
        raise UserError(f"--data given {len(data)} times for {len(runs)} runs; give it once "
                        f"for every run, or once per run in the same order")
    given = data * len(runs) if len(data) == 1 else data or [None] * len(runs)
    return {run.name: choose_data(str(run.path), run.record, run.task, folder, allow_changed,
                                  spec=run.space.data)
            for run, folder in zip(runs, given)}


# --- Ray's snapshot, for resume -------------------------------------------------------

def newest_ray_state(run_dir: str) -> str | None:
    """The path of Ray Tune's newest ``experiment_state-*.json`` in the run, if any."""
    states = sorted(name for name in list_files(run_dir) if Path(name).match(RAY_STATE_GLOB))
    return join(run_dir, states[-1]) if states else None


def check_ray_state(run_dir: str) -> None:
    """Refuse a run whose Ray Tune snapshot is missing or damaged, before Ray starts."""
    newest = newest_ray_state(run_dir)
    if newest is None:
        raise UserError(f"{run_dir}: the sweep stopped before Ray Tune saved any state, so "
                        f"there is nothing to resume; start it again with `covid-tune sweep` "
                        f"(another --name, or remove this folder)")
    state = _read_json(newest, "Ray Tune's snapshot of the run is damaged, so it cannot be "
                               "resumed; its finished trials still give a leaderboard")
    if not isinstance(state, dict) or "trial_data" not in state:
        raise UserError(f"{newest}: damaged Ray Tune snapshot (no trial list); the run "
                        f"cannot be resumed; its finished trials still give a leaderboard")
