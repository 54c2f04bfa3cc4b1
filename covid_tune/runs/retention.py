"""Keeping a trial's checkpoints to what is needed (driver side, on any storage)."""

from __future__ import annotations

import json

from covid_tune.runs.checkpoint import OPTIMIZER_FILE, RECIPE_FILE
from covid_tune.runs.reader import best_recipe

# keeping a trial's checkpoints to what is needed (driver side, any storage) ---------

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
