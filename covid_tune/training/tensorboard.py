"""TensorBoard event files for each trial: scalars per epoch, confusion matrices, HParams.

Each trial writes into its own trial folder of the run, so
``tensorboard --logdir <run dir>`` shows every trial while the sweep runs. Sampled
hyperparameters go through TensorBoard's HParams plugin; its metrics are the trial's
validation scores at its best epoch so far (``best/val_f1``, ``best/val_loss``, ...,
and ``best/epoch``), so the HParams dashboard compares trials by their best epoch.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from covid_tune.core.ranking import better
from covid_tune.core.space import PARAM_TYPES, TrialConfig
from covid_tune.core.plots import confusion_image

HPARAM_KEYS = tuple(PARAM_TYPES)
"""The sampled hyperparameters the HParams dashboard compares."""
BEST_KEYS = ("val_loss", "val_accuracy", "val_f1", "val_auroc", "epoch")
"""Values logged as ``best/<key>`` at the best epoch so far: the HParams metrics."""


def trial_dir() -> str:
    """Where this trial's files live: the run's trial folder when storage is local."""
    from ray import tune

    with contextlib.suppress(Exception):
        path = tune.get_context().get_trial_dir()
        if path and "://" not in path and os.path.isdir(path):
            return path
    return os.getcwd()


@dataclass
class TrialWriter:
    writer: SummaryWriter
    metric: str
    mode: str
    best: dict | None = None
    """The metrics of the best epoch so far."""

    @classmethod
    def open(cls, cfg: TrialConfig, log_dir: str | None = None) -> TrialWriter:
        writer = SummaryWriter(log_dir=log_dir or trial_dir(), flush_secs=10)
        params = {k: v for k, v in cfg.to_dict().items() if k in HPARAM_KEYS}
        exp, ssi, sei = hparams(params, {f"best/{k}": 0.0 for k in best_keys(cfg.metric)})
        for summary in (exp, ssi, sei):
            writer.file_writer.add_summary(summary)
        return cls(writer, cfg.metric, cfg.mode)

    def log_epoch(self, epoch: int, metrics: dict, confusion) -> None:
        """Scalars, the best epoch's metrics so far and the validation confusion image."""
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key != "epoch":
                split, _, name = key.partition("_")
                tag = f"{name}/{split}" if split in ("train", "sel", "val") else f"trial/{key}"
                self.writer.add_scalar(tag, value, epoch)
        if self.improves(metrics[self.metric]):
            self.best = {k: metrics[k] for k in best_keys(self.metric) if k in metrics}
        for key, value in self.best.items():
            self.writer.add_scalar(f"best/{key}", value, epoch)
        self.writer.add_image("confusion/val", confusion_image(confusion), epoch,
                              dataformats="HWC")
        self.writer.flush()

    def improves(self, value: float) -> bool:
        """Whether this epoch beats the best so far (``core.ranking``: a NaN epoch
        never does, and any number beats a NaN best); the first epoch always does."""
        return self.best is None or better(value, self.best.get(self.metric), self.mode)

    def close(self) -> None:
        self.writer.close()


def best_keys(metric: str) -> tuple[str, ...]:
    """The sweep's metric first, then the other ``BEST_KEYS``."""
    return tuple(dict.fromkeys((metric, *BEST_KEYS)))
