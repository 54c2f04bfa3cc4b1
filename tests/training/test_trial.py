"""One trial: its checkpoints (written whole, refused when damaged or hostile, fallen
back from when cut short) and a diverging trial inside a real sweep."""

from __future__ import annotations

import errno
import io
import json
from pathlib import Path

import pytest
import torch
from ray import tune

from covid_tune.core.space import TrialConfig
from covid_tune.errors import UserError
from covid_tune.nn.models import build_model
from covid_tune.runs.checkpoint import CHECKPOINT_FILE, RECIPE_FILE, DamagedCheckpoint, is_intact, load_checkpoint, load_optimizer, read_recipe
from covid_tune.core.tasks import TASKS
from covid_tune.nn.weights import Base
from covid_tune.training.trial import (EpochState, Publisher, build_optimizer, restore,
                              write_checkpoint)

ROOT = Path(__file__).resolve().parents[2]


def trial_config(**changes) -> TrialConfig:
    values = dict(task="binary", backbone="resnet18", frozen_layers=0, lr=0.1, momentum=0.9,
                  batch_size=8, weight_decay=0.0, hidden=16, dropout=0.0, loss="ce",
                  focal_alpha=0.25, focal_gamma=2.0, max_epochs=3, image_size=32,
                  augment=None, pretrained="none", metric="val_f1", mode="max")
    return TrialConfig(**{**values, **changes})


def tiny_checkpoint_args(epoch: int):
    """(model, optimizer, epoch, cfg, metrics) for ``write_checkpoint``: a Linear whose
    weights all equal ``epoch``, so a loaded checkpoint tells which epoch it is."""
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, float(epoch))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, optimizer, epoch, trial_config(), {"val_f1": 0.5}


# --- checkpoints ------------------------------------------------------------------------

def test_a_checkpoint_carries_its_recipe(tmp_path):
    """What leaderboard and export read back: the resolved config, labels and metrics."""
    model, optimizer, epoch, cfg, metrics = tiny_checkpoint_args(epoch=2)
    write_checkpoint(tmp_path, model, optimizer, epoch, cfg, metrics)
    recipe = read_recipe(tmp_path)
    assert recipe["epoch"] == 2 and recipe["metrics"] == metrics
    assert TrialConfig.from_dict(recipe["config"]) == cfg
    assert recipe["label_names"] == list(TASKS["binary"].label_names)
    state, _ = load_checkpoint(tmp_path)
    assert state["epoch"] == 2 and torch.equal(state["model"]["weight"], torch.full((2, 3), 2.0))
    assert load_optimizer(tmp_path)["param_groups"][0]["lr"] == 0.1
    (tmp_path / "optimizer.pt").unlink()  # trimmed: the checkpoint is still whole
    assert read_recipe(tmp_path)["epoch"] == 2 and load_optimizer(tmp_path) is None


def test_a_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """What this shows: each epoch's checkpoint goes to a fresh folder (train.py writes
    it in a temporary folder that Ray copies and registers only once complete), so a
    write that fails half way (simulated: torch.save writes half its bytes, then
    raises ENOSPC) leaves the previous checkpoint untouched and loadable, and the
    half-written one is refused rather than loaded. It does not fill a real disk."""
    good, cut = tmp_path / "checkpoint_000000", tmp_path / "checkpoint_000001"
    for folder in (good, cut):
        folder.mkdir()
    write_checkpoint(good, *tiny_checkpoint_args(epoch=1))
    real_save = torch.save

    def save_until_full(obj, path, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        Path(path).write_bytes(buffer.getvalue()[: buffer.tell() // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(OSError, match="No space left"):
        write_checkpoint(cut, *tiny_checkpoint_args(epoch=2))
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
    marker = tmp_path / "code-ran"
    if recipe == "plain":
        config = {"task": "binary", "metric": "val_f1", "mode": "max", "backbone": "resnet18"}
        (tmp_path / RECIPE_FILE).write_text(json.dumps(
            {"epoch": 1, "config": config, "metrics": {}}))
    else:
        write_checkpoint(tmp_path, *tiny_checkpoint_args(epoch=1))
    torch.save({"model": Payload(marker), "epoch": 1}, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(DamagedCheckpoint, match="(?i)weights only load failed|altered"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def test_every_torch_load_is_weights_only():
    for path in (ROOT / "covid_tune").glob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path.name}:{number}: {line.strip()}"


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_an_older_one(tmp_path):
    cfg = trial_config(lr=0.01, hidden=8, metric="val_loss", mode="min")
    model = build_model("resnet18", 2, 8, 0.0, 0, "none")
    optimizer = build_optimizer(model, cfg)
    for epoch in (1, 2):
        folder = tmp_path / "trial" / f"checkpoint_{epoch - 1:06d}"
        folder.mkdir(parents=True)
        write_checkpoint(folder, model, optimizer, epoch, cfg, {"val_loss": 1.0 / epoch})
    newest = tmp_path / "trial" / "checkpoint_000001"
    data = (newest / CHECKPOINT_FILE).read_bytes()
    (newest / CHECKPOINT_FILE).write_bytes(data[: len(data) // 2])  # a copy cut short

    assert not is_intact(newest) and is_intact(tmp_path / "trial" / "checkpoint_000000")
    with pytest.raises(DamagedCheckpoint, match="cut short"):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match="trying an older checkpoint"):
        epoch, _ = restore(model, optimizer, tune.Checkpoint(str(newest)), Base.of(model, cfg))
    assert epoch == 1


@pytest.mark.slow
def test_a_trial_goes_on_from_its_newest_checkpoint_with_the_optimizer_or_warns(tmp_path):
    """The newest checkpoint (with ``optimizer.pt``) restores weights and momentum; an
    older one, trimmed to weights, restores the weights and starts the optimizer
    afresh, saying so; a gone folder (a finished trial keeps only its best) is passed
    over."""
    torch.manual_seed(0)
    cfg = trial_config(lr=0.01, hidden=8, metric="val_loss", mode="min", frozen_layers=10)
    model = build_model("resnet18", 2, 8, 0.0, 10, "none")
    base = Base.of(model, cfg)
    optimizer = build_optimizer(model, cfg)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    folder = tmp_path / "trial" / "checkpoint_000000"
    folder.mkdir(parents=True)
    write_checkpoint(folder, model, optimizer, 1, cfg, {"val_loss": 1.0}, base=base)
    torch.manual_seed(0)  # as the trainable does: the same seed builds the same base
    again = build_model("resnet18", 2, 8, 0.0, 10, "none")
    fresh = build_optimizer(again, cfg)
    base = Base.of(again, cfg)
    assert restore(again, fresh, tune.Checkpoint(str(folder)), base) == (1, {"val_loss": 1.0})
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 again.state_dict().values()))
    assert fresh.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    (folder / "optimizer.pt").unlink()
    gone = tmp_path / "trial" / "checkpoint_000001"
    with pytest.warns(UserWarning, match="no optimizer state"):
        assert restore(again, build_optimizer(again, cfg), tune.Checkpoint(str(gone)),
                       base)[0] == 1


# --- publishing an epoch while the next one trains --------------------------------------

def test_an_epochs_state_is_a_copy_the_next_epoch_cannot_change(tmp_path):
    """The publisher writes the checkpoint while the model trains on: what it writes
    must be the epoch's weights and momentum, not whatever they are by then."""
    model, optimizer, epoch, cfg, metrics = tiny_checkpoint_args(epoch=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = EpochState.take(model, optimizer)
    weight = model.weight.detach().clone()
    momentum = optimizer.state[model.weight]["momentum_buffer"].clone()
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()  # the next epoch moves both in place
    assert not torch.equal(model.weight, weight)
    assert torch.equal(state.weights["weight"], weight)
    saved = state.optimizer["state"][0]["momentum_buffer"]
    assert torch.equal(saved, momentum) and saved.device.type == "cpu"
    assert state.optimizer["param_groups"][0]["momentum"] == 0.9


def test_the_epoch_state_leaves_out_what_equals_the_base():
    cfg = trial_config()
    torch.manual_seed(cfg.seed)
    model = build_model("resnet18", 2, 16, 0.0, 0, "none")
    base = Base.of(model, cfg)
    with torch.no_grad():
        model.net.conv1.weight.add_(1.0)  # trained; every other backbone tensor is not
    state = EpochState.take(model, build_optimizer(model, cfg), base)
    assert "net.conv1.weight" in state.weights and "net.layer1.0.conv1.weight" in state.unchanged
    assert not set(state.unchanged) & set(state.weights)
    assert set(state.unchanged) | set(state.weights) == set(model.state_dict())


def test_the_publisher_runs_one_epoch_at_a_time_and_raises_what_it_raised():
    import threading
    import time

    publisher, done, overlapping = Publisher(), [], []
    busy = threading.Lock()

    def work(n):
        def run():
            if not busy.acquire(blocking=False):
                overlapping.append(n)
                return
            time.sleep(0.05)
            done.append(n)
            busy.release()
        return run

    for n in range(3):
        publisher.submit(work(n))
    publisher.wait()
    assert done == [0, 1, 2] and overlapping == []

    def fails():
        raise OSError(errno.ENOSPC, "No space left on device")
    publisher.submit(fails)
    with pytest.raises(OSError, match="No space"):
        publisher.submit(work(3))  # the failure surfaces at the next hand-over
    assert done == [0, 1, 2]
    publisher.wait()  # raised once, not again

    def stopped():
        raise SystemExit(0)  # how Tune ends a stopped trial's report
    publisher.submit(stopped)
    with pytest.raises(SystemExit):
        publisher.wait()


# --- one epoch: training and evaluation -------------------------------------------------

@pytest.mark.slow
def test_a_last_batch_of_one_never_reaches_batchnorm():
    """ResNet-18 at 32 px, 17 images in batches of 8: the 17th joins the second batch
    (BatchNorm raises on a training batch of one), and every image is still seen."""
    import numpy as np

    from covid_tune.data.dataset import Split
    from covid_tune.nn.device import Device
    from covid_tune.training.trial import batches, build_training, train_one_epoch

    assert [len(b) for b in batches(17, 8, no_single=True)] == [8, 9]
    assert [len(b) for b in batches(17, 8)] == [8, 8, 1]
    assert [len(b) for b in batches(16, 8, no_single=True)] == [8, 8]
    cfg = trial_config(backbone="resnet18", frozen_layers=0, batch_size=8)
    rng = np.random.default_rng(0)
    split = Split(images=rng.integers(0, 255, (17, 32, 32), dtype=np.uint8),
                  targets=np.arange(17) % 2, names=[f"{i}.png" for i in range(17)])
    device = Device.pick()
    model, optimizer, scaler, loss_fn = build_training(cfg, device)
    result = train_one_epoch(model, split, loss_fn, optimizer, scaler, cfg, device, 1)
    assert len(result.targets) == 17


def test_each_split_a_trial_sees_is_reported_and_the_choosing_one_tunes_thresholds():
    """With a selection split the epoch reports ``train_*``, ``sel_*`` and ``val_*``;
    the thresholds come from the selection split's outputs by the space's rule, and
    without one from validation's."""
    import numpy as np

    from covid_tune.core.space import Threshold
    from covid_tune.core.tasks import BINARY
    from covid_tune.training.trial import EpochResult, choose_thresholds, epoch_metrics

    def result(targets, prob):
        logits = np.stack([np.zeros(len(prob)), np.log(prob / (1 - prob))], axis=1)
        return EpochResult(0.5, logits, np.asarray(targets), len(prob), 1.0)

    def halfway(a, b):  # the log-odds halfway between two probabilities' log-odds
        return (np.log(a / (1 - a)) + np.log(b / (1 - b))) / 2

    results = {"train": result([0, 1, 0, 1], np.array([0.2, 0.7, 0.4, 0.9])),
               "selection": result([0, 1, 0, 1], np.array([0.3, 0.35, 0.1, 0.8])),
               "validation": result([1, 0, 1, 0], np.array([0.6, 0.2, 0.9, 0.55]))}
    cfg = trial_config(threshold=Threshold("f1"))
    chosen = choose_thresholds(BINARY, results, cfg)
    cut = chosen["threshold_logits"]["infected"]
    assert cut == pytest.approx(halfway(0.3, 0.35))
    temperature = chosen["temperatures"]["infected"]
    assert chosen["thresholds"]["infected"] == pytest.approx(1 / (1 + np.exp(-cut / temperature)))
    assert chosen["threshold_rule"] == {"rule": "f1", "target": None, "split": "selection",
                                        "untuned": [], "degenerate": {}}
    # every split is scored at the thresholds tuned on the choosing split
    metrics, confusion = epoch_metrics(BINARY, results, 3, 0.01, chosen["threshold_logits"])
    assert {"train_f1", "sel_f1", "sel_auroc", "val_f1", "val_auroc"} <= set(metrics)
    assert metrics["sel_f1"] == 1.0  # 0.35 and 0.8 called infected, both are
    assert metrics["val_accuracy"] == 0.75  # 0.55 called infected too
    assert confusion == [[1, 1], [0, 2]]  # validation's, for TensorBoard
    del results["selection"]
    chosen = choose_thresholds(BINARY, results, trial_config(
        threshold=Threshold("sensitivity", 1.0)))
    assert chosen["threshold_rule"]["split"] == "validation"
    assert chosen["threshold_logits"]["infected"] == pytest.approx(halfway(0.6, 0.55))


@pytest.mark.slow
def test_evaluating_the_object_stores_read_only_arrays_warns_of_nothing():
    """Ray hands trials read-only arrays; torch warned once per trial about them."""
    import warnings

    import numpy as np

    from covid_tune.data.dataset import Split
    from covid_tune.nn.device import Device
    from covid_tune.training.trial import build_training, evaluate

    rng = np.random.default_rng(0)
    split = Split(images=rng.integers(0, 255, (6, 32, 32), dtype=np.uint8),
                  targets=np.arange(6) % 2, names=[f"{i}.png" for i in range(6)])
    split.images.setflags(write=False)
    split.targets.setflags(write=False)
    cfg = trial_config()
    model, _, _, loss_fn = build_training(cfg, Device.pick())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = evaluate(model, split, loss_fn, cfg, Device.pick())
    assert result.outputs.shape == (6, 2)
