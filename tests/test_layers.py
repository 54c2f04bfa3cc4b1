"""The import rules of the layers (``[tool.importlinter]`` in pyproject.toml,
docs/architecture.md) hold, and breaking one fails them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTRACTS = ROOT / "pyproject.toml"


def lint_imports(package_parent: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    command = [str(Path(sys.executable).with_name("lint-imports")), "--config", str(CONTRACTS),
               "--no-cache"]
    return subprocess.run(command, cwd=package_parent, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_import_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_import_across_the_layers_breaks_the_contracts(tmp_path):
    shutil.copytree(ROOT / "covid_tune", tmp_path / "covid_tune",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "search_spaces", tmp_path / "search_spaces")
    with open(tmp_path / "covid_tune" / "results" / "render.py", "a") as file:
        file.write("\n\ndef _late():\n    from covid_tune.search import sweep  # noqa\n")
    with open(tmp_path / "covid_tune" / "core" / "tasks.py", "a") as file:
        file.write("\nimport torch  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    out = " ".join(result.stdout.split())
    assert "Packages are layers: each imports only the ones below it BROKEN" in out
    assert "covid_tune.results.render -> covid_tune.search.sweep" in out
    assert "load without torch BROKEN" in out and "covid_tune.core.tasks -> torch" in out
