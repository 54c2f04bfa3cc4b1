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
