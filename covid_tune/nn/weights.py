"""A model and its checkpoint, on the torch side: where trials, re-scoring and export meet.

``covid_tune.runs.checkpoint`` owns the checkpoint's files; this module owns what the
tensors in them mean. A checkpoint stores only the tensors that moved from the trial's
base (``Base``: its pretrained file or seeded initialisation), which it records instead
of storing again. ``put_weights`` lays the stored tensors over the base, ``load_model``
rebuilds a trial's model from a checkpoint folder, ``build_for`` the untrained model of a
trial config.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from covid_tune.core.space import TrialConfig
from covid_tune.errors import UserError
from covid_tune.nn.models import BACKBONES, Classifier, build_model, imagenet_cache_path
from covid_tune.runs.checkpoint import base_file, cached_digest, load_checkpoint
from covid_tune.core.tasks import TASKS


def build_for(cfg: TrialConfig, pretrained: str = "none") -> Classifier:
    """The network a trial config describes (random head; backbone from ``pretrained``)."""
    return build_model(cfg.backbone, TASKS[cfg.task].outputs, cfg.hidden, cfg.dropout,
                       cfg.frozen_layers, pretrained)


def load_model(checkpoint: str | Path) -> Classifier:
    """A trial's model from one of its checkpoint folders, in eval mode, on the CPU: its
    base rebuilt (the pretrained file, checked by SHA-256, or the seeded
    initialisation, checked by the SHA-256 of its tensors), then the stored tensors."""
    state, recipe = load_checkpoint(checkpoint)
    cfg = TrialConfig.from_dict(recipe["config"])
    base = recipe.get("base")
    if not base:
        model = build_for(cfg)
    elif base.get("kind") == "pretrained":
        elsewhere = (imagenet_cache_path(cfg.backbone),) if base.get("source") == "imagenet" else ()
        model = build_for(cfg, base_file(base, checkpoint, elsewhere))
    else:
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left alone
            torch.manual_seed(int(base.get("seed", cfg.seed)))
            model = build_for(cfg)
        if tensors_digest(model.state_dict(), base.get("tensors", [])) != base.get("sha256"):
            raise UserError(f"{checkpoint}: its untrained layers are stored as the seeded "
                            f"initialisation of torch {torch.__version__.split('+')[0]}'s "
                            f"{cfg.backbone}, which comes out different here (another torch "
                            f"version?); load it with the torch it was trained with")
    put_weights(model, state["model"], base, checkpoint)
    return model.eval()


@dataclass
class Base:
    """What a trial started from, for its checkpoints to leave out: the recipe's
    ``base`` entry (without ``tensors``) and the tensors as they were at the start."""

    record: dict
    tensors: dict[str, torch.Tensor]
    digests: dict = field(default_factory=dict)

    @classmethod
    def of(cls, model: Classifier, cfg: TrialConfig) -> Base:
        """The base of a model just built by ``build_for(cfg, cfg.pretrained)`` after
        ``torch.manual_seed(cfg.seed)``: every backbone tensor (the new head is left
        out)."""
        head = f"net.{BACKBONES[cfg.backbone].head_attr}."
        tensors = {k: v.detach().clone() for k, v in model.state_dict().items()
                   if not k.startswith(head)}
        if cfg.pretrained == "none":
            record = {"kind": "init", "seed": cfg.seed}
        else:
            path = imagenet_cache_path(cfg.backbone) if cfg.pretrained == "imagenet" \
                else str(Path(cfg.pretrained).resolve())
            record = {"kind": "pretrained", "source": cfg.pretrained, "path": path,
                      **cached_digest(path)}
        return cls(record, tensors)

    def unchanged(self, weights: dict[str, torch.Tensor]) -> list[str]:
        """The names of ``weights`` still equal to the base."""
        return sorted(k for k, v in self.tensors.items()
                      if k in weights and torch.equal(weights[k], v))

    def entry(self, unchanged: list[str]) -> dict:
        """The recipe's ``base``: where the unchanged tensors come from, and which."""
        record = {**self.record, "tensors": unchanged}
        if record["kind"] == "init":
            key = tuple(unchanged)
            if key not in self.digests:  # the same names epoch after epoch: hashed once
                self.digests[key] = tensors_digest(self.tensors, unchanged)
            record["sha256"] = self.digests[key]
        return record

    def matches(self, recorded: dict | None) -> bool:
        """Whether a checkpoint's ``base`` is this one (a checkpoint without one stores
        every tensor)."""
        if not recorded:
            return True
        if recorded.get("kind") == "init":
            return self.entry(recorded.get("tensors", []))["sha256"] == recorded.get("sha256")
        return self.record.get("sha256") == recorded.get("sha256")


def tensors_digest(tensors: dict[str, torch.Tensor], names: list[str]) -> str:
    """SHA-256 of the named tensors' bytes, in the order given."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def put_weights(model: Classifier, stored: dict, base: dict | None, where) -> None:
    """Load a checkpoint's stored tensors over the rebuilt base: every tensor of the
    model must be stored or named by the base, and nothing else."""
    from covid_tune.runs.checkpoint import DamagedCheckpoint

    result = model.load_state_dict(stored, strict=False)
    missing = set(result.missing_keys) - set((base or {}).get("tensors", []))
    if missing or result.unexpected_keys:
        raise DamagedCheckpoint(f"{where}: the checkpoint's weights do not fit its model "
                                f"(missing {sorted(missing)[:3]}, unexpected "
                                f"{sorted(result.unexpected_keys)[:3]})")
