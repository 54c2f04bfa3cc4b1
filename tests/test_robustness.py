"""Every bad input a user meets gets one clear line and exit code 2, and nothing is lost.

Cases the other test files already cover are listed in docs/errors.md with their tests;
this file adds the rest: hostile data (decompression bombs, symlink loops, pipes,
folders that cannot be listed), fuzzed search spaces and image files (hypothesis),
out-of-range flags, output folders that cannot be written, a diverging trial inside a
real sweep, a disk filling up while checkpointing, pickles posing as checkpoints, and
the local Ray that covid-tune starts.
"""

from __future__ import annotations

import copy
import errno
import io
import json
import os
import stat
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from covid_tune.check import check_dataset
from covid_tune.cli import main
from covid_tune.config import (
    ASHA_KEYS, AUGMENT_KEYS, PARAM_TYPES, RANGE_KEYS, TOP_KEYS, SearchSpace, TrialConfig,
    load_space)
from covid_tune.data import load_dataset, scan, try_read
from covid_tune.errors import UserError
from covid_tune.space import define_by_run, start_points
from test_cli import covid_tune
from test_data import binary_tree, multilabel_tree

ROOT = Path(__file__).resolve().parent.parent
SPACES = sorted(ROOT.glob("search_spaces/*.yaml"))
FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
optuna.logging.set_verbosity(optuna.logging.WARNING)


def refused(capsys, *argv: str) -> str:
    """Run the CLI in this process: exit 2, one ``covid-tune: error:`` line; the line."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("covid-tune: error: ") and err.count("\n") == 1, err
    return err


# --- Data -------------------------------------------------------------------------------

def png_claiming(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header claims ``width`` x ``height`` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


def test_decompression_bomb_is_listed_skipped_and_fatal_with_strict(tmp_path, capsys):
    root = binary_tree(tmp_path / "d")
    (root / "Train" / "normal" / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    bundle = load_dataset(root, image_size=32, progress=False, use_cache=False)
    assert [name for name, _ in bundle.skipped] == ["Train/normal/bomb.png"]
    assert bundle.skipped[0][1].startswith("decompression bomb")
    assert main(["check", str(root), "--quiet"]) == 0
    assert "Train/normal/bomb.png: decompression bomb" in capsys.readouterr().out
    assert "bomb.png: cannot be decoded (decompression bomb" in refused(
        capsys, "check", str(root), "--strict", "--quiet")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_images_past_the_pixel_limit_are_refused_where_pil_only_warns(tmp_path, monkeypatch):
    """PIL raises past twice MAX_IMAGE_PIXELS and only warns below; both are refused."""
    path = tmp_path / "x.png"
    Image.new("L", (40, 30)).save(path)  # 1200 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    pixels, _, why = try_read(path, 16)
    assert pixels is None
    assert why == "decompression bomb: 40x30 pixels is more than the limit of 1000"


@pytest.mark.timeout(60)
def test_symlink_loops_broken_links_and_pipes_are_listed_not_followed(tmp_path, capsys):
    root = binary_tree(tmp_path / "d")
    normal = root / "Train" / "normal"
    os.symlink("loop.png", normal / "loop.png")
    os.symlink("b.png", normal / "a.png")
    os.symlink("a.png", normal / "b.png")
    os.symlink("nowhere.png", normal / "gone.png")
    os.symlink("..", normal / "up")  # a folder loop: not descended into
    os.mkfifo(normal / "pipe.png")  # opening it would block for ever
    bundle = load_dataset(root, image_size=32, progress=False, use_cache=False)
    skipped = dict(bundle.skipped)
    assert sorted(skipped) == [f"Train/normal/{n}.png" for n in ("a", "b", "gone", "loop", "pipe")]
    assert "symlink loop" in skipped["Train/normal/loop.png"]
    assert "not a regular file" in skipped["Train/normal/pipe.png"]
    assert len(bundle.splits["train"]) == 6
    report = check_dataset(str(root), progress=False)
    assert sorted(p for p, _ in report.unreadable) == sorted(skipped)


def test_a_folder_that_cannot_be_listed_names_it(tmp_path, monkeypatch):
    """Simulated (tests run as root here, and root reads everything): listing the
    class folder fails with EACCES, as it would for an ordinary user."""
    root = binary_tree(tmp_path / "d")
    locked = root / "Train" / "normal"
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(UserError, match=r"normal: cannot list the folder \(Permission denied\); "
                                        r"check that you may read it"):
        scan(root)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may read a chmod 000 folder")
def test_a_folder_without_permission_names_it(tmp_path, capsys):
    root = binary_tree(tmp_path / "d")
    locked = root / "Train" / "normal"
    locked.chmod(0)
    try:
        assert "normal: cannot list the folder (Permission denied)" in refused(
            capsys, "check", str(root), "--quiet")
    finally:
        locked.chmod(stat.S_IRWXU)


def test_an_empty_unlabelled_test_split_is_refused(tmp_path):
    root = multilabel_tree(tmp_path / "d")
    for path in (root / "Test").iterdir():
        path.unlink()
    with pytest.raises(UserError, match="Test: no .png/.jpg images in this split"):
        scan(root)


def test_data_folder_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "data.zip"
    path.write_bytes(b"PK")
    assert "data.zip: is a file, not a folder; pass the dataset root" in refused(
        capsys, "check", str(path))


# --- Fuzzing: image files ---------------------------------------------------------------

def encoded(fmt: str, mode: str) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (12, 16), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


SEED_IMAGES = [encoded("PNG", m) for m in ("L", "I;16", "P", "RGBA")] + [
    encoded("JPEG", m) for m in ("L", "RGB", "CMYK")] + [encoded("TIFF", "L"), encoded("GIF", "P")]


@st.composite
def image_like_bytes(draw) -> bytes:
    """Raw noise, or a small valid image with bytes overwritten and its tail cut off."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=600))
    data = bytearray(draw(st.sampled_from(SEED_IMAGES)))
    edits = st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255))
    for position, value in draw(st.lists(edits, max_size=6)):
        data[position] = value
    return bytes(data[: draw(st.integers(0, len(data)))])


@pytest.fixture(scope="module")
def fuzz_tree(tmp_path_factory) -> Path:
    return binary_tree(tmp_path_factory.mktemp("fuzz") / "d", per_class=1)


@FUZZ
@given(data=image_like_bytes(), suffix=st.sampled_from([".png", ".jpg", ".JPEG"]))
def test_random_bytes_named_as_images_decode_or_are_skipped(fuzz_tree, data, suffix):
    path = fuzz_tree / f"fuzz{suffix}"
    path.write_bytes(data)
    pixels, size, why = try_read(path, 16)
    if pixels is None:
        assert size is None and isinstance(why, str) and why
    else:
        assert pixels.shape == (16, 16) and pixels.dtype == np.uint8 and why == ""


@settings(FUZZ, max_examples=30)
@given(data=image_like_bytes())
def test_random_bytes_in_a_dataset_are_read_or_listed(fuzz_tree, data):
    (fuzz_tree / "Train" / "normal" / "fuzz.png").write_bytes(data)
    bundle = load_dataset(fuzz_tree, image_size=16, progress=False, use_cache=False)
    kept = "Train/normal/fuzz.png" in bundle.splits["train"].names
    assert kept != ("Train/normal/fuzz.png" in dict(bundle.skipped))


# --- Fuzzing: search spaces -------------------------------------------------------------

KNOWN_WORDS = (*TOP_KEYS, *PARAM_TYPES, *ASHA_KEYS, *AUGMENT_KEYS, *RANGE_KEYS, "choices",
               "binary", "multilabel", "vgg16", "resnet18", "ce", "bce", "focal", "val_f1",
               "val_macro_f1", "max", "min", "imagenet", "none")
SCALARS = (st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats()
           | st.text(max_size=12) | st.sampled_from(KNOWN_WORDS))
KEYS = st.sampled_from(KNOWN_WORDS) | st.text(max_size=8) | st.integers(-5, 5)
DOCUMENTS = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(KEYS, inner, max_size=6), max_leaves=30)


SHIPPED = [yaml.safe_load(path.read_text()) for path in SPACES]


@st.composite
def mutated_space(draw) -> dict:
    """A shipped search space with 1 to 3 random changes: a key dropped or renamed, a
    value replaced by one of another type, somewhere in the tree."""
    doc = copy.deepcopy(draw(st.sampled_from(SHIPPED)))
    for _ in range(draw(st.integers(1, 3))):
        mutate_somewhere(draw, doc)
    return doc


def mutate_somewhere(draw, node) -> None:
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return
        key = draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and child and draw(st.booleans()):
            node = child
            continue
        action = draw(st.sampled_from(["drop", "rename", "replace"]))
        if action == "drop":
            del node[key]
        elif action == "rename" and isinstance(node, dict):
            node[draw(KEYS)] = node.pop(key)
        else:
            node[key] = draw(DOCUMENTS)
        return


def load_or_refuse(path: Path) -> None:
    """``load_space`` gives a SearchSpace (which Optuna can sample) or a UserError."""
    try:
        space = load_space(path)
    except UserError as exc:
        assert str(exc).startswith(str(path)) or " problems:\n" in str(exc)
        return
    assert isinstance(space, SearchSpace)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for point in start_points(space)[:1]:
        study.enqueue_trial(point)
    for _ in range(2):
        TrialConfig.from_dict(define_by_run(space)(study.ask()))


@pytest.fixture(scope="module")
def space_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-space") / "space.yaml"


@FUZZ
@given(doc=DOCUMENTS)
def test_random_yaml_documents_load_or_are_refused(space_path, doc):
    space_path.write_text(yaml.safe_dump(doc))
    load_or_refuse(space_path)


@FUZZ
@given(doc=mutated_space())
def test_mutated_shipped_spaces_load_or_are_refused(space_path, doc):
    space_path.write_text(yaml.safe_dump(doc))
    load_or_refuse(space_path)


@FUZZ
@given(text=st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(":-[]{},&*!|>'\"#\n "),
                    max_size=200))
def test_random_text_loads_or_is_refused(space_path, text):
    space_path.write_text(text, encoding="utf-8")
    load_or_refuse(space_path)


@pytest.mark.parametrize("doc, expected", [
    ("task: [binary]\nparams: {backbone: vgg16}", "task: ['binary'] is not a task"),
    ("task: binary\nparams: {backbone: [vgg16]}", "params.backbone: expected a str"),
    ("task: binary\nparams: {backbone: {choices: [[vgg16]]}}", "choice ['vgg16'] is not str"),
    ("task: binary\nparams: {backbone: vgg16, lr: {low: .nan, high: 1}}",
     "params.lr.low: expected a float, got nan"),
    ("task: binary\nparams: {backbone: vgg16, lr: {low: 0.1, high: .inf}}",
     "params.lr.high: expected a float, got inf"),
    ("task: binary\nparams: {backbone: vgg16, lr: {low: 0.1, high: 1, choices: [1]}}",
     "params.lr.low: unknown key; valid keys: choices"),
    ("task: binary\nparams: {backbone: {choices: [vgg16, resnet18]}}\n"
     "start_with: [{frozen_layers: 3}]", "start_with[0].frozen_layers: frozen_layers depends "
                                         "on the backbone; give the row's backbone too"),
    ("task: binary\nparams: {backbone: vgg16}\n\x07", "line 3: YAML syntax error"),
    ("task: " + "[" * 3000 + "]" * 3000, "nested too deeply"),
], ids=["task-list", "backbone-list", "choice-list", "nan", "inf", "choices-and-range",
        "frozen-row-without-backbone", "control-character", "deep-nesting"])
def test_mistakes_found_by_fuzzing(tmp_path, doc, expected):
    path = tmp_path / "space.yaml"
    path.write_text(doc)
    with pytest.raises(UserError) as caught:
        load_space(path)
    assert expected in str(caught.value)


def test_an_alias_bomb_gives_a_short_message(tmp_path):
    """YAML aliases make a list of 9**6 items from a few lines; the message stays short."""
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
        f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcde", "bcdef")]
    path = tmp_path / "space.yaml"
    path.write_text("\n".join(lines) + "\ntask: binary\nparams: {backbone: vgg16, lr: *f}\n")
    with pytest.raises(UserError) as caught:
        load_space(path)
    assert "params.lr: expected a float" in str(caught.value) and len(str(caught.value)) < 5000


# --- Commands ---------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, expected", [
    ("--num-samples", "0", "--num-samples 0: out of range; use at least 1"),
    ("--max-epochs", "-3", "--max-epochs -3: out of range; use at least 1"),
    ("--image-size", "8", "--image-size 8: out of range; use at least 32"),
    ("--cpus-per-trial", "0", "--cpus-per-trial 0.0: out of range; use more than 0"),
    ("--cpus-per-trial", "-1", "--cpus-per-trial -1.0: out of range; use more than 0"),
    ("--cpus-per-trial", "nan", "--cpus-per-trial nan: out of range"),
    ("--gpus-per-trial", "-0.5", "--gpus-per-trial -0.5: out of range; use at least 0"),
    ("--max-concurrent", "0", "--max-concurrent 0: out of range; use at least 1"),
    ("--max-failures", "-2", "--max-failures -2: out of range; use at least -1"),
])
def test_out_of_range_sweep_flags(capsys, flag, value, expected):
    assert expected in refused(capsys, "sweep", "--space", "x.yaml", "--data", "d", flag, value)


@pytest.mark.parametrize("argv, expected", [
    (["synth", "out", "--task", "binary", "--scale", "0"], "--scale 0.0: out of range"),
    (["synth", "out", "--task", "binary", "--size", "16"], "--size 16: out of range"),
    (["demo", "--seed", "-1"], "--seed -1: out of range; use at least 0"),
])
def test_out_of_range_flags_of_other_commands(capsys, argv, expected):
    assert expected in refused(capsys, *argv)


def test_a_flag_of_the_wrong_type_exits_2_without_traceback():
    result = covid_tune("sweep", "--space", "x", "--data", "y", "--num-samples", "many")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "argument --num-samples: invalid int value: 'many'" in result.stderr


@pytest.fixture
def read_only_folder(tmp_path) -> Path:
    """A folder nobody here may create files in: chmod 555, or /sys when root."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        yield locked
        locked.chmod(0o755)
    elif Path("/sys").is_dir():
        yield Path("/sys")
    else:
        pytest.skip("no folder that root may not write to")


@pytest.mark.parametrize("argv, flag", [
    (["synth", "{out}", "--task", "binary"], "out {out}: "),
    (["sweep", "--space", "x", "--data", "y", "--storage-path", "{out}"], "--storage-path {out}: "),
    (["export", "run", "--out", "{out}"], "--out {out}: "),
    (["predict", "model", "x.png", "--out", "{out}/preds.csv"], "--out {out}/preds.csv: "),
], ids=["synth", "sweep", "export", "predict"])
def test_output_folder_that_cannot_be_written(capsys, read_only_folder, tmp_path, argv, flag):
    out = str(read_only_folder / "runs")
    message = refused(capsys, *[a.format(out=out) for a in argv])
    assert flag.format(out=out) in message
    assert f"cannot write in {read_only_folder}" in message
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    message = refused(capsys, *[a.format(out=blocked / "runs") for a in argv])
    assert f"{blocked} is a file, not a folder" in message


def test_resume_of_a_run_that_never_started(ray_cluster, tmp_path, binary_data):
    """The driver stopped after writing sweep.json, before Ray Tune saved any state."""
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    options = {"space_file": str(ROOT / "search_spaces" / "demo.yaml"), "data": str(binary_data),
               "name": "r", "storage_path": str(run.parent), "image_size": 32}
    (run / "sweep.json").write_text(json.dumps(options))
    from covid_tune.sweep import resume_sweep

    with pytest.raises(UserError, match="r: .*start it again"):
        resume_sweep(run)


# --- Training ---------------------------------------------------------------------------

def diverging_space(tmp_path: Path) -> Path:
    doc = {"task": "binary", "metric": "val_loss", "mode": "min", "max_epochs": 2,
           "image_size": 32, "pretrained": "none", "augment": False, "num_samples": 2,
           "asha": {"grace_period": 2, "reduction_factor": 2},
           "params": {"backbone": "resnet18", "lr": {"low": 1e-4, "high": 1e7, "log": True},
                      "batch_size": 16, "hidden": 16, "dropout": 0.0},
           "start_with": [{"lr": 1e6}, {"lr": 0.01}]}
    path = tmp_path / "diverge.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_diverging_trial_fails_with_its_reason_and_the_sweep_goes_on(
        ray_cluster, binary_data, tmp_path):
    from covid_tune.sweep import STUDY_FILE, SweepOptions, run_sweep
    from covid_tune.train import DIVERGED_FILE

    opts = SweepOptions(space_file=str(diverging_space(tmp_path)), data=str(binary_data),
                        name="nan", storage_path=str(tmp_path / "runs"), max_failures=1)
    results = run_sweep(opts)
    by_lr = {r.config["lr"]: r for r in results}
    assert set(by_lr) == {1e6, 0.01}
    assert by_lr[0.01].error is None and by_lr[0.01].metrics["epoch"] == 2
    bad = by_lr[1e6]
    assert "loss became nan" in str(bad.error) or "loss became inf" in str(bad.error)
    errors = (Path(bad.path) / "error.txt").read_text()
    assert "Failure # 1" in errors and "lr 1000000.0 is probably too high" in errors
    assert "Failure # 2" in errors and "diverged before; not trained again" in errors
    assert (Path(bad.path) / DIVERGED_FILE).is_file()
    study_file = tmp_path / "runs" / "nan" / STUDY_FILE
    study = optuna.load_study(study_name="nan", storage=f"sqlite:///{study_file}")
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "FAIL"]


def tiny_checkpoint_args(epoch: int):
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, float(epoch))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = TrialConfig(task="binary", backbone="resnet18", frozen_layers=0, lr=0.1,
                      momentum=0.9, batch_size=8, weight_decay=0.0, hidden=16, dropout=0.0,
                      loss="ce", focal_alpha=0.25, focal_gamma=2.0, max_epochs=3,
                      image_size=32, augment=None, pretrained="none", metric="val_f1",
                      mode="max")
    return model, optimizer, epoch, cfg, {"val_f1": 0.5}


def test_a_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """What this shows: each epoch's checkpoint goes to a fresh folder (train.py writes
    it in a temporary folder that Ray copies and registers only once complete), so a
    write that fails half way (simulated: torch.save writes half its bytes, then
    raises ENOSPC) leaves the previous checkpoint untouched and loadable, and the
    half-written one is refused rather than loaded. It does not fill a real disk."""
    from covid_tune.train import load_checkpoint, save_checkpoint

    good, cut = tmp_path / "checkpoint_000000", tmp_path / "checkpoint_000001"
    for folder in (good, cut):
        folder.mkdir()
    save_checkpoint(good, *tiny_checkpoint_args(epoch=1))
    real_save = torch.save

    def save_until_full(obj, path, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        Path(path).write_bytes(buffer.getvalue()[: buffer.tell() // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(cut, *tiny_checkpoint_args(epoch=2))
    state, recipe = load_checkpoint(good)
    assert state["epoch"] == 1 and recipe["epoch"] == 1
    assert torch.equal(state["model"]["weight"], torch.ones(2, 3))
    with pytest.raises(UserError, match="checkpoint_000001"):
        load_checkpoint(cut)


class Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("recipe", ["plain", "with-digests"])
def test_a_pickle_posing_as_a_checkpoint_is_refused_not_run(tmp_path, recipe):
    """Plain: a recipe without file digests, so torch.load(weights_only=True) itself
    refuses the pickle. With digests: a real checkpoint whose checkpoint.pt was swapped
    afterwards, refused before any unpickling."""
    from covid_tune.train import CHECKPOINT_FILE, RECIPE_FILE, load_checkpoint, save_checkpoint

    marker = tmp_path / "code-ran"
    if recipe == "plain":
        (tmp_path / RECIPE_FILE).write_text(json.dumps({"epoch": 1}))
    else:
        save_checkpoint(tmp_path, *tiny_checkpoint_args(epoch=1))
    torch.save({"model": Payload(marker), "epoch": 1}, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(Exception, match="(?i)weights only load failed|altered"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def test_every_torch_load_is_weights_only():
    for path in (ROOT / "covid_tune").glob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path.name}:{number}: {line.strip()}"


# --- The local Ray ----------------------------------------------------------------------

RAY_PROBE = textwrap.dedent("""
    import json, os
    from covid_tune.sweep import start_ray
    start_ray(None)
    import ray
    def read(pid, name):
        try:
            with open(f"/proc/{pid}/{name}") as file:
                return file.read()
        except OSError:
            return ""
    def descendants(pid):
        kids = [p for p in os.listdir("/proc") if p.isdigit()
                and read(p, "stat").rsplit(")", 1)[-1].split()[1:2] == [str(pid)]]
        return kids + [d for k in kids for d in descendants(k)]
    commands = [read(pid, "cmdline").split("\\0") for pid in descendants(os.getpid())]
    print(json.dumps({"nodes": len(ray.nodes()),
                      "own_gcs": any(c[0].endswith("gcs_server") for c in commands),
                      "dashboards": [c for c in commands if any("dashboard.py" in a for a in c)]}))
""")


def probe_local_ray(**env: str) -> dict:
    result = subprocess.run([sys.executable, "-c", RAY_PROBE], capture_output=True, text=True,
                            timeout=180, cwd=ROOT, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_the_local_ray_dashboard_listens_on_localhost_only():
    """RAY_ADDRESS=local: a fresh instance, whatever else runs on this machine."""
    probe = probe_local_ray(RAY_ADDRESS="local")
    assert probe["own_gcs"] and probe["nodes"] == 1
    assert probe["dashboards"], "no dashboard process found"
    for command in probe["dashboards"]:
        assert "--host=127.0.0.1" in command, command


def test_the_local_ray_is_a_new_instance_even_beside_another_cluster(ray_cluster):
    """The test cluster is running and recorded in /tmp/ray/ray_current_cluster; the
    Ray that covid-tune starts must still be its own (its GCS a child process)."""
    probe = probe_local_ray()
    assert probe["own_gcs"] and probe["nodes"] == 1
