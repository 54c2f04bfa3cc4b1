"""What a trained model costs to deploy, measured in the trial that trains it: its
parameter count, and ONNX Runtime's CPU latency per image at batch 1.

The latency is measured the same way in every trial, on the node that runs it: the
model (architecture only; weights do not change the time) exported to ONNX, one
ONNX Runtime thread, ``WARMUP`` runs, then the median of ``REPEATS``. A process measures
each architecture once (``measured``), so a reused actor does not time the same
backbone again while other trials train beside it.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
import warnings

import numpy as np
import torch

WARMUP = 5
REPEATS = 30

measured: dict[tuple, float] = {}
"""(backbone, image size, outputs, hidden) -> latency in ms, for this process."""


def trial_costs(model: torch.nn.Module, cfg) -> dict:
    """The costs a trial reports with every epoch (``TrialConfig`` ``cfg``):
    ``params`` always, ``latency_ms`` when the sweep searches it."""
    costs: dict = {"params": parameter_count(model)}
    if "latency_ms" in cfg.objectives:
        key = (cfg.task, cfg.backbone, cfg.image_size, cfg.hidden)
        costs["latency_ms"] = onnx_latency_ms(model, cfg.image_size, key)
    return costs


def parameter_count(model: torch.nn.Module) -> int:
    """Every parameter of the model, frozen ones included (what a deployment stores)."""
    return sum(p.numel() for p in model.parameters())


def onnx_latency_ms(model: torch.nn.Module, image_size: int, key: tuple) -> float:
    """The median latency of one image through the model in ONNX Runtime on one CPU
    thread, in milliseconds (measured once per ``key`` in this process)."""
    if key not in measured:
        measured[key] = _measure(model, image_size)
    return measured[key]


def _measure(model: torch.nn.Module, image_size: int) -> float:
    import onnxruntime as ort

    image = torch.zeros(1, 3, image_size, image_size)
    plain = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format).eval()
    with tempfile.TemporaryDirectory(prefix="covid-tune-latency-") as folder:
        path = os.path.join(folder, "model.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(plain, (image,), path, dynamo=True, external_data=False,
                              verbose=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.zeros((1, 3, image_size, image_size), np.float32)}
    for _ in range(WARMUP):
        session.run(None, feed)
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)
