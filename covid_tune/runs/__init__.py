"""The run folder and the checkpoint formats, their writers and readers (no torch, no Ray).

A run folder, ``<storage-path>/<name>/``, is Ray Tune's own layout plus covid-tune's
record of the run::

    sweep.json      what was asked (SweepOptions), where it came from (Provenance),
                    and the size and SHA-256 of space.yaml
    space.yaml      the resolved search space, overrides applied (load_space reads it)
    dataset.json    the dataset's manifest: relative path -> bytes of every image
    optuna.db       the Optuna study as SQLite (written by covid_tune.search.searcher)
    sweep.lock      held by the sweep or resume running now (covid_tune.runs.lock)
    end.json        why its last driver ended: all trials run, a goal reached, converged,
                    the time budget spent, stopped by a signal (runs.record.write_end)
    experiment_state-*.json, searcher-state-*.pkl   Ray Tune's snapshot (for resume)
    snapshot.tar    a whole copy of Ray Tune's newest snapshot, written by rename: what
                    resume goes on from when a kill cut Ray's own copy short
    lost_trials/    trials a killed driver's last snapshot did not list (set aside)
    trial_<id>/     result.json, progress.csv, events.out.tfevents.*, diverged.txt,
                    checkpoint_<n>/ (checkpoint.pt: the weights not in the base, epoch;
                                     optimizer.pt: optimizer state, only in a running
                                     trial's newest checkpoint;
                                     recipe.json: resolved config, labels, metrics,
                                     the base, size and SHA-256 of the files)

A finished trial keeps one checkpoint, its best epoch, weights only (``keep_best``); a
running one also its newest, the only one with ``optimizer.pt`` (``drop_resume_state``).
A checkpoint does not store the tensors that are still as the trial started them from
its *base*: the pretrained file (recorded by its SHA-256) or, with ``pretrained: none``,
the trial's seeded initialisation (recorded by the seed and the SHA-256 of those
tensors). A reader rebuilds them (``covid_tune.nn.weights.load_model``) and refuses
clearly when the base is missing or differs.

One module per job: ``folder`` (file names, and ``RunFolder``, through which every
reader opens a run wherever the sweep wrote it), ``record`` (``sweep.json``, ``space.yaml``,
``dataset.json``), ``checkpoint`` (the checkpoint format), ``retention`` (which
checkpoints a trial keeps), ``reader`` (a whole run, ranking, the dataset to score on),
``ray_state`` (Ray Tune's snapshot), ``lock`` and ``storage``. The training side writes
through ``write_record`` and ``save_checkpoint``; ``leaderboard``, ``export`` and
``resume`` read through ``read_record``, ``read_space``, ``read_run`` and
``load_checkpoint``. Nothing else parses these files. Every problem with them becomes a
``UserError`` naming the file, or a skip noted in the output. Importing the package
imports neither torch nor Ray.
"""
