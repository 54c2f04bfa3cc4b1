"""What several test files share: running the CLI to a refusal, small saved images, a
binary dataset tree, and hypothesis strategies for bytes that look like images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from hypothesis import strategies as st
from PIL import Image

from covid_tune.cli import main


def refused(capsys, *argv: str) -> str:
    """Run the CLI in this process: exit 2, one ``covid-tune: error:`` line; the line."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("covid-tune: error: ") and err.count("\n") == 1, err
    return err


def save(path: Path, mode: str = "L", size=(40, 30), value: int = 100) -> Path:
    """A random image in ``mode`` (PNG, or JPEG by suffix), seeded by ``value``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    if mode == "I;16":
        pixels = rng.integers(0, 4096, size=size[::-1]).astype(np.uint16)
        Image.fromarray(pixels).save(path)
        return path
    base = Image.fromarray(rng.integers(0, 255, size=size[::-1], dtype=np.uint8), mode="L")
    image = base.convert(mode) if mode != "L" else base
    image.save(path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    return path


def binary_tree(root: Path, per_class: int = 3) -> Path:
    """A Part 1 dataset; the published spelling is lower case, odd cases test matching."""
    for s, split in enumerate(("Train", "VALIDATION", "test")):
        for c, cls in enumerate(("Infected", "normal")):
            for i in range(per_class):
                save(root / split / cls / f"{cls}{i}.png", value=100 * s + 10 * c + i)
    return root


def encoded(fmt: str, mode: str) -> bytes:
    """A small image in ``fmt`` and ``mode``, as bytes."""
    pixels = np.random.default_rng(0).integers(0, 255, (12, 16), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, fmt)
    return buffer.getvalue()


@st.composite
def image_like_bytes(draw, seeds: list[bytes]) -> bytes:
    """Raw noise, or one of ``seeds`` with bytes overwritten and its tail cut off."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=600))
    data = bytearray(draw(st.sampled_from(seeds)))
    edits = st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255))
    for position, value in draw(st.lists(edits, max_size=6)):
        data[position] = value
    return bytes(data[: draw(st.integers(0, len(data)))])


def loaded_after(code: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has loaded after running ``code``."""
    import ast
    import subprocess
    import sys

    probe = f"{code}\nimport sys; print(sorted(m for m in {modules!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True)
    return ast.literal_eval(result.stdout.strip().splitlines()[-1])


def as_ordinary_user(argv: list[str], home: Path, timeout: float = 120):
    """``python -m covid_tune ARGV`` with file permissions applying to it: as this user,
    or, when the tests run as root, as root without every capability (``setpriv``):
    without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH root obeys a chmod 000 as anyone
    does. ``home`` holds the decode cache."""
    import os
    import subprocess
    import sys

    drop = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"] if os.geteuid() == 0 else []
    env = {**os.environ, "HOME": str(home), "COVID_TUNE_CACHE": str(home / "cache")}
    return subprocess.run([*drop, sys.executable, "-m", "covid_tune", *argv], env=env,
                          cwd=home, capture_output=True, text=True, timeout=timeout)


def can_mount_tmpfs() -> bool:
    """Whether this machine lets an ordinary process mount a tmpfs in its own user and
    mount namespaces (what ``on_small_disk`` needs)."""
    import shutil
    import subprocess

    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


DISK_PREAMBLE = '''
import json, os, sys
DISK = sys.argv[1]

def fill_disk(free_pages=0):
    """Fill DISK, then free ``free_pages`` pages of 4 KiB."""
    fd = os.open(os.path.join(DISK, ".filler"), os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError:
        pass
    size = os.fstat(fd).st_size
    os.ftruncate(fd, max(0, size - size % 4096 - free_pages * 4096))
    os.close(fd)

def free_disk():
    os.remove(os.path.join(DISK, ".filler"))
'''


def on_small_disk(code: str, folder: Path, size_kib: int = 4096,
                  timeout: float = 300) -> tuple[object, str]:
    """Run Python ``code`` with a ``size_kib`` tmpfs mounted on ``folder`` (``DISK`` in
    the code), in private user and mount namespaces: a real ENOSPC, seen by nothing
    else. ``fill_disk(free_pages)`` and ``free_disk()`` are defined for the code, which
    prints its outcome as JSON on its last line: (that outcome, everything printed)."""
    import json
    import subprocess
    import sys

    folder.mkdir(parents=True, exist_ok=True)
    mount = f'mount -t tmpfs -o size={size_kib}k tmpfs "$1" && exec "$0" -c "$2" "$1"'
    done = subprocess.run(["unshare", "-Urm", "sh", "-c", mount, sys.executable, str(folder),
                           DISK_PREAMBLE + code], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout


OLD_RUN = Path(__file__).resolve().parent / "fixtures" / "before-0.2"
"""A real run folder (one trial with checkpoints; ``tests/fixtures/README.md``)."""


def pareto_run(folder: Path, trials: dict[str, dict], objectives: tuple[str, ...] = (
        "latency_ms",)) -> Path:
    """A copy of ``OLD_RUN`` at ``folder`` whose space names ``objectives`` and whose one
    real trial is copied once per entry of ``trials`` (trial id -> what its last epoch
    reports besides: ``val_loss``, ``params``, ``latency_ms``, ``lr``), as the trainable
    reports deploy costs: in every row of ``result.json`` and in the recipe's metrics.
    Each copy keeps its last checkpoint, so it loads and exports for real. The recorded
    dataset is a folder that is not there (pass ``--data`` for one that is)."""
    import json
    import shutil

    from covid_tune.runs.checkpoint import bytes_digest

    shutil.copytree(OLD_RUN, folder)
    (original,) = folder.glob("trial_*")
    for trial_id, reported in trials.items():
        trial = folder / f"trial_{trial_id}"
        shutil.copytree(original, trial)
        shutil.rmtree(trial / "checkpoint_000000")
        recipe_path = trial / "checkpoint_000001" / "recipe.json"
        recipe = json.loads(recipe_path.read_text())
        config = {**recipe["config"], "lr": reported.get("lr", recipe["config"]["lr"])}
        metrics = {k: v for k, v in reported.items() if k != "lr"}
        recipe.update(config=config, metrics={**recipe["metrics"], **metrics})
        recipe_path.write_text(json.dumps(recipe, indent=1))
        costs = {k: v for k, v in metrics.items() if k in ("params", "latency_ms")}
        rows = [{**json.loads(line), **costs} for line in
                (trial / "result.json").read_text().splitlines()]
        (trial / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.rmtree(original)
    space = (folder / "space.yaml").read_bytes()
    if objectives:
        space += f"objectives: [{', '.join(objectives)}]\n".encode()
    (folder / "space.yaml").write_bytes(space)
    record = json.loads((folder / "sweep.json").read_text())
    record["files"]["space.yaml"] = bytes_digest(space)
    record["provenance"]["data"] = str(folder.parent / "dataset-not-here")
    (folder / "sweep.json").write_text(json.dumps(record, indent=1))
    return folder


PARETO_TRIALS = {
    "best": {"val_loss": 0.60, "latency_ms": 40.0, "params": 11_200_000, "lr": 0.01},
    "front": {"val_loss": 0.62, "latency_ms": 10.0, "params": 5_000_000, "lr": 0.02},
    "slower": {"val_loss": 0.65, "latency_ms": 12.0, "params": 6_000_000, "lr": 0.03},
    "fastest": {"val_loss": 0.70, "latency_ms": 2.0, "params": 1_000_000, "lr": 0.04},
}
"""Four trials of ``pareto_run`` (val_loss, lower is better): ``slower`` is worse and
slower than ``front``, so off the front of latency; the others are on it."""
