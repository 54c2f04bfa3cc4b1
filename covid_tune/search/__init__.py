"""The driver: Optuna inside Ray Tune, ASHA, the sweep and its status line (Ray)."""


def __getattr__(name):
    # Only for Ray snapshots written before 0.2 (covid_tune._moved).
    from covid_tune._moved import old_search_name
    return old_search_name(name)
