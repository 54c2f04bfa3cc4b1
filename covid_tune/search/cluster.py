"""Where a sweep runs: joining Ray, the nodes' resources, and the storage they share.

``start_ray`` joins a cluster (``--address``) or starts Ray on this machine.
``check_resources`` refuses a trial bigger than every node. ``check_storage`` refuses
a local ``--storage-path`` that some node cannot see: each trial writes its
checkpoints from the node it runs on, so on more than one machine the run folder
must be shared (NFS and the like) or be a URI (``s3://``, ``gs://``).

Run folders are reached through pyarrow filesystems, as Ray Tune reaches them, so
one code path serves local paths and URIs (``covid_tune.runs.storage``).
"""

from __future__ import annotations

import os
import tempfile

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from covid_tune.errors import UserError
from covid_tune.runs.storage import is_uri

SHARED_STORAGE_ENV = "COVID_TUNE_SHARED_STORAGE"
"""Set to 1 to skip ``check_storage``: you vouch that every node sees the path."""
PROBE_TIMEOUT_S = 120.0


def start_ray(address: str | None) -> None:
    """Join a cluster at ``address``, or start a new Ray on this machine bound to
    localhost (``local``: never the cluster another program started here)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                 dashboard_host="127.0.0.1", configure_logging=False)


def alive_nodes() -> list[dict]:
    """``ray.nodes()`` entries of the nodes that are up."""
    return [n for n in ray.nodes() if n.get("Alive")]


def check_resources(cpus_per_trial: float, gpus_per_trial: float) -> None:
    """Refuse a trial that asks for more than the largest node has."""
    nodes = [n["Resources"] for n in alive_nodes()]
    largest = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
    most_cpu = max((r.get("CPU", 0) for r in nodes), default=0)
    most_gpu = max((r.get("GPU", 0) for r in nodes), default=0)
    if cpus_per_trial > most_cpu or gpus_per_trial > most_gpu:
        raise UserError(
            f"--cpus-per-trial {cpus_per_trial:g} / --gpus-per-trial {gpus_per_trial:g} "
            f"is more than any node has (largest: {largest.get('CPU', 0):g} CPU, "
            f"{largest.get('GPU', 0):g} GPU); ask for less")


def check_object_store(nbytes: int, image_size: int) -> None:
    """Refuse a decoded dataset larger than the object store of the driver's node, where
    ``tune.with_parameters`` puts its one copy for every trial to share."""
    from covid_tune.data.dataset import largest_fitting_size
    from covid_tune.core.units import human_bytes

    here = ray.get_runtime_context().get_node_id()
    node = next((n for n in alive_nodes() if n["NodeID"] == here), None)
    room = int(node["Resources"].get("object_store_memory", 0)) if node else 0
    if not room or nbytes <= room:
        return
    fit = largest_fitting_size(image_size, nbytes, room)
    raise UserError(f"--image-size {image_size}: the decoded dataset ({human_bytes(nbytes)}) "
                    f"is larger than Ray's object store on this node "
                    f"({human_bytes(room)}); the largest image size that fits is {fit} px; "
                    f"pass --image-size {fit} or less, or give Ray more object-store memory "
                    f"(ray start --object-store-memory)")


def check_storage(storage_path: str, shared: bool = False) -> None:
    """Refuse a local storage path that a node of the cluster cannot see.

    Evidence, not a guess: a marker file is written under the path here, and a tiny
    task on every alive node looks for it. URIs pass (every node reaches them), and
    so does ``shared=True`` or ``COVID_TUNE_SHARED_STORAGE=1`` (you vouch for it).
    Nodes that join later (autoscaling) are not checked here; Ray itself fails their
    trials at their first checkpoint if they cannot see the path.
    """
    if is_uri(storage_path) or shared or os.environ.get(SHARED_STORAGE_ENV) == "1":
        return
    nodes = alive_nodes()
    if len(nodes) < 2:
        return
    os.makedirs(storage_path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=storage_path, prefix=".covid-tune-probe-") as marker:
        blind = nodes_without(marker.name, nodes)
    if blind:
        raise UserError(storage_message(storage_path, blind, len(nodes)))


def nodes_without(path: str, nodes: list[dict]) -> list[str]:
    """``ip (node id)`` of each node that looked for ``path`` and did not find it.

    A node that dies before it answers is left out; one that does not answer within
    ``PROBE_TIMEOUT_S`` is reported as not checked.
    """
    look = ray.remote(num_cpus=0, max_retries=0)(os.path.exists)
    pending = {
        look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node_id=n["NodeID"], soft=False)).remote(path): n
        for n in nodes
    }
    ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=PROBE_TIMEOUT_S)
    if late:
        print(f"note: {len(late)} node(s) did not answer the shared-storage check within "
              f"{PROBE_TIMEOUT_S:.0f} s; they were not checked")
    return [describe(pending[ref]) for ref in ready if _answer(ref) is False]


def describe(node: dict) -> str:
    return f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})"


def _answer(ref) -> bool | None:
    """The probe's answer, or None if its node died first."""
    try:
        return bool(ray.get(ref))
    except ray.exceptions.RayError:
        return None


def storage_message(storage_path: str, blind: list[str], total: int) -> str:
    return (
        f"--storage-path {storage_path} is a local folder that {len(blind)} of the "
        f"cluster's {total} nodes cannot see ({', '.join(blind)}); their trials could not "
        f"save checkpoints where this driver reads them. Use a folder every node mounts "
        f"(NFS, EFS, Filestore) or a URI such as s3://bucket/runs or gs://bucket/runs; if "
        f"the folder is shared and this check is wrong, set {SHARED_STORAGE_ENV}=1")
