"""A trial's TensorBoard files, written by TrialWriter and read back with TensorBoard's
own reader: scalars per epoch, the best epoch's metrics, confusion images, HParams."""

from __future__ import annotations

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from covid_tune.core.space import TrialConfig
from covid_tune.training.tensorboard import HPARAM_KEYS, TrialWriter

CONFIG = TrialConfig(task="binary", backbone="resnet18", frozen_layers=0, lr=0.01,
                     momentum=0.9, batch_size=16, weight_decay=0.0, hidden=32, dropout=0.2,
                     loss="ce", focal_alpha=0.25, focal_gamma=2.0, max_epochs=3,
                     image_size=32, augment=None, pretrained="none", metric="val_f1",
                     mode="max")
VAL_F1 = (0.5, 0.8, 0.6)  # the best epoch is the second, not the last


def write_three_epochs(folder) -> EventAccumulator:
    writer = TrialWriter.open(CONFIG, log_dir=str(folder))
    for epoch, f1 in enumerate(VAL_F1, start=1):
        metrics = {"epoch": epoch, "lr": 0.01, "epoch_seconds": 1.5,
                   "train_images_per_second": 100.0, "train_loss": 0.7, "train_f1": f1,
                   "train_accuracy": f1, "val_loss": 1 - f1, "val_accuracy": f1, "val_f1": f1}
        writer.log_epoch(epoch, metrics, [[3, 1], [1, 3]])
    writer.close()
    events = EventAccumulator(str(folder))
    events.Reload()
    return events


def values(events: EventAccumulator, tag: str) -> list[float]:
    return [round(e.value, 6) for e in events.Scalars(tag)]


def test_scalars_per_epoch_and_confusion_images(tmp_path):
    events = write_three_epochs(tmp_path)
    assert values(events, "f1/val") == list(VAL_F1)
    for tag in ("loss/train", "loss/val", "accuracy/val", "trial/lr", "trial/epoch_seconds",
                "images_per_second/train"):
        assert len(events.Scalars(tag)) == 3, tag
    assert len(events.Images("confusion/val")) == 3


def test_best_metrics_follow_the_best_epoch(tmp_path):
    events = write_three_epochs(tmp_path)
    assert values(events, "best/val_f1") == [0.5, 0.8, 0.8]
    assert values(events, "best/epoch") == [1, 2, 2]
    assert values(events, "best/val_loss") == [0.5, 0.2, 0.2]


def test_hparams_name_the_sampled_values_and_best_metrics(tmp_path):
    events = write_three_epochs(tmp_path)
    content = events.PluginTagToContent("hparams")
    start = hparams_metadata.parse_session_start_info_plugin_data(
        content[hparams_metadata.SESSION_START_INFO_TAG])
    assert set(start.hparams) == set(HPARAM_KEYS)
    assert start.hparams["lr"].number_value == 0.01
    experiment = hparams_metadata.parse_experiment_plugin_data(
        content[hparams_metadata.EXPERIMENT_TAG])
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert {"best/val_f1", "best/val_loss", "best/val_accuracy", "best/epoch"} <= metrics


def test_every_trial_of_a_real_sweep_logs_to_tensorboard(swept):
    """TensorBoard's own reader finds scalars, images and HParams in every trial."""
    for run in (swept.binary, swept.multilabel):
        trials = sorted(run.glob("trial_*"))
        assert trials
        for trial in trials:
            events = EventAccumulator(str(trial))
            events.Reload()
            tags = events.Tags()
            assert {"loss/train", "loss/val", "accuracy/val", "f1/val", "trial/lr",
                    "trial/epoch_seconds", "images_per_second/train",
                    "best/val_f1", "best/val_loss"} <= set(tags["scalars"])
            assert "confusion/val" in tags["images"]
            content = events.PluginTagToContent("hparams")
            start = hparams_metadata.parse_session_start_info_plugin_data(
                content[hparams_metadata.SESSION_START_INFO_TAG])
            assert {"backbone", "lr"} <= set(start.hparams)
    events = EventAccumulator(str(next(swept.multilabel.glob("trial_*"))))
    events.Reload()
    assert {"f1_covid/val", "f1_normal/val", "f1_pneumonia/val", "f1/sel", "auroc/sel",
            "best/sel_f1", "best/val_auroc"} <= set(events.Tags()["scalars"])


def test_hparams_dashboard_compares_best_epochs_by_the_sweeps_metric(swept):
    events = EventAccumulator(str(next(swept.binary.glob("trial_*"))))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    experiment = hparams_metadata.parse_experiment_plugin_data(
        content[hparams_metadata.EXPERIMENT_TAG])
    assert "best/val_loss" in {m.name.tag for m in experiment.metric_infos}
