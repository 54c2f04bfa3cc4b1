"""What a trained model costs to deploy, measured in the trial that trains it: its
parameter count, and ONNX Runtime's CPU latency per image at batch 1.

The latency is measured the same way in every trial, on the node that runs it: the
model (architecture only; weights do not change the time) exported to ONNX, one
ONNX Runtime thread, ``WARMUP`` runs, then the median of ``REPEATS``. Each architecture
is measured once per node: the figure is kept in the node's cache folder
(``LATENCY_FILE`` under ``$COVID_TUNE_CACHE``, by architecture, image size and ONNX
Runtime version) and in the process (``measured``), so every trial of one architecture
reports the same figure, in this sweep and the next, and the front compares
architectures rather than the noise of trials training beside the timing.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import tempfile
import time
import warnings

import numpy as np
import torch

WARMUP = 5
REPEATS = 30

LATENCY_FILE = "latency.json"

measured: dict[tuple, float] = {}
"""(task, backbone, image size, hidden) -> latency in ms, for this process."""


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
        measured[key] = node_latency(key, lambda: _measure(model, image_size))
    return measured[key]


def node_latency(key: tuple, measure) -> float:
    """The figure this node's cache keeps for ``key``, else ``measure()``'s, kept there
    for the next trial (a cache that cannot be read or written is measured around)."""
    import onnxruntime as ort

    from covid_tune.data.dataset import cache_dir
    from covid_tune.runs.storage import write_bytes

    path = cache_dir() / LATENCY_FILE
    name = "|".join(map(str, (*key, f"onnxruntime {ort.__version__}")))
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        kept = {}
    kept = kept if isinstance(kept, dict) else {}
    if isinstance(kept.get(name), (int, float)):
        return float(kept[name])
    value = measure()
    try:
        write_bytes(str(path), json.dumps({**kept, name: value}, indent=1).encode())
    except OSError:
        pass
    return value


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
