"""The run folder's file names, and ``RunFolder``: one run folder on any storage (a local
path, ``file://``, ``s3://``, ``gs://``), through which its files are read and written."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs

from covid_tune.errors import UserError
from covid_tune.runs.storage import (
    exists_on,
    is_uri,
    join,
    move_on,
    open_path,
    shown,
    write_on,
)

SWEEP_FILE = "sweep.json"
SPACE_FILE = "space.yaml"
DATASET_FILE = "dataset.json"
STUDY_FILE = "optuna.db"
TRACKING_FILE = "mlflow.json"
END_FILE = "end.json"
"""Why the sweep's last driver ended (``covid_tune.runs.record.write_end``)."""
"""Where the sweep is tracked in MLflow and its parent run (``covid_tune.runs.tracking``)."""
LOCK_FILE = "sweep.lock"
LOST_DIR = "lost_trials"
"""Where ``resume`` moves the folders of trials the run's last snapshot did not list."""
RESULT_FILE = "result.json"
DIVERGED_FILE = "diverged.txt"
"""Written in a trial folder when the trial diverges: its retries then fail at once."""
RAY_STATE_GLOB = "experiment_state-*.json"
SNAPSHOT_FILE = "snapshot.tar"
"""A whole copy of Ray Tune's newest snapshot of the run (``covid_tune.runs.ray_state``)."""


class RunFolder:
    """A run folder (or a folder in one) on any storage: a local path, ``file://``,
    ``s3://`` or ``gs://``, opened once.

    It holds the pyarrow filesystem and the path inside it, so every read and write of
    the run's files takes one code path wherever the sweep wrote them. Files are named
    by their parts inside the folder: ``run.read_json("trial_x", RESULT_FILE, what=...)``.
    Messages name files by ``where``, which shows a URI without its query and
    credentials. A URI's query (``?endpoint_override=host:port&scheme=http``) and
    credentials (``s3://KEY:SECRET@bucket/...``) are pyarrow's; with neither, pyarrow
    finds credentials as the AWS or Google tools do (environment, config files, the
    machine's role).
    """

    def __init__(self, where: str | Path | RunFolder):
        if isinstance(where, RunFolder):
            self.uri, self.fs, self.fs_path = where.uri, where.fs, where.fs_path
            return
        text = str(where)
        self.uri = text.rstrip("/") if is_uri(text) else str(Path(text).expanduser().resolve())
        """The folder as pyarrow opens it: an absolute path, or the URI as given."""
        self.fs, fs_path = open_path(self.uri)
        self.fs_path = fs_path.rstrip("/") or fs_path
        """The folder's path inside ``fs``."""

    @classmethod
    def on(cls, fs: pyarrow.fs.FileSystem, fs_path: str) -> RunFolder:
        """The folder ``fs_path`` on an opened pyarrow filesystem (as Ray holds it)."""
        folder = object.__new__(cls)
        folder.fs, folder.fs_path = fs, fs_path.rstrip("/") or fs_path
        local = isinstance(fs, pyarrow.fs.LocalFileSystem)
        folder.uri = folder.fs_path if local else f"{fs.type_name}://{folder.fs_path}"
        return folder

    def __repr__(self) -> str:
        return f"RunFolder({self.where()!r})"

    def __str__(self) -> str:
        return self.where()

    @property
    def is_local(self) -> bool:
        """Whether the folder is on this machine (a path or a ``file://`` URI)."""
        return isinstance(self.fs, pyarrow.fs.LocalFileSystem)

    @property
    def name(self) -> str:
        return self.fs_path.rsplit("/", 1)[-1]

    def sub(self, *names: str) -> RunFolder:
        """The folder ``names`` inside this one, on the same opened filesystem."""
        inner = object.__new__(RunFolder)
        inner.uri, inner.fs, inner.fs_path = join(self.uri, *names), self.fs, self.path(*names)
        return inner

    def path(self, *names: str) -> str:
        """The path of ``names`` inside the filesystem (``fs``)."""
        return "/".join([self.fs_path, *names])

    def where(self, *names: str) -> str:
        """``names`` inside the folder as messages show it: a local path, or a URI
        without query or credentials."""
        return self.path(*names) if self.is_local else shown(join(self.uri, *names))

    def local(self, *names: str) -> Path:
        """``names`` inside a local folder as a ``Path``; ValueError on object storage."""
        if not self.is_local:
            raise ValueError(f"{self.where()} is not on this machine")
        return Path(self.path(*names))

    def exists(self, *names: str) -> bool:
        return exists_on(self.fs, self.path(*names))

    def read_bytes(self, *names: str) -> bytes:
        with self.fs.open_input_stream(self.path(*names)) as stream:
            return stream.readall()

    def read_text(self, *names: str) -> str:
        """A text file, undecodable bytes replaced (a line being written, or damaged)."""
        return self.read_bytes(*names).decode(errors="replace")

    def read_json(self, *names: str, what: str) -> object:
        """A JSON file; UserError naming it, then ``what`` follows, if it is missing
        or damaged."""
        if not self.exists(*names):
            raise UserError(f"{self.where(*names)}: missing; {what}")
        try:
            return json.loads(self.read_bytes(*names))
        except (OSError, ValueError) as exc:
            raise UserError(f"{self.where(*names)}: damaged, not readable JSON "
                            f"({brief(exc)}); {what}") from None

    def write_bytes(self, *names: str, data: bytes) -> None:
        """Write a whole file (``storage.write_bytes``: never a part of one)."""
        write_on(self.fs, self.path(*names), data)

    def folders(self, *names: str, prefix: str = "") -> list[str]:
        """Names of the folders directly inside ``names`` that start with ``prefix``."""
        return sorted(info.base_name for info in self._entries(*names)
                      if info.type == pyarrow.fs.FileType.Directory
                      and info.base_name.startswith(prefix))

    def files(self, *names: str) -> list[str]:
        """Names of the files directly inside ``names``."""
        return sorted(info.base_name for info in self._entries(*names)
                      if info.type == pyarrow.fs.FileType.File)

    def _entries(self, *names: str) -> list:
        selector = pyarrow.fs.FileSelector(self.path(*names), allow_not_found=True)
        return self.fs.get_file_info(selector)

    def trial_folders(self) -> list[str]:
        """The run's ``trial_*`` folders, by name."""
        return self.folders(prefix="trial_")

    def checkpoint_folders(self, trial: str) -> list[str]:
        """The ``checkpoint_*`` folders of a trial, by name, oldest first."""
        return self.folders(trial, prefix="checkpoint_")

    def move(self, source: tuple[str, ...], destination: tuple[str, ...]) -> None:
        """Move a folder inside the run (copy, then delete, on object stores)."""
        move_on(self.fs, self.path(*source), self.path(*destination))

    @contextlib.contextmanager
    def local_file(self, *names: str):
        """A file of the run on this machine, for readers that need a path (SQLite):
        itself, or a copy in a temporary folder removed on leaving the block."""
        if self.is_local:
            yield self.local(*names)
            return
        with tempfile.TemporaryDirectory(prefix="covid-tune-") as folder:
            copy = Path(folder) / names[-1]
            copy.write_bytes(self.read_bytes(*names))
            yield copy

    def local_checkpoint(self, *names: str) -> Path:
        """A checkpoint folder on this machine, for torch to load: itself, or a copy
        under the decode cache (``$COVID_TUNE_CACHE/checkpoints``; a temporary folder
        if that cannot be written) checked against the size and SHA-256 its recipe
        records, and reused while it matches. ``DamagedCheckpoint`` if it does not.
        The optimizer state is not copied: reading a model does not need it."""
        from covid_tune.runs.checkpoint import (
            OPTIONAL_FILES,
            RECIPE_FILE,
            DamagedCheckpoint,
            is_intact,
            parse_recipe_bytes,
            read_recipe,
        )

        if self.is_local:
            return self.local(*names)
        where = self.where(*names)
        recipe_bytes = self.read_bytes(*names, RECIPE_FILE)
        recipe = parse_recipe_bytes(recipe_bytes, where)
        key = hashlib.sha256(where.encode() + b"\0" + recipe_bytes).hexdigest()[:24]
        wanted = [RECIPE_FILE] + [name for name in recipe.get("files", {})
                                  if name not in OPTIONAL_FILES and "/" not in name]
        try:
            target = _checkpoint_cache() / key
            if target.is_dir() and is_intact(target):
                return target
            target.parent.mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
        except OSError:
            target = stage = Path(tempfile.mkdtemp(prefix="covid-tune-checkpoint-"))
        for name in wanted:
            if self.exists(*names, name):  # a missing one is named by read_recipe
                (stage / name).write_bytes(self.read_bytes(*names, name))
        try:
            read_recipe(stage)
        except DamagedCheckpoint as exc:
            shutil.rmtree(stage, ignore_errors=True)
            raise DamagedCheckpoint(str(exc).replace(str(stage), where)) from None
        if stage != target:
            try:
                os.replace(stage, target)
            except OSError:  # another reader cached it first
                return stage
        return target


def _checkpoint_cache() -> Path:
    from covid_tune.data.dataset import cache_dir

    return cache_dir() / "checkpoints"


def brief(exc: Exception) -> str:
    """An error's first line, at most 160 characters, for a one-line message."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]
