"""The search spaces that ship with covid-tune, installed as ``covid_tune.search_spaces``
(see ``pyproject.toml``) so that ``--space binary|multilabel|demo`` works after a plain
``pip install``. The YAML files here are their one source."""
