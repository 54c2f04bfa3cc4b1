"""The searcher's contract, by Optuna's ask/tell with no training: start-up hold, PRUNED
and FAIL states, the SQLite copy of the study, and a restored study that matches."""

from __future__ import annotations

import optuna
import pytest
import yaml

from covid_tune.core.space_file import dump_space, parse_space
from covid_tune.search._internals import ot_trials
from covid_tune.search.searcher import SweepSearch, build_searcher, n_startup_trials
from helpers import can_mount_tmpfs, on_small_disk

SPACE = {
    "task": "binary", "metric": "val_loss", "mode": "min", "max_epochs": 3,
    "image_size": 32, "pretrained": "none", "num_samples": 6,
    "asha": {"grace_period": 1, "reduction_factor": 2},
    "params": {"backbone": "resnet18", "frozen_layers": {"low": 0, "high": 20},
               "lr": {"low": 1e-4, "high": 0.1, "log": True}},
}


@pytest.fixture
def searcher(tmp_path) -> SweepSearch:
    space = parse_space(SPACE, "space.yaml")
    return build_searcher(space, str(tmp_path / "s.db"), "s", seed=0, max_concurrent=None)


def load(tmp_path) -> optuna.Study:
    return optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 's.db'}")


def finish(searcher: SweepSearch, trial_id: str, value: float, epoch: int,
           error: bool = False) -> None:
    searcher.on_trial_result(trial_id, {"val_loss": value + 0.1, "training_iteration": 1,
                                        "epoch": 1})
    searcher.on_trial_complete(trial_id, {"val_loss": value, "epoch": epoch}, error=error)


def test_startup_count_is_the_hand_rows_or_a_third_of_the_budget():
    assert n_startup_trials(parse_space(SPACE, "s")) == 2
    rows = [{"lr": 0.01}, {"lr": 0.02}, {"lr": 0.03}]
    assert n_startup_trials(parse_space({**SPACE, "start_with": rows}, "s")) == 3
    assert n_startup_trials(parse_space({**SPACE, "num_samples": 90}, "s")) == 10


def test_no_more_trials_start_until_the_startup_trials_finish(searcher):
    """Ray issue 52535: no more than n_startup random trials while the first ones run."""
    assert all(searcher.suggest(f"t{i}") is not None for i in range(searcher.n_startup))
    assert searcher.suggest("late") is None
    finish(searcher, "t0", 0.5, 3)
    assert searcher.suggest("late") is None
    finish(searcher, "t1", 0.7, 3)
    assert searcher.suggest("late") is not None


def test_failed_trials_do_not_release_the_startup_hold_but_never_stall_it(searcher):
    """TPE learns nothing from FAIL: a failed start-up trial keeps the hold while another
    runs; once nothing runs, the next trial may start (or the sweep would wait forever)."""
    assert all(searcher.suggest(f"t{i}") is not None for i in range(searcher.n_startup))
    finish(searcher, "t0", 0.5, 3, error=True)
    assert searcher.suggest("late") is None  # t1 still runs; one failure taught nothing
    finish(searcher, "t1", 0.5, 3, error=True)
    assert searcher.suggest("late") is not None  # nothing runs: no deadlock


class RayTrial:
    """What ``SweepScheduler`` reads of one of Ray's trials."""

    ERROR, TERMINATED = "ERROR", "TERMINATED"

    def __init__(self, trial_id: str, status: str = "RUNNING"):
        self.trial_id, self.status, self.last_result = trial_id, status, {}
        self.latest_checkpoint_result = None  # a new trial: nothing to restore

    def is_finished(self) -> bool:
        return self.status in (self.ERROR, self.TERMINATED)


def test_a_trial_ray_ends_without_telling_reaches_the_study_and_frees_the_hold(searcher,
                                                                             tmp_path):
    """Ray fails a trial whose reused actor could not be reset without telling the
    scheduler or the searcher. The study kept it RUNNING, and the start-up hold waited
    for it for good with nothing running (the stalled sweep of issue 20). The scheduler
    tells the searcher before the hold counts, so the study has it as FAIL and the next
    trial starts."""
    from types import SimpleNamespace

    from covid_tune.search.sweep import build_scheduler

    scheduler = build_scheduler(parse_space(SPACE, "space.yaml"), searcher)
    assert searcher.scheduler is scheduler  # linked when both are built
    controller = SimpleNamespace()  # nothing read off Tune's controller
    trials = [RayTrial(f"t{i}") for i in range(searcher.n_startup)]
    for trial in trials:
        assert searcher.suggest(trial.trial_id) is not None
        scheduler.on_trial_add(controller, trial)
    finish(searcher, "t0", 0.5, 3)
    scheduler.on_trial_complete(controller, trials[0], {"val_loss": 0.5})
    assert searcher.suggest("late") is None  # t1 runs: hold
    trials[1].status = RayTrial.ERROR  # failed reuse: no word to anyone
    assert searcher.suggest("late") is not None
    states = [t.state.name for t in searcher.study.get_trials()]
    assert states[:2] == ["COMPLETE", "FAIL"]
    assert scheduler.tell_missed_ends() == []  # told once

    late = RayTrial("late")
    scheduler.on_trial_add(controller, late)
    late.status = RayTrial.ERROR  # in the sweep's last step: no next step will tell
    searcher.save(str(tmp_path / "searcher.pkl"))  # the run's last snapshot
    assert searcher.study.get_trials()[-1].state.name == "FAIL"
    assert searcher.scheduler is scheduler  # not saved, and kept


def test_the_scheduler_and_its_searcher_stay_linked_in_rays_snapshot(tmp_path):
    """Ray pickles both in ``tuner.pkl`` and ``resume`` unpickles them together: the
    link made when they were built survives, through the ``ConcurrencyLimiter``."""
    import pickle

    from covid_tune.search.sweep import build_scheduler

    space = parse_space(SPACE, "space.yaml")
    limiter = build_searcher(space, str(tmp_path / "s.db"), "s", seed=0, max_concurrent=2)
    scheduler, limiter = pickle.loads(pickle.dumps((build_scheduler(space, limiter),
                                                    limiter)))
    assert scheduler.search_alg is limiter and limiter.searcher.scheduler is scheduler


def test_a_scheduler_from_a_run_written_before_finds_the_searcher_through_tune(searcher):
    """A run's snapshot from before 0.3 holds a scheduler whose ``search_alg`` is None
    (``tests/fixtures/before-0.2``): the first trial added links the two through Tune's
    public ``search_alg``."""
    from types import SimpleNamespace

    from covid_tune.search.sweep import SweepScheduler

    scheduler = SweepScheduler(time_attr="epoch", metric="val_loss", mode="min", max_t=3,
                               grace_period=1, reduction_factor=2)
    searcher.suggest("t0")
    scheduler.on_trial_add(SimpleNamespace(search_alg=searcher), RayTrial("t0"))
    assert scheduler.search_alg is searcher and searcher.scheduler is scheduler


def test_a_diverged_trial_is_pruned_at_the_worst_value_seen(searcher, tmp_path):
    """TPE ignores FAIL: a trial whose loss blew up is told PRUNED at the worst value
    any trial reported (mode min: the highest loss), so TPE learns to avoid it."""
    for trial_id, value in (("good", 0.5), ("poor", 0.9)):
        searcher.suggest(trial_id)
        finish(searcher, trial_id, value, 3)  # reports value + 0.1 at step 1, then value
    searcher.suggest("nan")
    searcher.diverged.add("nan")
    searcher.on_trial_complete("nan", None, error=True)
    diverged = load(tmp_path).trials[-1]
    assert diverged.state.name == "PRUNED" and diverged.intermediate_values == {1: 1.0}


@pytest.mark.slow
def test_a_failed_trial_that_resume_runs_again_is_told_its_new_outcome(searcher, tmp_path):
    """Ray's snapshot holds the searcher; resume re-runs errored trials. The restored
    study reopens the FAIL trial, records its new result, and still lists it once."""
    for trial_id in ("ok", "crashed"):
        searcher.suggest(trial_id)
    finish(searcher, "ok", 0.5, 3)
    finish(searcher, "crashed", 0.5, 1, error=True)
    searcher.save(str(tmp_path / "searcher.pkl"))
    space = parse_space(SPACE, "space.yaml")
    resumed = build_searcher(space, str(tmp_path / "s.db"), "s", seed=0, max_concurrent=None)
    resumed.restore(str(tmp_path / "searcher.pkl"))
    assert [t.state.name for t in load(tmp_path).trials] == ["COMPLETE", "RUNNING"]
    finish(resumed, "crashed", 0.3, 3)
    trials = load(tmp_path).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert trials[1].value == 0.3


def test_stopped_trials_are_pruned_and_errors_fail(searcher, tmp_path):
    for trial_id, epoch, error in (("full", 3, False), ("stopped", 1, False),
                                   ("crashed", 1, True)):
        assert searcher.suggest(trial_id) is not None
        finish(searcher, trial_id, 0.4, epoch, error)
    study = load(tmp_path)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "FAIL"]
    assert study.trials[0].value == 0.4
    assert study.trials[1].intermediate_values == {1: 0.5}


def test_the_result_that_made_asha_stop_reaches_the_study(searcher, tmp_path):
    """Ray hands the stopping result only to on_trial_complete: it is reported there."""
    searcher.suggest("a")
    searcher.on_trial_complete("a", {"val_loss": 0.9, "training_iteration": 2, "epoch": 2})
    trial = load(tmp_path).trials[0]
    assert trial.state.name == "PRUNED" and trial.intermediate_values == {2: 0.9}


def test_the_study_file_is_written_when_a_trial_ends(searcher, tmp_path):
    assert load(tmp_path).trials == []  # the file is there from the start
    searcher.suggest("a")
    finish(searcher, "a", 0.3, 3)
    assert len(load(tmp_path).trials) == 1
    searcher.suggest("b")
    finish(searcher, "b", 0.2, 3)
    assert [t.value for t in load(tmp_path).trials] == [0.3, 0.2]


def test_a_restored_searcher_brings_its_study_back(searcher, tmp_path):
    searcher.suggest("a")
    finish(searcher, "a", 0.3, 3)
    searcher.save(str(tmp_path / "state.pkl"))
    (tmp_path / "s.db").unlink()
    again = build_searcher(parse_space(SPACE, "s"), str(tmp_path / "s.db"), "s", seed=0,
                           max_concurrent=None)
    again.restore(str(tmp_path / "state.pkl"))
    assert [t.value for t in load(tmp_path).trials] == [0.3]
    assert again.suggest("b") is not None and "b" in ot_trials(again)


STUDY_ON_FULL_DISK = '''
import optuna
from covid_tune.core.space_file import parse_space
from covid_tune.search.searcher import build_searcher
space = parse_space(SPACE, "space.yaml")
study_file = DISK + "/optuna.db"
searcher = build_searcher(space, study_file, "s", seed=0, max_concurrent=None)
def finish(trial_id):
    searcher.suggest(trial_id)
    searcher.on_trial_complete(trial_id, {"val_loss": 0.5, "epoch": 3})
def count():
    return len(optuna.load_study(study_name="s", storage="sqlite:///" + study_file).trials)
finish("t0"); finish("t1")
before = open(study_file, "rb").read()
fill_disk(0)
finish("t2"); finish("t3")
kept = open(study_file, "rb").read() == before
parts = [n for n in os.listdir(DISK) if n.endswith(".partial")]
on_full = count()
free_disk()
finish("t4")
print(json.dumps({"kept": kept, "parts": parts, "on_full": on_full, "after": count()}))
'''


@pytest.mark.slow
@pytest.mark.skipif(not can_mount_tmpfs(), reason="cannot mount a tmpfs here (unshare -Urm)")
def test_a_full_disk_keeps_the_last_study_copy_and_the_sweep_goes_on(tmp_path):
    """optuna.db on a real full tmpfs: SQLite keeps the previous file whole, one note is
    printed (not one per trial), and the next write after space is freed has every
    trial."""
    outcome, printed = on_small_disk(f"SPACE = {SPACE!r}\n" + STUDY_ON_FULL_DISK,
                                     tmp_path / "disk", size_kib=1024)
    assert outcome == {"kept": True, "parts": [], "on_full": 2, "after": 5}
    notes = [line for line in printed.splitlines() if line.startswith("note: could not")]
    assert len(notes) == 1 and "disk is full" in notes[0]
    assert "the previous copy is kept" in notes[0]


def same_trials(file_study: optuna.Study, study: optuna.Study) -> None:
    mine = [(t.number, t.state, t.params, t.intermediate_values, t.values, t.user_attrs)
            for t in study.trials]
    assert [(t.number, t.state, t.params, t.intermediate_values, t.values, t.user_attrs)
            for t in file_study.trials] == mine


def test_the_file_mirrors_the_study_one_trial_at_a_time(tmp_path, monkeypatch):
    """Running trials (with their epochs so far), enqueued ``start_with`` rows and ended
    trials, in the study's order; each trial's end costs the same few writes at trial
    30 as at trial 2, never a copy of the whole study."""
    from covid_tune.search.searcher import StudyMirror

    monkeypatch.setattr(StudyMirror, "interval", 0.0)
    space = parse_space({**SPACE, "start_with": [{"frozen_layers": 3, "lr": 0.01},
                                                 {"frozen_layers": 5, "lr": 0.02}]}, "s")
    searcher = build_searcher(space, str(tmp_path / "s.db"), "s", seed=0, max_concurrent=None)
    searcher.startup_done = True  # no start-up hold: trials overlap from the start
    calls = []
    for trial in range(30):
        searcher.suggest(f"t{trial}")
        searcher.on_trial_result(f"t{trial}", {"val_loss": 0.5, "training_iteration": 1,
                                               "epoch": 1})
        if trial >= 2:  # two trials stay running throughout
            db = searcher.mirror.db
            counted = {name: getattr(db, name) for name in (
                "create_new_trial", "set_trial_intermediate_value", "set_trial_state_values")}
            writes = []
            for name, method in counted.items():
                monkeypatch.setattr(db, name, lambda *a, _m=method, _n=name, **k:
                                    (writes.append(_n), _m(*a, **k))[1])
            done = f"t{trial - 2}"
            searcher.on_trial_result(done, {"val_loss": 0.4, "training_iteration": 2,
                                            "epoch": 2})
            searcher.on_trial_complete(done, {"val_loss": 0.3, "epoch": 3})
            calls.append(len(writes))
            for name, method in counted.items():
                monkeypatch.setattr(db, name, method)
    same_trials(load(tmp_path), searcher.study)
    assert [t.state.name for t in load(tmp_path).trials][-2:] == ["RUNNING", "RUNNING"]
    assert load(tmp_path).trials[1].params == {"frozen_layers_resnet18": 5, "lr": 0.02}
    assert max(calls) <= 4 and calls[-1] == calls[0], calls


def test_a_study_behind_a_uri_is_uploaded_when_due_and_at_the_end(tmp_path, monkeypatch):
    from covid_tune.search.searcher import StudyMirror

    monkeypatch.setattr(StudyMirror, "upload_every", 3600.0)
    target = tmp_path / "bucket" / "s.db"
    searcher = build_searcher(parse_space(SPACE, "space.yaml"), f"file://{target}", "s",
                              seed=0, max_concurrent=None)
    searcher.startup_done = True  # no start-up hold: trials overlap from the start
    searcher.suggest("a"), searcher.suggest("b")
    finish(searcher, "a", 0.3, 3)  # the first upload is due at once
    first = target.read_bytes()
    searcher.suggest("c")
    finish(searcher, "c", 0.2, 3)  # b still runs, and the next upload is an hour off
    assert target.read_bytes() == first
    finish(searcher, "b", 0.1, 3)  # nothing runs any more: the sweep's end is uploaded
    same_trials(optuna.load_study(study_name="s", storage=f"sqlite:///{target}"),
                searcher.study)


def test_a_restored_searcher_rewrites_a_file_that_went_astray(searcher, tmp_path):
    """``resume``: the file is rebuilt from the snapshot's study, whatever it held."""
    searcher.suggest("a")
    finish(searcher, "a", 0.3, 3)
    searcher.save(str(tmp_path / "state.pkl"))
    searcher.suggest("b")
    finish(searcher, "b", 0.9, 3)  # after the snapshot: not in the restored study
    again = build_searcher(parse_space(SPACE, "s"), str(tmp_path / "s.db"), "s", seed=0,
                           max_concurrent=None)
    again.restore(str(tmp_path / "state.pkl"))
    same_trials(load(tmp_path), again.study)
    again.suggest("c")
    finish(again, "c", 0.2, 3)
    assert [t.value for t in load(tmp_path).trials] == [0.3, 0.2]


def test_a_pareto_search_tells_tpe_the_metric_and_the_cost(tmp_path):
    """``objectives: [latency_ms]``: a two-objective study (the metric's direction, then
    lower cost); a finished trial gets both values, a stopped or diverged one is PRUNED
    without per-epoch values (Optuna takes none in a multi-objective study)."""
    space = parse_space({**SPACE, "objectives": ["latency_ms"]}, "space.yaml")
    searcher = build_searcher(space, str(tmp_path / "s.db"), "s", seed=0, max_concurrent=None)
    for trial_id, result in (("full", {"val_loss": 0.4, "latency_ms": 4.0, "epoch": 3}),
                             ("stopped", {"val_loss": 0.9, "latency_ms": 2.0, "epoch": 2}),
                             ("nan", None)):
        assert searcher.suggest(trial_id) is not None
        searcher.on_trial_result(trial_id, {"val_loss": 0.6, "latency_ms": 4.0,
                                            "training_iteration": 1, "epoch": 1})
        if result:
            searcher.on_trial_complete(trial_id, result)
    searcher.diverged.add("nan")
    searcher.on_trial_complete("nan", None, error=True)
    study = load(tmp_path)
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "PRUNED"]
    assert study.trials[0].values == [0.4, 4.0]
    assert all(not t.intermediate_values for t in study.trials)
    assert searcher.suggest("next") is not None  # TPE samples from a two-objective history


def test_tpe_learns_from_the_trials_of_a_warm_start_from_its_first_trial(tmp_path):
    """Twenty earlier trials that score best near lr 0.003: a warm-started search asks
    there from its first trial (TPE's start-up is already met), where a cold one with
    the same seed draws at random."""
    import math

    space = parse_space({**SPACE, "metric": "val_f1", "mode": "max",
                         "params": {**SPACE["params"], "frozen_layers": 20}}, "space.yaml")
    lr = optuna.distributions.FloatDistribution(1e-4, 0.1, log=True)
    rng = __import__("random").Random(4)
    warm = [optuna.trial.create_trial(
        params={"lr": value}, distributions={"lr": lr},
        value=1 - abs(math.log10(value / 0.003)), user_attrs={"warm_start": "earlier"})
        for value in (10 ** rng.uniform(-4, -1) for _ in range(20))]

    def distances(searcher) -> list[float]:
        asked = []
        for i in range(6):
            asked.append(searcher.suggest(f"t{i}"))
            searcher.on_trial_complete(f"t{i}", {"val_f1": 0.5, "epoch": 3})
        return sorted(abs(math.log10(config["lr"] / 0.003)) for config in asked)

    warm_search = build_searcher(space, None, "w", seed=0, max_concurrent=None, warm=warm)
    cold_search = build_searcher(space, None, "c", seed=0, max_concurrent=None)
    near, far = distances(warm_search), distances(cold_search)
    assert len(warm_search.study.trials) == 26
    assert near[3] < 0.4 < far[3], (near, far)  # the median of six asks


def test_a_warm_start_takes_the_trials_a_space_still_allows(swept, tmp_path):
    """From the shared Part 1 sweep: every finished trial, as trials of the same space;
    a narrowed lr range leaves out the trials outside it; a parameter now fixed is
    dropped; another metric is refused in one line."""
    from covid_tune.errors import UserError
    from covid_tune.runs.record import read_record, read_space
    from covid_tune.search.searcher import warm_trials

    space = read_space(swept.binary, read_record(swept.binary))
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{swept.binary / 'optuna.db'}")
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    warm = warm_trials(space, [str(swept.binary)])
    assert [t.params for t in warm] == [t.params for t in finished]
    assert [t.values for t in warm] == [t.values for t in finished]
    assert {t.user_attrs["warm_start"] for t in warm} == {str(swept.binary)}

    lrs = sorted(t.params["lr"] for t in finished)
    cut = (lrs[0] + lrs[-1]) / 2
    raw = yaml.safe_load(dump_space(space))
    raw["params"]["lr"] = {"low": 1e-3, "high": cut, "log": True}
    raw["params"]["momentum"] = 0.8
    narrowed = parse_space(raw, "narrowed.yaml")
    kept = warm_trials(narrowed, [str(swept.binary)])
    assert [t.params["lr"] for t in kept] == [t.params["lr"] for t in finished
                                              if t.params["lr"] <= cut]
    assert all("momentum" not in t.params for t in kept)

    raw["metric"], raw["mode"] = "val_auroc", "max"
    with pytest.raises(UserError, match=r"--warm-start .*: its trials were scored for "
                                        r"binary by val_loss, this sweep's are for binary by "
                                        r"val_auroc; warm-start from a run of the same task"):
        warm_trials(parse_space(raw, "other.yaml"), [str(swept.binary)])


def test_a_snapshot_copy_that_cannot_be_written_is_one_note_and_the_old_copy_goes(
        tmp_path, monkeypatch, capsys):
    """A full disk while keeping the copy (simulated: ``keep_snapshot`` raises ENOSPC):
    one note, and the previous copy is removed, so ``resume`` never takes a copy older
    than Ray's own files."""
    import errno

    import covid_tune.search.searcher as searcher_module

    space = parse_space(SPACE, "space.yaml")
    run = tmp_path / "run"
    run.mkdir()
    searcher = build_searcher(space, None, "s", seed=0, max_concurrent=None, run_dir=str(run))
    (run / "snapshot.tar").write_bytes(b"an older copy")
    searcher.saved_to = str(tmp_path / "staging" / ".0a-tmp-searcher-state-2026-12-06_06-00-00.pkl")

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(searcher_module, "keep_snapshot", full)
    searcher.keep_snapshot()
    searcher.keep_snapshot()
    out = capsys.readouterr().out
    assert out.count("note: could not keep a copy of the run's snapshot ([Errno 28] No space "
                     "left on device); resume goes on from Ray Tune's own files") == 1
    assert not (run / "snapshot.tar").exists()


def test_a_budget_set_before_ray_restores_the_searcher_survives_the_restore(searcher,
                                                                             tmp_path):
    """``resume --num-samples`` sets the new budget on the restored searcher before Ray
    puts its saved state back (a sweep a goal ended saved ``finished``): the budget stays
    and the search suggests again."""
    searcher.suggest("a")
    searcher.finished = True
    searcher.save(str(tmp_path / "searcher.pkl"))
    resumed = build_searcher(parse_space(SPACE, "space.yaml"), str(tmp_path / "s.db"), "s",
                             seed=0, max_concurrent=None)
    resumed.budget = 9
    resumed.restore(str(tmp_path / "searcher.pkl"))
    assert (resumed.budget, resumed.finished) == (9, False)
    assert resumed.suggest("b") is not None
