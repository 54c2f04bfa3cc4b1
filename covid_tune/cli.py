"""The ``covid-tune`` command: each subcommand maps to one function.

A ``UserError`` (bad data, bad YAML, bad flag) prints one line and exits with code 2;
``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import math
import os
import re
import signal
import sys
import tempfile
import threading
import traceback
import types
import typing
from pathlib import Path

from covid_tune.errors import Stalled, Stopped, UserError


class AtLeast(argparse.Action):
    """A numeric flag with a least value (``inclusive=False``: it must be more): one out
    of range, or not a finite number, is refused by name as it is parsed (a UserError,
    so one ``covid-tune: error:`` line and exit 2)."""

    def __init__(self, *args, least: float, inclusive: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.least, self.inclusive = least, inclusive

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        least = self.least
        if not math.isfinite(value) or value < least or (value == least and not self.inclusive):
            bound = f"at least {least}" if self.inclusive else f"more than {least}"
            raise UserError(f"{option_string} {value}: out of range; use {bound}")
        setattr(namespace, self.dest, value)


def field_docs(cls) -> dict[str, str]:
    """Each field of the dataclass ``cls`` -> the docstring under it in its source."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {node.target.id: inspect.cleandoc(after.value.value)
            for node, after in itertools.pairwise(body)
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)}


def add_option_flags(parser: argparse.ArgumentParser, names: tuple[str, ...] = (),
                     **helps: str) -> None:
    """A flag for each ``SweepOptions`` field (or the fields ``names``), all from the
    field: ``--num-samples`` for ``num_samples`` (or ``metadata["flag"]``), required
    without a default, its type and default, its least value (``record.at_least``) and
    its docstring as the help, unless ``helps`` gives a command's own."""
    from covid_tune.runs.record import SweepOptions

    hints, docs = typing.get_type_hints(SweepOptions), field_docs(SweepOptions)
    for f in dataclasses.fields(SweepOptions):
        if names and f.name not in names:
            continue
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        required = f.default is dataclasses.MISSING and factory is None
        text = " ".join(helps.get(f.name, docs[f.name]).replace("``", "").split())
        if not required and f.default is not None and f.default is not False and f.default != "":
            text = f"{text.rstrip('.')} (default: {f.default})."
        kwargs = {"dest": f.name, "help": text.replace("%", "%%")}
        kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],)
                    if t is not types.NoneType)
        if kind is bool:
            parser.add_argument(flag, action="store_true", **kwargs)
            continue
        kwargs["metavar"] = flag[2:].upper().replace("-", "_")
        if "least" in f.metadata:
            kwargs.update(action=AtLeast, **f.metadata)
        if "nargs" in f.metadata:
            kwargs["nargs"] = f.metadata["nargs"]
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = factory() if factory else f.default
        parser.add_argument(flag, type=kind, **kwargs)


def sweep_options(args):
    """The ``SweepOptions`` of a parsed ``sweep`` command line (``add_option_flags``)."""
    from covid_tune.runs.record import SweepOptions

    return SweepOptions(**{f.name: getattr(args, f.name)
                           for f in dataclasses.fields(SweepOptions)})


def require_writable(path: str, flag: str, file: bool = False) -> None:
    """Refuse up front an output folder (or the folder of an output ``file``) that
    cannot be created or written to.

    The folder need not exist: its nearest existing parent must be a folder this
    process can create files in. Remote URIs (s3://, gs://) are left to Ray.
    """
    if "://" in path:
        return
    folder = Path(path).expanduser().absolute()
    folder = folder.parent if file else folder
    existing = next(p for p in (folder, *folder.parents) if os.path.exists(p))
    if not os.path.isdir(existing):
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder; choose another path")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".covid-tune-probe"):
            pass
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot write in {existing} ({exc.strerror}); choose "
                        f"a folder you may write to") from None


def cmd_check(args) -> int:
    from covid_tune.data.check import check_dataset

    report = check_dataset(args.data, args.task, progress=not args.quiet, patient=args.patient)
    print("\n".join(report.lines()))
    if not report.usable:
        empty = [split for split, classes in report.counts.items() if not sum(classes.values())]
        raise UserError(f"{report.root}: no image of the {', '.join(empty)} split(s) can be "
                        f"decoded; replace the files listed above")
    if args.strict and report.unreadable:
        path, why = report.unreadable[0]
        raise UserError(f"{report.root}/{path}: cannot be decoded ({why}); "
                        f"{len(report.unreadable)} such file(s); remove them or drop --strict")
    return 0


def cmd_synth(args) -> int:
    from covid_tune.data.synth import PHANTOM_NOTE, generate

    require_writable(args.out, "out")
    counts = generate(Path(args.out), args.task, scale=args.scale, size=args.size,
                      seed=args.seed, progress=not args.quiet, layout=args.layout,
                      fmt=args.format, contrast=args.contrast, noise=args.noise)
    total = sum(sum(c.values()) for c in counts.values())
    print(f"wrote {total} images to {args.out} ({args.layout or args.task} layout)")
    print(PHANTOM_NOTE)
    return 0


def cmd_sweep(args) -> int:
    from covid_tune.search.sweep import run_sweep

    require_writable(args.storage_path, "--storage-path")
    return exit_code(run_sweep(sweep_options(args)))


def cmd_resume(args) -> int:
    from covid_tune.search.sweep import resume_sweep

    return exit_code(resume_sweep(args.run_dir, address=args.address, data=args.data,
                                  allow_changed_data=args.allow_changed_data,
                                  mlflow=args.mlflow, num_samples=args.num_samples,
                                  time_budget=args.time_budget))


def exit_code(results) -> int:
    """1, with the first error on one line, when every trial failed; else 0."""
    from covid_tune.search.sweep import failure_summary

    summary = failure_summary(results)
    if summary:
        print(f"covid-tune: {summary}", file=sys.stderr)
        return 1
    return 0


def cmd_leaderboard(args) -> int:
    from covid_tune.results.leaderboard import write_leaderboard

    if args.out:
        require_writable(args.out, "--out")
    print(write_leaderboard(args.run_dirs, args.out, args.data, args.allow_changed_data,
                            external_collections(args.external)))
    return 0


def external_collections(pairs: list[str]) -> dict[str, str]:
    """``--external NAME=DIR ...`` as name -> folder (or CSV); UserError for a pair
    that is not one, a name that cannot head a column, or a name given twice."""
    found: dict[str, str] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not path or not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
            raise UserError(f"--external {pair}: expected NAME=DIR, a short name (letters, "
                            f"digits, _ . -) and a labelled collection, e.g. site2=/data/site2")
        if name in found:
            raise UserError(f"--external {pair}: the name {name} is given twice; name each "
                            f"collection once")
        found[name] = path
    return found


def cmd_export(args) -> int:
    from covid_tune.bundle.export import export_best

    require_writable(args.out, "--out")
    registry = None
    if args.mlflow:
        from covid_tune.bundle.registry import open_registry, register_bundle

        registry = open_registry(args.mlflow)  # refused before anything is exported
    for folder in export_best(args.run_dirs, args.out, args.data, args.allow_changed_data,
                              args.pick):
        print(f"exported {folder}")
        if registry is not None:
            print(register_bundle(registry, folder, args.registered_name))
    return 0


def cmd_predict(args) -> int:
    from covid_tune.bundle.predict import predict

    require_writable(args.out, "--out", file=True)
    if args.cam:
        require_writable(args.cam, "--cam")
    summary = predict(args.model_dir, args.input, args.out, args.cam)
    print(summary)
    return 0


def cmd_evaluate(args) -> int:
    from covid_tune.bundle.evaluate import evaluate

    require_writable(args.out or ".", "--out")
    print(evaluate(args.model_dir, args.data, args.out, args.classes))
    return 0


def cmd_bench(args) -> int:
    if args.real:
        from covid_tune.bench.real import run_soak

        run_soak(json_path=args.json)
        return 0
    from covid_tune.bench.measure import run_bench

    run_bench(quick=args.quick, json_path=args.json)
    return 0


def cmd_demo(args) -> int:
    from covid_tune.runs.record import SweepOptions
    from covid_tune.search.sweep import run_sweep
    from covid_tune.data.synth import PHANTOM_NOTE, generate

    require_writable(args.out, "--out")
    out = Path(args.out).resolve()
    data = out / "data"
    if not data.exists():
        generate(data, "binary", scale=args.scale, size=96, seed=args.seed)
    print(f"demo data: {data} ({PHANTOM_NOTE})")
    opts = SweepOptions(space_file="demo", data=str(data), name=args.name,
                        storage_path=str(out / "runs"), seed=args.seed)
    results = run_sweep(opts)
    if exit_code(results):
        return 1
    run_dir = str(out / "runs" / args.name)
    from covid_tune.bundle.export import export_best
    from covid_tune.results.leaderboard import write_leaderboard

    print(write_leaderboard([run_dir], str(out / "leaderboard")))
    for folder in export_best([run_dir], str(out / "model")):
        print(f"best model exported to {folder}")
    return 0


def add_data_flags(parser: argparse.ArgumentParser, many: bool) -> None:
    """``--data`` (a moved copy of the run's dataset) and ``--allow-changed-data``."""
    if many:
        parser.add_argument("--data", action="append", metavar="DIR",
                            help="the dataset folder (or CSV manifest), if it moved: once for every run, or "
                                 "once per run in order (checked against each run's record)")
    else:
        parser.add_argument("--data", metavar="DIR",
                            help="the dataset folder (or CSV manifest), if it moved (checked "
                                 "against the run)")
    parser.add_argument("--allow-changed-data", action="store_true",
                        help="use a dataset that differs from the run's record (noted)")


def pick_rules() -> list[str]:
    """``export --pick``'s rules and aliases (``covid_tune.core.pareto``)."""
    from covid_tune.core.pareto import ALIASES, RULES

    return [*RULES, *ALIASES]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covid-tune",
        description="Distributed hyperparameter search for chest X-ray classifiers.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="check a dataset folder or CSV manifest")
    p.add_argument("data", help="dataset root folder, or a CSV manifest (path,labels[,split])")
    p.add_argument("--task", choices=["binary", "multilabel"])
    p.add_argument("--strict", action="store_true", help="exit 2 if any file is unreadable")
    p.add_argument("--patient", metavar="REGEX",
                   help="a regular expression on file names whose first group is the "
                        "patient (default: the layout's own rule, where it has one)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("synth", help="write a synthetic phantom dataset")
    p.add_argument("out")
    p.add_argument("--task", choices=["binary", "multilabel"], required=True)
    p.add_argument("--scale", type=float, default=0.05, action=AtLeast, least=0,
                   inclusive=False, help="fraction of the real counts")
    p.add_argument("--size", type=int, default=128, action=AtLeast, least=32,
                   help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, action=AtLeast, least=0)
    p.add_argument("--layout", help="a published layout to write instead of the "
                                    "assignment's, e.g. kaggle-pneumonia, or csv-manifest")
    p.add_argument("--format", choices=["png", "dicom"], default="png",
                   help="write PNGs, or DICOM files (.dcm) with patients and views")
    p.add_argument("--contrast", type=float, default=1.0, action=AtLeast, least=0,
                   inclusive=False, help="another scanner: each image's range around its "
                                         "mean times this (default: 1, as always drawn)")
    p.add_argument("--noise", type=float, default=0.0, action=AtLeast, least=0,
                   help="another scanner: Gaussian noise of this standard deviation, in "
                        "8-bit units (default: 0)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("sweep", help="run a hyperparameter search")
    add_option_flags(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("resume", help="continue a sweep whose driver stopped")
    p.add_argument("run_dir")
    add_option_flags(p, ("address", "mlflow", "num_samples", "time_budget"),
                     address="The Ray cluster to join (auto, HOST:PORT); none: the one the "
                             "sweep used.",
                     mlflow="Track the sweep in this MLflow server (http://HOST:PORT) or "
                            "store; by default a tracked sweep goes on in its own runs.",
                     num_samples="Raise the sweep's trial budget to this many trials (a "
                                 "stopped or finished sweep grows; the study goes on).",
                     time_budget="End this resume when this much time has passed (90m, "
                                 "2h), as Ctrl-C does; resume again to go on.")
    add_data_flags(p, many=False)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("leaderboard", help="tables of the best trials, as the assignment's")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="folder for leaderboard.md/.csv/.parquet and charts "
                                 "(default: <first run>/leaderboard; for a run in object "
                                 "storage, ./leaderboard-<name>)")
    add_data_flags(p, many=True)
    p.add_argument("--external", action="append", default=[], metavar="NAME=DIR",
                   help="also score every row on this labelled collection (a folder or "
                        "CSV manifest), shown as columns External NAME ...; repeatable")
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser("export", help="export the best model of each task")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="writes OUT/<task>/model.onnx, ...")
    add_data_flags(p, many=True)
    p.add_argument("--mlflow", metavar="URI",
                   help="also register each bundle in this MLflow's model registry "
                        "(http://HOST:PORT, or a store such as sqlite:///mlflow.db)")
    p.add_argument("--registered-name", metavar="NAME",
                   help="the registered model's name (default: covid-tune-<task>)")
    p.add_argument("--pick", default="best", choices=pick_rules(), metavar="RULE",
                   help="which trial of each task: best (the best metric; the default), "
                        "or, on the Pareto front of the metric and the space's first "
                        "objective, cheapest-within-interval (the cheapest whose metric is "
                        "within the best's 95%% bootstrap interval), cheapest, or fastest "
                        "(cheapest by latency_ms); docs/pareto.md")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="run an exported model on an image or a folder")
    p.add_argument("model_dir")
    p.add_argument("input", help="an image file or a folder of images")
    p.add_argument("--out", default="preds.csv", help="CSV to write (default: preds.csv)")
    p.add_argument("--cam", metavar="DIR",
                   help="also write a Grad-CAM overlay PNG per image into DIR")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="score an exported model on another labelled "
                                        "collection (external validation)")
    p.add_argument("model_dir", help="a folder written by export: OUT/<task>, or OUT")
    p.add_argument("--data", required=True, metavar="DIR|CSV",
                   help="a labelled collection: a folder in a layout covid-tune reads, or "
                        "a CSV manifest (path,labels[,split,patient,view,source])")
    p.add_argument("--classes", nargs="+", action="extend", default=[], metavar="WORD=CLASS",
                   help="map class folders or labels to the task's classes, as a space's "
                        "data: {classes: ...} (WORD= leaves them out)")
    p.add_argument("--out", metavar="FOLDER",
                   help="folder for evaluation.md and evaluation.json "
                        "(default: ./evaluation-<collection name>)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("bench", help="measure the fast paths against the plain ones")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes: minutes on 2 CPU cores")
    size.add_argument("--real", action="store_true",
                      help="instead: both shipped spaces through `covid-tune sweep` at a "
                           "realistic size (about 13 minutes on 2 CPU cores; data, runs "
                           "and logs in ./soak-out)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="synthesise data and run a small real sweep")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--name", default="demo")
    p.add_argument("--scale", type=float, default=0.02, action=AtLeast, least=0,
                   inclusive=False, help="fraction of the real counts")
    add_option_flags(p, ("seed",), seed="Seeds the phantom data and the sweep.")
    p.set_defaults(func=cmd_demo)
    return parser


def terminate(signum, frame):
    """SIGTERM outside a sweep's search: stop as Ctrl-C does, with exit code 143."""
    raise Stopped(signum, "stopped by SIGTERM")


def main(argv: list[str] | None = None) -> int:
    parser, args = build_parser(), None
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if main_thread else None
    try:
        args = parser.parse_args(argv)  # a flag out of range is a UserError (AtLeast)
        return args.func(args)
    except UserError as exc:
        if args is not None and args.debug:
            traceback.print_exc()
        print(f"covid-tune: error: {exc}", file=sys.stderr)
        return 2
    except Stopped as exc:
        print(f"covid-tune: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except Stalled as exc:
        print(f"covid-tune: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("covid-tune: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
