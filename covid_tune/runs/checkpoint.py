"""The checkpoint format: ``checkpoint.pt``, ``optimizer.pt`` and ``recipe.json``, with
the size and SHA-256 of each file, and the base a checkpoint's weights are stored against.

Only ``save_checkpoint``, ``load_checkpoint`` and ``load_optimizer`` import torch."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from covid_tune.errors import UserError
from covid_tune.runs.folder import brief

CHECKPOINT_FILE = "checkpoint.pt"
OPTIMIZER_FILE = "optimizer.pt"
"""The optimizer state, needed only to go on training: a running trial's newest
checkpoint has it, every other checkpoint has it removed."""
RECIPE_FILE = "recipe.json"
# checkpoints ----------------------------------------------------------------------

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
        data = (folder / RECIPE_FILE).read_bytes()
    except OSError as exc:
        raise DamagedCheckpoint(f"{folder}: no readable {RECIPE_FILE} ({brief(exc)})") from None
    return parse_recipe_bytes(data, folder)


def parse_recipe_bytes(data: bytes, folder: str | Path) -> dict:
    """``parse_recipe`` of a ``recipe.json`` already read (from any storage); ``folder``
    names the checkpoint in messages."""
    try:
        recipe = json.loads(data)
    except ValueError as exc:
        raise DamagedCheckpoint(f"{folder}: no readable {RECIPE_FILE} ({brief(exc)})") from None
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
                                f"({brief(exc)})") from None
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
