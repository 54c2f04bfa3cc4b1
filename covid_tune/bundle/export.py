"""The best model of each task, exported so it runs without the training code.

``export_best`` finds, over the given runs, the trial whose best checkpoint scores best
on the sweep's metric, one per task, and writes the bundle ``<out>/<task>/`` that
``covid_tune.bundle.format`` describes: the network captured with ``torch.export``
(``model.pt2``, the program PyTorch users load without the training code) and in ONNX,
which also gives the last feature maps for Grad-CAM (``covid_tune.bundle.cam``). Both are
checked against PyTorch on random input before they are kept. Nothing here imports Ray or the
training code.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from covid_tune.bundle.format import ONNX_FILE, PROGRAM_FILE, README_FILE, WEIGHTS_FILE, write_card
from covid_tune.bundle.pick import Pick, choose, cost_value, run_data, trial_costs
from covid_tune.core.metrics import threshold_labels
from covid_tune.core.space import COSTS
from covid_tune.core.tasks import POSITIVE_CLASS, TASKS
from covid_tune.data.dataset import scan
from covid_tune.data.preprocess import describe
from covid_tune.nn.models import WithFeatures, cam_spec
from covid_tune.nn.weights import load_model
from covid_tune.runs.reader import (
    DataChoice,
    RunInfo,
    TrialRecord,
    best_overall,
    choose_datasets,
    chooser,
    read_run,
)

RTOL, ATOL = 1e-3, 1e-4
"""How close ONNX Runtime's and the saved program's logits must be to PyTorch's."""


def export_best(run_dirs: list[str], out: str, data: list[str] | None = None,
                allow_changed_data: bool = False, pick: str = "best") -> list[Path]:
    """Export the trial of each task found in ``run_dirs`` that ``pick`` chooses to
    ``out/<task>/``: by default the best (``best_overall``), or another rule on the
    Pareto front of the metric and a deploy cost (``covid_tune.bundle.pick``). Every
    task's trial is chosen before anything is written, so a refusal writes nothing.

    ``data`` (one folder for all runs, or one per run) points at moved copies of the
    datasets, used for the model card's counts and checked against each run's manifest.
    """
    runs = [read_run(d) for d in run_dirs]
    choices = choose_datasets(runs, data or [], allow_changed_data)
    for run in runs:
        for note in [*run.notes, *choices[run.name].notes]:
            print(f"note: {run.name}: {note}")
    chosen = [pick_trial([r for r in runs if r.task == task], pick, choices)
              for task in TASKS if any(r.task == task for r in runs)]
    return [export_model(run, record, Path(out) / run.task, choices[run.name].root, picked)
            for run, record, picked in chosen]


def pick_trial(runs: list[RunInfo], rule: str, choices: dict[str, DataChoice]
               ) -> tuple[RunInfo, TrialRecord, Pick | None]:
    """The run and trial to export of one task's runs, and the pick the card states:
    None for ``best`` on runs whose trials report no deploy cost (the card as before)."""
    best_run, best = best_overall(runs)
    if rule == "best" and not trial_costs(runs):
        return best_run, best, None
    picked = choose(runs, rule, lambda: run_data(best_run, choices[best_run.name]))
    return next(r for r in runs if r.name == picked.record.run), picked.record, picked


def export_model(run: RunInfo, record: TrialRecord, folder: Path,
                 data_root: Path | None = None, picked: Pick | None = None) -> Path:
    """Write the five files of one exported model; return the folder. ``picked``: how
    the trial was chosen on the Pareto front, for the card."""
    folder.mkdir(parents=True, exist_ok=True)
    model = load_model(record.local_checkpoint())
    size = int(record.config["image_size"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / WEIGHTS_FILE)
    _, checks = write_program(model, folder / PROGRAM_FILE, size)
    checks.update(write_onnx(model, folder / ONNX_FILE, size))
    card = {**model_card(run, record, checks), "cam": cam_spec(model)}
    if picked is not None:
        card["pick"] = pick_card(picked)
    write_card(folder, card)
    (folder / README_FILE).write_text(readme(card, data_counts(data_root, record.task,
                                                              run.space.data)))
    return folder


def random_images(batch: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def write_program(model: torch.nn.Module, path: Path, size: int):
    """Capture the network with ``torch.export`` (batch axis dynamic), save it, load it
    back and check it against the eager model; (the program, its check)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (random_images(2, size, 0),),
                                      dynamic_shapes=({0: batch},))
        torch.export.save(program, str(path))
        loaded = torch.export.load(str(path)).module()
    x = random_images(3, size, 2)
    with torch.no_grad():
        diff = check_close("torch.export", loaded(x).numpy(), model, x)
    return program, {"program_max_abs_diff": diff}


def write_onnx(model: torch.nn.Module, path: Path, size: int) -> dict:
    """Export to ONNX with the dynamo exporter (batch axis dynamic), giving the logits
    and, for Grad-CAM, the last feature maps; check it with ONNX Runtime. The check
    and the opset the file uses."""
    import onnx
    import onnxruntime as ort

    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(WithFeatures(model), (random_images(2, size, 0),), str(path),
                          dynamo=True, external_data=False, input_names=["images"],
                          output_names=["logits", "features"],
                          dynamic_shapes=({0: batch},), verbose=False)
    onnx.checker.check_model(str(path))
    opset = next(o.version for o in onnx.load(str(path)).opset_import
                 if o.domain in ("", "ai.onnx"))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = random_images(3, size, 1)
    diff = check_close("ONNX", session.run(["logits"], {"images": x.numpy()})[0], model, x)
    return {"onnx_max_abs_diff": diff, "onnx_opset": int(opset)}


@torch.no_grad()
def check_close(name: str, outputs: np.ndarray, model: torch.nn.Module, x: torch.Tensor) -> float:
    """Largest difference from PyTorch's logits; RuntimeError beyond the tolerance."""
    expected = model(x).numpy()
    diff = float(np.max(np.abs(outputs - expected)))
    if outputs.shape != expected.shape or diff > ATOL + RTOL * float(np.max(np.abs(expected))):
        raise RuntimeError(f"the exported {name} model disagrees with PyTorch: shapes "
                           f"{outputs.shape} vs {expected.shape}, largest difference {diff:.3g}")
    return diff


def model_card(run: RunInfo, record: TrialRecord, checks: dict) -> dict:
    """``model.json``: the recipe that lets ``predict`` run the ONNX file on its own."""
    task = TASKS[record.task]
    size = int(record.config["image_size"])
    return {
        "task": task.name,
        "backbone": record.config["backbone"],
        "files": {"onnx": ONNX_FILE, "program": PROGRAM_FILE, "weights": WEIGHTS_FILE},
        "onnx_opset": checks["onnx_opset"],
        "input": {"name": "images", "shape": ["batch", 3, size, size], "dtype": "float32"},
        "output": outputs_spec(task),
        "label_names": list(task.label_names),
        "thresholds": {name: record.thresholds.get(name, 0.5)
                       for name in threshold_labels(task)},
        "threshold_logits": {name: record.threshold_logits.get(name, 0.0)
                             for name in threshold_labels(task)},
        "threshold_rule": record.threshold_rule or {"rule": "none", "target": None,
                                                    "split": None, "untuned": []},
        "temperatures": {name: record.temperatures.get(name, 1.0)
                         for name in threshold_labels(task)},
        "preprocessing": describe(size),
        "hyperparameters": record.config,
        "epoch": record.epoch,
        "selected_by": {"metric": run.metric, "mode": run.mode, "split": chooser(run)},
        "validation_metrics": {k.removeprefix("val_"): v for k, v in record.metrics.items()
                               if k.startswith("val_")},
        "checks": checks,
        "source": {"run_dir": str(run.path), "run": run.name, "trial_id": record.trial_id,
                   "checkpoint": str(record.checkpoint), "data": run.record.provenance.data,
                   "data_fingerprint": run.record.provenance.data_fingerprint,
                   "versions": run.record.provenance.versions},
    }


def pick_card(picked: Pick) -> dict:
    """``model.json``'s ``pick``: the rule, the chosen trial's metric with its interval
    and its deploy costs (each with how it was measured), and the best trial's beside it."""
    return {"rule": picked.rule, "front_cost": picked.cost, "metric": picked.metric,
            "mode": picked.mode, **point_card(picked.record, picked.metric, picked.interval),
            "interval_note": "" if picked.interval else picked.interval_note,
            "best": {"run": picked.best.run, "trial_id": picked.best.trial_id,
                     **point_card(picked.best, picked.metric, picked.best_interval)}}


def point_card(record: TrialRecord, metric: str, interval: tuple | None) -> dict:
    """One trial's metric value, its 95% bootstrap interval (or None) and its costs."""
    costs = {cost: {"value": cost_value(record, cost), "measured": how}
             for cost, how in COSTS.items() if cost_value(record, cost) is not None}
    return {"value": record.score(metric), "interval": list(interval) if interval else None,
            "costs": costs}


def outputs_spec(task) -> dict:
    if task.multilabel:
        return {"name": "logits", "activation": "sigmoid per label",
                "label_order": list(task.label_names),
                "label_encoding": {k: list(v) for k, v in task.targets.items()},
                "implies": [list(pair) for pair in task.implies],
                "rule": "a label is on when its probability is above its threshold "
                        "(compared as log-odds: its logit above threshold_logits), and "
                        "a label another implies is on with it (implies)"}
    other = next(name for name in task.label_names if name != POSITIVE_CLASS)
    return {"name": "logits", "activation": "softmax", "class_order": list(task.label_names),
            "positive_class": POSITIVE_CLASS,
            "rule": f"{POSITIVE_CLASS} when P({POSITIVE_CLASS}) is above its threshold "
                    f"(compared as log-odds: logit {POSITIVE_CLASS} - logit {other} above "
                    f"threshold_logits)"}


def threshold_text(card: dict) -> str:
    """The card's thresholds (probability, and log-odds) and how they were chosen, in words."""
    values = ", ".join(f"{label} {value:.4g} (log-odds {card['threshold_logits'][label]:.4g})"
                       for label, value in card["thresholds"].items())
    rule = card["threshold_rule"]
    if rule.get("rule") in (None, "none"):
        return f"{values} (fixed at 0.5; this checkpoint predates tuned thresholds)"
    target = f" (sensitivity at least {rule['target']:g})" if rule.get("target") else ""
    untuned = (f"; left at 0.5 for {', '.join(rule['untuned'])} (one class only on that "
               f"split)" if rule.get("untuned") else "")
    return f"{values}, tuned by the `{rule['rule']}` rule{target} on {rule['split']}{untuned}"


def temperature_text(card: dict) -> str:
    """What the card's temperatures do, in words."""
    scale = card.get("temperatures") or {}
    if not scale or all(t == 1.0 for t in scale.values()):
        return "the model's own (no temperature was fitted)."
    values = ", ".join(f"{label} {t:.3g}" for label, t in scale.items())
    return (f"calibrated by a temperature per label ({values}), fitted on "
            f"{card['threshold_rule'].get('split') or 'the choosing split'}: "
            f"P = sigmoid(log-odds / T). Decisions are the same with or without it.")


def data_counts(root: Path | None, task: str, spec=None) -> dict[str, dict[str, int]]:
    """Images per split and class of the training data, if the folder is still there."""
    if root is None:
        return {}
    layout = scan(root, task, spec=spec)
    counts: dict[str, dict[str, int]] = {}
    for split, refs in layout.files.items():
        for ref in refs:
            per_split = counts.setdefault(split, {})
            per_split[ref.class_dir or "unlabelled"] = per_split.get(ref.class_dir or
                                                                    "unlabelled", 0) + 1
    return counts


def readme(card: dict, counts: dict) -> str:
    """The model card: what it is, how to run it, how it scored, what it was trained on."""
    hp = {k: v for k, v in card["hyperparameters"].items() if k not in ("task", "metric", "mode")
          and (card["hyperparameters"]["loss"] == "focal" or not k.startswith("focal_"))}
    metrics = card["validation_metrics"]
    size = card["preprocessing"]["size"]
    lines = [
        f"# covid-tune model: {card['task']} ({card['backbone']})", "",
        "**Not for clinical use.** A research and teaching artefact from a hyperparameter "
        "search; it has not been validated on patients and must not inform any diagnosis.", "",
        "## Use", "",
        "```bash", "covid-tune predict MODEL_DIR IMAGE_OR_FOLDER --out preds.csv", "```", "",
        f"Input `images`: float32 `[batch, 3, {size}, {size}]`; "
        f"{card['preprocessing']['steps']} (mean {card['preprocessing']['mean']}, "
        f"std {card['preprocessing']['std']}). Output `logits`: "
        f"{card['output']['activation']} over {', '.join(card['label_names'])}; "
        f"{card['output']['rule']}.", "",
        f"Thresholds: {threshold_text(card)}.", "",
        f"Probabilities: {temperature_text(card)}", "",
        f"## Validation metrics (epoch {card['epoch']}, chosen by best "
        f"`{card['selected_by']['metric']}`)", "",
        "| metric | value |", "|---|---|",
        *[f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, (int, float))], "",
        "## Training data", "",
        f"Folder `{card['source']['data']}` ({card['task']} layout).",
        *[f"- {split}: " + ", ".join(f"{c} {n}" for c, n in per.items())
          for split, per in counts.items()], "",
        "Scores on synthetic data (`covid-tune synth`, as used by `covid-tune demo` and the "
        "tests) say nothing clinically: those images are drawn phantoms, not radiographs.", "",
        *pick_lines(card.get("pick")),
        "## Hyperparameters", "",
        ", ".join(f"{k} {v}" for k, v in hp.items()), "",
        "## Source", "",
        f"Run `{card['source']['run']}` ({card['source']['run_dir']}), trial "
        f"`{card['source']['trial_id']}`, checkpoint `{card['source']['checkpoint']}`.", "",
    ]
    return "\n".join(lines)


def pick_lines(pick: dict | None) -> list[str]:
    """The README's section on how the trial was picked and what it costs; none without
    a pick."""
    if not pick:
        return []
    metric, best = pick["metric"], pick["best"]
    why = f" ({pick['interval_note']})" if pick["interval_note"] else ""
    front = (f"on the Pareto front of `{metric}` ({pick['mode']}) and `{pick['front_cost']}`"
             if pick["front_cost"] else f"by `{metric}` ({pick['mode']})")
    return [f"## Picked by `{pick['rule']}`", "",
            f"Chosen {front} (`covid-tune export --pick {pick['rule']}`).", "",
            f"- {metric}: {point_text(pick)}{why}",
            *[f"- {cost}: {cost_text(cost, c['value'])} ({c['measured']})"
              for cost, c in pick["costs"].items()],
            f"- The best trial by `{metric}`, for comparison: `{best['trial_id']}` of run "
            f"`{best['run']}`, {point_text(best)}" + "".join(
                f", {cost} {cost_text(cost, c['value'])}" for cost, c in best["costs"].items()),
            ""]


def point_text(point: dict) -> str:
    """``0.912 [0.881, 0.940] (95% bootstrap interval)``, or the value alone."""
    if not point["interval"]:
        return f"{point['value']:.4f}"
    low, high = point["interval"]
    return f"{point['value']:.4f} [{low:.4f}, {high:.4f}] (95% bootstrap interval)"


def cost_text(cost: str, value: float) -> str:
    """``3.21 ms`` or ``11,177,538 parameters``."""
    return f"{value:.3g} ms" if cost == "latency_ms" else f"{int(value):,} parameters"
