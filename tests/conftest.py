"""Shared fixtures: one Ray instance per test session, and small generated datasets.

The Ray instance is a real two-node cluster on this machine
(``ray.cluster_utils.Cluster``, on this machine's own address; the sandbox has no
other host): a head node and one worker node, one CPU each, so
end-to-end sweeps really spread over nodes and cluster tests can add or remove nodes.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")


@pytest.fixture(scope="session", autouse=True)
def decode_cache(tmp_path_factory):
    """Keep the decode cache inside the test session's temp folder."""
    folder = tmp_path_factory.mktemp("decode-cache")
    os.environ["COVID_TUNE_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def ray_cluster():
    """A real two-node Ray cluster on this machine, shared by the whole session."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def binary_data(tmp_path_factory):
    """A tiny Part 1 dataset of phantoms (48 px)."""
    from covid_tune.synth import generate

    root = tmp_path_factory.mktemp("binary") / "data"
    generate(root, "binary", scale=0.006, size=48, seed=1, progress=False)
    return root


@pytest.fixture(scope="session")
def multilabel_data(tmp_path_factory):
    """A tiny Part 2 dataset of phantoms (48 px), with the flat unlabelled Test/."""
    from covid_tune.synth import generate

    root = tmp_path_factory.mktemp("multilabel") / "data"
    generate(root, "multilabel", scale=0.01, size=48, seed=2, progress=False)
    return root
