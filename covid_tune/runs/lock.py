"""One driver per run folder: the lock a sweep or a resume holds while it runs.

The lock is the file ``sweep.lock`` in the run folder (``covid_tune.runs.folder.LOCK_FILE``),
holding the holder's host, pid, start time and command.

- **Local and shared folders** (NFS, EFS, Filestore): the file is locked with
  ``flock``, which the kernel (or the NFS lock manager) grants to one process at a
  time and releases when that process ends, however it ends. A second driver is
  refused, naming the holder. A lock file whose holder died is taken over, with a
  notice: its pid is gone, or the flock is free although the file remained.
- **Object stores** (``s3://``, ``gs://``) have no atomic create: the file is checked
  and then written, so two drivers started within the same second can both pass.
  A lock file left by a dead pid on this host is taken over; one from another host
  is refused, and the message says how to remove it if that driver is gone.

Imports neither torch nor Ray.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from covid_tune.errors import UserError
from covid_tune.runs.folder import LOCK_FILE
from covid_tune.runs.storage import exists, is_uri, join, read_bytes, remove, write_bytes


@dataclass(frozen=True)
class Holder:
    """Who holds a run folder."""

    host: str
    pid: int
    started: str
    command: str

    @classmethod
    def me(cls) -> Holder:
        return cls(host=platform.node(), pid=os.getpid(),
                   started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                   command=shlex.join(["covid-tune", *sys.argv[1:]]))

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        try:
            raw = json.loads(data)
            return cls(host=str(raw["host"]), pid=int(raw["pid"]),
                       started=str(raw["started"]), command=str(raw["command"]))
        except (ValueError, KeyError, TypeError):
            return None

    def encode(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started} (`{self.command}`)"

    def is_gone(self) -> bool:
        """True only when the holder is sure to be dead: a pid of this host that no
        process has."""
        if self.host != platform.node():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            pass
        return False


@contextmanager
def hold(run_dir: str):
    """Hold ``run_dir`` for this process; UserError if another driver holds it."""
    if is_uri(run_dir):
        path = join(run_dir, LOCK_FILE)
        _take_marker(path)
        try:
            yield
        finally:
            _quietly(remove, path)
        return
    folder = Path(run_dir)
    created = not folder.exists()
    fd, path = _take_flock(folder)
    try:
        yield
    finally:
        _quietly(os.unlink, path)  # unlinked before the flock ends: see _take_flock
        os.close(fd)
        if created:
            _quietly(folder.rmdir)  # a sweep refused before it wrote anything


def _take_flock(folder: Path) -> tuple[int, Path]:
    path = folder / LOCK_FILE
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue  # the folder was removed by a holder that just ended
        except OSError as exc:
            raise UserError(f"{path}: cannot create the run's lock file ({exc.strerror}); "
                            f"check that you may write in {folder}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Holder.parse(os.pread(fd, 4096, 0))
            os.close(fd)
            raise UserError(in_use(folder, holder)) from None
        # The holder before us may have unlinked the file after we opened it: then our
        # flock is on a file nobody else can find, and we must lock the new one.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        previous = Holder.parse(os.pread(fd, 4096, 0))
        if previous is not None:
            print(f"note: {path}: taking over the lock of {previous}, which ended without "
                  f"releasing it")
        try:
            data = Holder.me().encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError as exc:
            _quietly(os.unlink, path)
            os.close(fd)
            _quietly(folder.rmdir)  # only if empty: a folder made for this lock
            raise UserError(f"{path}: cannot write the run's lock file ({exc.strerror}); "
                            f"free space in {folder} and run again") from None
        return fd, path


def _take_marker(path: str) -> None:
    if exists(path):
        holder = Holder.parse(read_bytes(path))
        if holder is None or not holder.is_gone():
            raise UserError(in_use(path.rsplit("/", 1)[0], holder) +
                            f"; if that driver is gone, delete {path}")
        print(f"note: {path}: taking over the lock of {holder}, which is no longer running")
    try:
        write_bytes(path, Holder.me().encode())
    except OSError as exc:
        raise UserError(f"{path}: cannot write the run's lock file ({exc})") from None


def in_use(run_dir: str | Path, holder: Holder | None) -> str:
    who = str(holder) if holder else "another driver (its lock file is unreadable)"
    return (f"{run_dir}: in use by {who}; wait for it to end, or stop it (Ctrl-C) and "
            f"continue with `covid-tune resume {run_dir}`")


def _quietly(action, *args) -> None:
    try:
        action(*args)
    except OSError:
        pass
