"""The torch pin is declared once (constraints.txt), and the package's ranges admit it."""

from __future__ import annotations

from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def test_the_pinned_torch_pair_is_admitted_by_pyproject_and_used_by_every_install():
    pinned = pins()
    assert set(pinned) == {"torch", "torchvision"}
    wanted = [Requirement(r) for r in
              tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    for requirement in wanted:
        if requirement.name in pinned:
            assert requirement.specifier.contains(pinned[requirement.name]), requirement
    for script in ("Makefile", ".ci/wheel-demo"):
        text = (ROOT / script).read_text()
        assert "-c constraints.txt torch torchvision" in text, script
        assert "torch==" not in text, f"{script} pins torch itself; use constraints.txt"
