"""Running on a cluster: the configs in cluster/, the storage and resource checks, the
local Ray covid-tune starts, and sweeps that survive a crashed trial, a lost node and a
killed driver.

Everything runs on the session's real two-node Ray cluster (``ray_cluster``, one CPU
per node, on this machine). Sweeps run in this process (``run_sweep`` joins the Ray
already started), except a driver that must be killed: it runs as ``python -m
covid_tune`` joined to the cluster with ``--address``. Nothing sleeps for a guessed
time: tests poll for a condition with a deadline.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jsonschema
import optuna
import pytest
import ray
import ray.autoscaler
import yaml
from ray.tune import ExperimentAnalysis

from covid_tune.search import cluster
from covid_tune.cli import build_parser, main
from covid_tune.errors import UserError
from covid_tune.runs.folder import (DIVERGED_FILE, LOCK_FILE, LOST_DIR, RAY_STATE_GLOB, SNAPSHOT_FILE,
                                    STUDY_FILE, SWEEP_FILE)
from covid_tune.runs.record import SweepOptions, read_record
from covid_tune.search.sweep import go_on_from_a_kept_checkpoint, run_sweep, set_aside_lost_trials

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_DIR = ROOT / "cluster"
EPOCHS = 3


# --- helpers ---------------------------------------------------------------------------

def space_file(folder: Path, num_samples: int, epochs: int = EPOCHS) -> Path:
    """A tiny binary study: resnet18 at 32 px; ASHA never stops a trial early (grace
    period = max_epochs), so every trial's epochs are known in advance."""
    doc = {"task": "binary", "metric": "val_loss", "mode": "min", "max_epochs": epochs,
           "image_size": 32, "pretrained": "none", "num_samples": num_samples,
           "augment": False, "asha": {"grace_period": epochs, "reduction_factor": 2},
           "params": {"backbone": "resnet18", "frozen_layers": 10,
                      "lr": {"low": 1e-3, "high": 0.1, "log": True},
                      "batch_size": 16, "hidden": 16, "dropout": 0.0}}
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def wait_for(condition, what: str, timeout: float = 240.0, every: float = 0.2):
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def start_driver(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    """``python -m covid_tune ARGS`` in the background, its output in ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "covid_tune", *args], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **env})


def sweep_args(space: Path, data: Path, storage: Path, name: str, address: str,
               *extra: str) -> list[str]:
    return ["sweep", "--space", str(space), "--data", str(data), "--storage-path",
            str(storage), "--name", name, "--address", address, "--seed", "1", *extra]


def final_trials(run_dir: Path) -> list:
    """Ray's trials from the run's last snapshot (what ``resume`` restores)."""
    return ExperimentAnalysis(str(run_dir)).trials


def started_from(result: dict) -> int:
    """The epoch of the checkpoint a trial's last attempt started from (0: scratch)."""
    return result["started_from"]


def trial_folders(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.glob("trial_*")}


# --- cluster/ ------------------------------------------------------------------------

def cluster_yaml(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER_DIR / name).read_text()) if d is not None]


def test_every_cluster_yaml_parses():
    names = sorted(p.name for p in CLUSTER_DIR.glob("*.y*ml"))
    assert names == ["aws.yaml", "kuberay.yaml"]
    for name in names:
        assert cluster_yaml(name), f"{name} is empty"


def test_launcher_config_fits_rays_schema_and_node_types():
    config, = cluster_yaml("aws.yaml")
    schema = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema.read_text()))
    types = config["available_node_types"]
    head = types.pop(config["head_node_type"])
    assert head["resources"] == {"CPU": 0}  # the head runs the driver, no trials
    assert types, "no worker node type"
    for worker in types.values():
        assert worker["resources"]["GPU"] >= 1 and worker["resources"]["CPU"] >= 1
        assert 0 == worker["min_workers"] <= worker["max_workers"] <= config["max_workers"]
    setup = " ".join(config["setup_commands"])
    assert "~/covid-tune" in setup and f"ray[default,tune]=={ray.__version__}" in setup
    assert "ResNet18_Weights" in setup and "VGG16_Weights" in setup


def test_launcher_keeps_ray_private_and_token_authenticated():
    config, = cluster_yaml("aws.yaml")
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token ray start" in head and "RAY_AUTH_MODE=token ray start" in workers
    assert any("export RAY_AUTH_MODE=token" in c for c in config["initialization_commands"])
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    # Ray's own security group opens SSH only; no extra rule may open more.
    assert not config["provider"].get("security_group", {}).get("IpPermissions")


def test_kuberay_cluster_is_token_authenticated_and_internal():
    docs = {doc["kind"]: doc for doc in cluster_yaml("kuberay.yaml")}
    assert set(docs) == {"ServiceAccount", "RayCluster", "NetworkPolicy", "PersistentVolumeClaim"}
    spec = docs["RayCluster"]["spec"]
    assert docs["RayCluster"]["apiVersion"] == "ray.io/v1"
    assert spec["authOptions"] == {"mode": "token"} and spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head["rayStartParams"]["num-cpus"] == "0"
    if head["rayStartParams"].get("dashboard-host") != "127.0.0.1":
        policy = docs["NetworkPolicy"]["spec"]
        own_pods = {"ray.io/cluster": docs["RayCluster"]["metadata"]["name"]}
        assert policy["podSelector"]["matchLabels"] == own_pods
        assert policy["ingress"] == [{"from": [{"podSelector": {"matchLabels": own_pods}}]}]
    claim = head["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == docs["PersistentVolumeClaim"]["metadata"]["name"]


def test_kuberay_gpu_workers_and_one_image():
    spec = kuberay_cluster_spec()
    images = {spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]}
    for group in spec["workerGroupSpecs"]:
        assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container, = group["template"]["spec"]["containers"]
        images.add(container["image"])
        resources = container["resources"]
        assert resources["requests"] == resources["limits"]
        assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
    assert len(images) == 1
    dockerfile = (CLUSTER_DIR / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.MULTILINE).group(1)
    assert base.startswith(f"rayproject/ray:{spec['rayVersion']}-")


def kuberay_cluster_spec() -> dict:
    return next(d for d in cluster_yaml("kuberay.yaml") if d["kind"] == "RayCluster")["spec"]


def kuberay_pods(spec: dict) -> dict[str, tuple[dict, list[dict]]]:
    """Each pod template ("head", then each worker group's name) with its containers as
    KubeRay completes them: the head gets the autoscaler container (securityContext and
    volumeMounts from autoscalerOptions), each worker the wait-gcs-ready init container
    (the Ray container's securityContext)."""
    head = spec["headGroupSpec"]["template"]["spec"]
    pods = {"head": (head, head["containers"] + head.get("initContainers", []))}
    if spec.get("enableInTreeAutoscaling"):
        options = spec.get("autoscalerOptions", {})
        pods["head"][1].append({"name": "autoscaler",
                                "securityContext": options.get("securityContext"),
                                "volumeMounts": options.get("volumeMounts", [])})
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        wait = {"name": "wait-gcs-ready",
                "securityContext": pod["containers"][0].get("securityContext")}
        pods[group["groupName"]] = (pod, [*pod["containers"], *pod.get("initContainers", []),
                                          wait])
    return pods


def kuberay_restricted_violations(pod: dict, containers: list[dict]) -> list[str]:
    """What the restricted Pod Security Standard refuses in a pod, one line each (the
    checks of kubernetes.io/docs/concepts/security/pod-security-standards)."""
    allowed_volumes = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                       "persistentVolumeClaim", "projected", "secret"}
    seccomp_ok = ("RuntimeDefault", "Localhost")
    bad = [f"{key}: true" for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]
    for volume in pod.get("volumes", []):
        kind, = set(volume) - {"name"}
        if kind not in allowed_volumes:
            bad.append(f"volume {volume['name']}: {kind}")
    pod_context = pod.get("securityContext") or {}
    if pod_context.get("runAsUser") == 0:
        bad.append("pod runAsUser: 0")
    if pod_context.get("runAsNonRoot") is False:
        bad.append("pod runAsNonRoot: false")
    pod_seccomp = (pod_context.get("seccompProfile") or {}).get("type")
    if pod_seccomp not in (None, *seccomp_ok):
        bad.append(f"pod seccompProfile: {pod_seccomp}")
    for container in containers:
        context = container.get("securityContext") or {}
        where = f"container {container['name']}"
        capabilities = context.get("capabilities") or {}
        seccomp = (context.get("seccompProfile") or {}).get("type") or pod_seccomp
        if context.get("privileged"):
            bad.append(f"{where}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where}: allowPrivilegeEscalation not false")
        if "ALL" not in capabilities.get("drop", []):
            bad.append(f"{where}: capabilities do not drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{where}: adds capabilities {capabilities['add']}")
        if context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is not True:
            bad.append(f"{where}: runAsNonRoot not true")
        if context.get("runAsUser") == 0:
            bad.append(f"{where}: runAsUser: 0")
        if seccomp not in seccomp_ok:
            bad.append(f"{where}: seccompProfile {seccomp}")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            bad.append(f"{where}: hostPort")
    return bad


def test_kuberay_pods_pass_the_restricted_pod_security_standard():
    """A namespace labelled pod-security.kubernetes.io/enforce=restricted admits every
    pod (KubeRay's own emptyDir volumes pass as they are), and the image's user is the
    one the pods run as."""
    pods = kuberay_pods(kuberay_cluster_spec())
    assert len(pods) >= 2
    for name, (pod, containers) in pods.items():
        assert kuberay_restricted_violations(pod, containers) == [], name
    dockerfile = (CLUSTER_DIR / "Dockerfile").read_text()
    user = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)[-1]
    for pod, _ in pods.values():
        context = pod["securityContext"]
        assert user == f"{context['runAsUser']}:{context['runAsGroup']}" != "0:0"


def test_kuberay_restricted_check_catches_what_a_namespace_would_refuse():
    """The check above is not vacuous: each change here gets the head pod refused."""
    pod, containers = kuberay_pods(kuberay_cluster_spec())["head"]
    assert kuberay_restricted_violations(pod, containers) == []
    for change in (lambda p, c: p.update(hostNetwork=True),
                   lambda p, c: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
                   lambda p, c: p["securityContext"].update(runAsUser=0),
                   lambda p, c: p["securityContext"].pop("seccompProfile"),
                   lambda p, c: p["securityContext"].update(runAsNonRoot=False),
                   lambda p, c: c["securityContext"].update(runAsNonRoot=False),
                   lambda p, c: c["securityContext"].update(privileged=True),
                   lambda p, c: c["securityContext"].pop("allowPrivilegeEscalation"),
                   lambda p, c: c["securityContext"]["capabilities"].update(drop=[]),
                   lambda p, c: c["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
                   lambda p, c: c["securityContext"].update(seccompProfile={"type": "Unconfined"}),
                   lambda p, c: c.update(securityContext=None)):
        pod, containers = kuberay_pods(kuberay_cluster_spec())["head"]
        change(pod, containers[-1])  # the autoscaler KubeRay adds
        assert kuberay_restricted_violations(pod, containers), change


def test_kuberay_pods_run_as_a_service_account_bound_to_the_runs_bucket():
    """Head and workers both write the run folder (the driver sweep.json and the study,
    each trial its checkpoints), so every pod runs as a ServiceAccount defined before the
    RayCluster, ready for an EKS (IRSA) and a GKE (Workload Identity) bucket role. Only
    the autoscaler container holds a Kubernetes API token; jobs never see one."""
    docs = cluster_yaml("kuberay.yaml")
    kinds = [d["kind"] for d in docs]
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    assert kinds.index("ServiceAccount") < kinds.index("RayCluster")
    token_path = "/var/run/secrets/kubernetes.io/serviceaccount"
    for name, (pod, containers) in kuberay_pods(kuberay_cluster_spec()).items():
        account = accounts.get(pod.get("serviceAccountName"))
        assert account, f"{name}: no ServiceAccount of kuberay.yaml"
        notes = account["metadata"].get("annotations", {})
        assert re.fullmatch(r"arn:aws:iam::\w+:role/[\w+=,.@-]+",
                            notes.get("eks.amazonaws.com/role-arn", "")), name
        assert re.fullmatch(r"[\w-]+@[\w-]+\.iam\.gserviceaccount\.com",
                            notes.get("iam.gke.io/gcp-service-account", "")), name
        automount = pod.get("automountServiceAccountToken",
                            account.get("automountServiceAccountToken", True))
        assert automount is False, name
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in containers:
            mounts = [m["name"] for m in container.get("volumeMounts", [])
                      if m["mountPath"].rstrip("/") == token_path]
            if container["name"] != "autoscaler":
                assert mounts == [], f"{name}: {container['name']} has the API token"
                continue
            mount, = mounts
            sources = volumes[mount]["projected"]["sources"]
            assert any("serviceAccountToken" in s for s in sources)
            assert any(s.get("configMap", {}).get("name") == "kube-root-ca.crt" for s in sources)


DOCS_WITH_COMMANDS = [CLUSTER_DIR / "README.md", ROOT / "README.md",
                      *sorted((ROOT / "docs").glob("*.md"))]


def shell_blocks(text: str) -> list[str]:
    """The fenced code blocks of a markdown text that hold shell commands (no info
    string, or bash/sh), each with its continuation lines joined."""
    blocks, block, fence = [], None, None
    for line in text.splitlines():
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            fence = stripped[3:].strip()
            block = [] if fence in ("", "bash", "sh") else None
        elif fence is not None and stripped == "```":
            if block is not None:
                blocks.append("\n".join(block).replace("\\\n", " "))
            fence, block = None, None
        elif block is not None:
            block.append(line)
    return blocks


def readme_commands(program: str, path: Path = CLUSTER_DIR / "README.md") -> list[list[str]]:
    """Each ``PROGRAM SUBCOMMAND ...`` in a markdown file's shell code blocks, split into
    words, up to the end of the line or a shell operator (``|``, ``;``, ``&&``)."""
    commands = []
    for line in "\n".join(shell_blocks(path.read_text())).splitlines():
        if line.lstrip().startswith("#"):
            continue
        for words in re.findall(rf"(?:^|\s){program}\s+([a-z][^|;&#]*)", line):
            commands.append(shlex.split(words))
    return commands


def test_readme_covid_tune_commands_parse():
    """Every ``covid-tune ...`` in a shell block of the READMEs and docs/*.md parses; the
    cluster walkthrough's sweeps all name the cluster."""
    commands = readme_commands("covid-tune")
    assert {c[0] for c in commands} >= {"sweep", "resume", "leaderboard", "export"}
    sweeps = [c for c in commands if c[0] == "sweep"]
    assert all("--address" in c for c in sweeps)
    for path in DOCS_WITH_COMMANDS:
        for command in readme_commands("covid-tune", path):
            try:
                build_parser().parse_args(command)
            except SystemExit:
                pytest.fail(f"{path.name}: covid-tune {shlex.join(command)} does not parse")
    in_readme = {c[0] for c in readme_commands("covid-tune", DOCS_WITH_COMMANDS[1])}
    assert in_readme >= {"sweep", "leaderboard", "export", "predict"}


# --- storage and resources -------------------------------------------------------------

def test_probe_tells_which_nodes_see_a_path(ray_cluster, tmp_path):
    nodes = cluster.alive_nodes()
    assert len(nodes) == 2
    seen = tmp_path / "marker"
    seen.write_text("")
    assert cluster.nodes_without(str(seen), nodes) == []
    missing = cluster.nodes_without(str(tmp_path / "nowhere"), nodes)
    assert len(missing) == 2  # both nodes looked, and neither found it


def test_local_storage_a_node_cannot_see_is_refused(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.delenv(cluster.SHARED_STORAGE_ENV, raising=False)
    cluster.check_storage(str(tmp_path))  # both nodes are on this machine: they see it
    monkeypatch.setattr(cluster, "nodes_without", lambda path, nodes: ["10.0.0.7 (abcd1234)"])
    with pytest.raises(UserError) as refused:
        cluster.check_storage(str(tmp_path))
    message = str(refused.value)
    for fragment in ("1 of the cluster's 2 nodes", "10.0.0.7", "s3://", "NFS",
                     cluster.SHARED_STORAGE_ENV):
        assert fragment in message
    cluster.check_storage("s3://bucket/runs")  # every node reaches a URI
    cluster.check_storage(str(tmp_path), shared=True)
    monkeypatch.setenv(cluster.SHARED_STORAGE_ENV, "1")
    cluster.check_storage(str(tmp_path))


def test_a_dataset_larger_than_the_object_store_is_refused(ray_cluster):
    """with_parameters puts the decoded dataset in the driver node's object store once:
    a bigger one is refused, naming both sizes and the largest image size that fits."""
    here = ray.get_runtime_context().get_node_id()
    room = next(n for n in cluster.alive_nodes() if n["NodeID"] == here)["Resources"][
        "object_store_memory"]
    cluster.check_object_store(int(room) // 2, 224)
    with pytest.raises(UserError) as refused:
        cluster.check_object_store(int(room) * 4, 224)
    message = str(refused.value)
    assert "is larger than Ray's object store on this node" in message
    assert "the largest image size that fits is 112 px; pass --image-size 112" in message


def test_too_big_trial_is_refused_before_it_starts(ray_cluster, binary_data, tmp_path):
    for cpus, gpus in ((2.0, 0.0), (1.0, 0.25)):
        opts = SweepOptions(space_file=str(space_file(tmp_path, 2)), data=str(binary_data),
                            name="big", storage_path=str(tmp_path / "runs"),
                            cpus_per_trial=cpus, gpus_per_trial=gpus)
        with pytest.raises(UserError, match=r"largest: 1 CPU, 0 GPU"):
            run_sweep(opts)
    assert not (tmp_path / "runs" / "big" / SWEEP_FILE).exists()  # the name stays free


# --- sweeps on the cluster -------------------------------------------------------------

def together(folder: Path, count: int):
    """The trainable, once ``count`` trials have started (each waits for the others,
    up to a minute): without it a one-epoch trial can end before the second trial's
    actor is up, and Ray then reuses the first actor, on the same node, for it."""
    def trainable(config, data):
        import ray.tune

        from covid_tune.training.trial import train_trial

        (folder / ray.tune.get_context().get_trial_id()).touch()
        deadline = time.monotonic() + 60
        while len(list(folder.iterdir())) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return train_trial(config, data)

    return trainable


def crashing(should_crash):
    """The trainable, except that it kills its worker process (as a crash would) right
    after a report when ``should_crash(trial_id, metrics, restored)`` says so. A
    closure, so cloudpickle ships it and ``should_crash`` to the workers by value."""
    def trainable(config, data):
        import ray.tune

        from covid_tune.training.trial import train_trial

        trial_id = ray.tune.get_context().get_trial_id()
        restored = ray.tune.get_checkpoint() is not None
        report = ray.tune.report

        def report_then_crash(metrics, *args, **kwargs):
            report(metrics, *args, **kwargs)
            if should_crash(trial_id, metrics, restored):
                os._exit(1)

        ray.tune.report = report_then_crash
        try:
            return train_trial(config, data)
        finally:
            ray.tune.report = report

    return trainable


def test_a_crashed_trial_goes_on_from_its_checkpoint_and_a_diverged_one_fails_with_why(
        ray_cluster, binary_data, tmp_path):
    """Two trials that go wrong in one sweep, each in its own way:

    - lr 0.01 dies right after epoch 1's report and checkpoint (its worker exits): it
      is retried from that checkpoint, no epoch redone, and ends normally;
    - lr 1e6 makes the loss NaN: it fails with the reason and the fix in error.txt, its
      retry fails at once ("diverged before"), and TPE is told PRUNED, not FAIL, so it
      learns the region is bad.
    """
    doc = yaml.safe_load(space_file(tmp_path, 2, epochs=2).read_text())
    doc["params"]["lr"] = {"low": 1e-4, "high": 1e7, "log": True}
    doc["start_with"] = [{"lr": 0.01}, {"lr": 1e6}]
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(doc))
    crash_once = crashing(lambda trial_id, metrics, restored:
                          not restored and metrics["epoch"] == 1)
    opts = SweepOptions(space_file=str(tmp_path / "space.yaml"), data=str(binary_data),
                        name="crash", storage_path=str(tmp_path / "runs"), seed=1,
                        max_failures=1)
    results = run_sweep(opts, trainable=crash_once)
    by_lr = {t.config["lr"]: t for t in final_trials(tmp_path / "runs" / "crash")}
    assert set(by_lr) == {0.01, 1e6}
    crashed = by_lr[0.01]
    assert crashed.status == "TERMINATED" and crashed.num_failures == 1
    assert crashed.last_result["epoch"] == 2
    assert started_from(crashed.last_result) == 1  # epoch 1's checkpoint, none redone

    bad = next(r for r in results if r.config["lr"] == 1e6)
    assert "loss became nan" in str(bad.error) or "loss became inf" in str(bad.error)
    errors = (Path(bad.path) / "error.txt").read_text()
    assert "Failure # 1" in errors and "lr 1000000.0 is probably too high" in errors
    assert "Failure # 2" in errors and "diverged before; not trained again" in errors
    assert (Path(bad.path) / DIVERGED_FILE).is_file()
    study = optuna.load_study(study_name="crash",
                              storage=f"sqlite:///{tmp_path / 'runs' / 'crash' / STUDY_FILE}")
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "PRUNED"]


def second_checkpoint_on(run_dir: Path, node_id: str) -> str | None:
    """The id of a trial on ``node_id`` that saved its second checkpoint. Trials report
    synchronously, so by then the driver holds the first one: if the trial is lost from
    here on, it must restart from a checkpoint, not from scratch."""
    for recipe in run_dir.glob("trial_*/checkpoint_000001/recipe.json"):
        if json.loads(recipe.read_text())["metrics"]["node_id"] == node_id:
            return recipe.parent.parent.name.removeprefix("trial_")
    return None


def test_a_sweep_spreads_over_nodes_writes_to_a_uri_and_survives_losing_a_node(
        ray_cluster, binary_data, tmp_path):
    """Two trials started together run on the two nodes and write to a ``file://``
    bucket; the worker node is then killed after a trial on it saved its second
    checkpoint: that trial goes on from the checkpoint, on the other node, and the sweep
    ends with both trials, their TensorBoard files and a complete study in the bucket."""
    storage = f"file://{tmp_path / 'bucket'}"
    opts = SweepOptions(space_file=str(space_file(tmp_path, 2, epochs=4)),
                        data=str(binary_data), name="lost-node", storage_path=storage,
                        max_concurrent=2)
    run_dir = tmp_path / "bucket" / "lost-node"
    (tmp_path / "started").mkdir()
    outcome = {}
    sweep = threading.Thread(target=lambda: outcome.update(
        results=run_sweep(opts, trainable=together(tmp_path / "started", 2))))
    sweep.start()
    here = ray.get_runtime_context().get_node_id()
    worker = next(n for n in ray_cluster.worker_nodes if n.node_id != here)
    try:
        lost_id = wait_for(lambda: second_checkpoint_on(run_dir, worker.node_id),
                           "a trial on the worker node to save its second checkpoint")
        ray_cluster.remove_node(worker, allow_graceful=False)
    finally:
        ray_cluster.add_node(num_cpus=1)  # later tests get their two nodes back
    wait_for(lambda: not sweep.is_alive(), "the sweep to finish", timeout=300, every=1)
    wait_for(lambda: len(cluster.alive_nodes()) == 2, "Ray to mark the removed node dead")
    results = outcome["results"]
    assert len(results) == 2 and not results.errors
    assert all(r.metrics["epoch"] == 4 for r in results)
    first_nodes = {json.loads(p.read_text().splitlines()[0])["node_id"]
                   for p in run_dir.glob("trial_*/result.json")}  # each one's epoch 1
    assert first_nodes == {here, worker.node_id}, "both trials started on one node"
    lost = next(t for t in final_trials(run_dir) if t.trial_id == lost_id)
    assert lost.num_failures >= 1  # it was on the removed node
    assert lost.last_result["node_id"] != worker.node_id  # and ended on another one
    assert started_from(lost.last_result) >= 1  # from a checkpoint, not from scratch
    assert read_record(str(run_dir)).options.storage_path == storage
    for trial in run_dir.glob("trial_*"):  # TensorBoard files reach the storage too
        assert list(trial.glob("events.out.tfevents.*")), trial.name
    study = optuna.load_study(study_name="lost-node",
                              storage=f"sqlite:///{run_dir / STUDY_FILE}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]


SOAK_TRIALS = 200


def small_study(path: Path, num_samples: int, max_epochs: int, frozen_from: int,
                lr: tuple[float, float]) -> Path:
    """A tiny binary study written to ``path``: resnet18 at 32 px, the first
    ``frozen_from``..20 conv layers frozen, ASHA at every epoch, halving."""
    doc = {"task": "binary", "metric": "val_loss", "mode": "min", "max_epochs": max_epochs,
           "image_size": 32, "pretrained": "none", "num_samples": num_samples,
           "augment": False, "asha": {"grace_period": 1, "reduction_factor": 2},
           "params": {"backbone": "resnet18", "frozen_layers": {"low": frozen_from, "high": 20},
                      "lr": {"low": lr[0], "high": lr[1], "log": True},
                      "batch_size": 16, "hidden": 16, "dropout": 0.0}}
    path.write_text(yaml.safe_dump(doc))
    return path


def soak_space(folder: Path) -> Path:
    """The soak's tiny study: two epochs, ASHA after the first."""
    return small_study(folder / "soak.yaml", SOAK_TRIALS, 2, 8, (1e-3, 0.1))


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_soak_200_trials_with_random_crashes_and_a_node_killed(ray_cluster, binary_data,
                                                               tmp_path):
    """200 trials on four nodes; one trial in seven kills its worker after its first
    epoch (once), and a node is killed when a third of the trials have ended. Every
    trial is accounted for exactly once: in Ray's results, in its folder, and in the
    Optuna study, in agreeing states. Run with ``pytest -m soak -s``; its figures are in
    docs/benchmarks.md."""
    crashes = tmp_path / "crashes"
    crashes.mkdir()

    def once_in_seven(trial_id, metrics, restored):
        """One trial in seven (by its id) crashes after epoch 1, once (a marker file
        remembers)."""
        import zlib

        marker = crashes / trial_id
        if zlib.crc32(trial_id.encode()) % 7 or marker.exists():
            return False
        marker.touch()
        return True

    extra = [ray_cluster.add_node(num_cpus=1) for _ in range(2)]
    ray_cluster.wait_for_nodes()
    opts = SweepOptions(space_file=str(soak_space(tmp_path)), data=str(binary_data),
                        name="soak", storage_path=str(tmp_path / "runs"), seed=3,
                        max_failures=3)
    run_dir = tmp_path / "runs" / "soak"
    outcome: dict = {}
    started = time.monotonic()
    cpu_before = time.process_time()
    sweep = threading.Thread(target=lambda: outcome.update(
        results=run_sweep(opts, trainable=crashing(once_in_seven))))
    sweep.start()
    try:
        wait_for(lambda: len(list(run_dir.glob("trial_*/checkpoint_000000"))) >= SOAK_TRIALS // 3,
                 "a third of the trials to checkpoint", timeout=1800, every=1)
        killed_after = time.monotonic() - started
        ray_cluster.remove_node(extra[0], allow_graceful=False)
        wait_for(lambda: not sweep.is_alive(), "the sweep to finish", timeout=3600, every=2)
    finally:
        if sweep.is_alive():
            pytest.fail("the soak sweep did not finish")
        for node in extra[1:]:
            ray_cluster.remove_node(node)
    seconds = time.monotonic() - started
    driver_cpu = time.process_time() - cpu_before

    results = outcome["results"]
    trials = final_trials(run_dir)
    ids = [t.trial_id for t in trials]
    assert len(ids) == len(set(ids)) == len(results) == SOAK_TRIALS
    assert trial_folders(run_dir) == {f"trial_{i}" for i in ids}
    assert all(t.status in ("TERMINATED", "ERROR") for t in trials)
    crashed = {p.name for p in crashes.iterdir()}
    by_id = {t.trial_id: t for t in trials}
    assert crashed and all(by_id[i].num_failures >= 1 for i in crashed)
    study = optuna.load_study(study_name="soak", storage=f"sqlite:///{run_dir / STUDY_FILE}")
    assert len(study.trials) == SOAK_TRIALS
    states = {t.state.name for t in study.trials}
    errors = sum(t.status == "ERROR" for t in trials)
    assert sum(t.state.name == "FAIL" for t in study.trials) == errors
    assert states <= {"COMPLETE", "PRUNED", "FAIL"}
    retried = sum(t.num_failures > 0 for t in trials)
    print(f"\nsoak: {SOAK_TRIALS} trials in {seconds:.0f} s ({SOAK_TRIALS / seconds * 60:.1f} "
          f"trials/min) on {len(extra) + 2} nodes of 1 CPU; node killed at {killed_after:.0f} s; "
          f"{len(crashed)} trials crashed on purpose, {retried} retried in all, {errors} "
          f"ended in ERROR; study: "
          f"{', '.join(f'{s} {sum(t.state.name == s for t in study.trials)}' for s in sorted(states))}; "
          f"driver CPU {driver_cpu:.0f} s ({driver_cpu / seconds:.0%} of one core)")


def snapshot_mid_sweep(run_dir: Path, sweep: subprocess.Popen,
                       since: float = 0.0) -> dict | None:
    """Trial ids by state once the run's last snapshot, written after ``since`` (a
    time.time()), lists a finished trial and an unfinished one with a checkpoint (Ray
    lists running trials as PENDING), else None."""
    if sweep.poll() is not None:
        pytest.fail(f"the sweep ended (code {sweep.returncode}) before such a snapshot")
    try:
        if max(p.stat().st_mtime for p in run_dir.glob(RAY_STATE_GLOB)) <= since:
            return None
        trials = final_trials(run_dir)
    except Exception:  # no snapshot yet, or one being written
        return None
    done = {t.trial_id for t in trials if t.status == "TERMINATED"}
    mid = {t.trial_id for t in trials if t.status in ("PENDING", "RUNNING") and t.checkpoint}
    return {"done": done, "mid": mid} if done and mid else None


def stopped_at_snapshot_mid_sweep(run_dir: Path, driver: subprocess.Popen,
                                  since: float) -> dict | None:
    """``snapshot_mid_sweep``, read once more with the driver stopped (SIGSTOP): Ray
    rewrites its snapshot in place, so a kill while it writes would leave it cut off.
    The driver goes on (SIGCONT) when the second read does not hold."""
    if snapshot_mid_sweep(run_dir, driver, since) is None:
        return None
    driver.send_signal(signal.SIGSTOP)
    seen = snapshot_mid_sweep(run_dir, driver, since)
    if seen is None:
        driver.send_signal(signal.SIGCONT)
    return seen


def written_since(run_dir: Path, since: float) -> bool:
    """Whether a checkpoint of the run was written after ``since`` (a time.time())."""
    for recipe in run_dir.glob("trial_*/checkpoint_*/recipe.json"):
        try:
            if recipe.stat().st_mtime > since:
                return True
        except OSError:
            continue  # removed by Ray while we looked
    return False


def checkpoints(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.glob("trial_*/checkpoint_*")}


def stop_and_wait(driver: subprocess.Popen, signum: int, group: bool) -> tuple[int, float]:
    """Send ``signum`` (to the driver's whole process group, as a terminal's Ctrl-C
    does, when ``group``); (exit code, seconds until it exited)."""
    start = time.monotonic()
    if group:
        os.killpg(driver.pid, signum)
    else:
        driver.send_signal(signum)
    code = driver.wait(timeout=120)
    return code, time.monotonic() - start


def refused_line(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 2
    return capsys.readouterr().err


def signal_self_once(condition, signum: int, finished: threading.Event) -> threading.Thread:
    """A thread that sends ``signum`` to this process (its main thread runs a driver)
    once ``condition()`` holds, unless that driver has ``finished`` by then."""
    def watch():
        while not finished.is_set():
            if condition():
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.realistic  # 70-90 s of real stops and kills: make soak runs it (see its note)
def test_stopped_killed_and_stopped_again_a_sweep_resumes_with_every_trial_once(
        ray_cluster, binary_data, tmp_path, capsys):
    """One run through every way a driver ends early, then a resume to the end:

    1. the sweep gets Ctrl-C (SIGINT to its process group, as from a terminal, where
       Ray's own processes ignore it): exit 130 within 60 s naming the resume command;
       while it ran, the same sweep again was refused, naming it;
    2. a resume gets SIGTERM: exit 143, naming the resume command again;
    3. a resume is killed (SIGKILL) at a snapshot of its own with a finished and a
       half-done trial (its trials' workers go on a moment): its lock file stays;
    4. a last resume takes the lock over with a notice and finishes: every trial
       exactly once, the finished one never run again, the half-done one continued
       from its checkpoint (or, if the killed driver finished it, from its kept best),
       the study complete.
    """
    run_dir = tmp_path / "runs" / "stopped"
    args = sweep_args(space_file(tmp_path, 3), binary_data, tmp_path / "runs", "stopped",
                      ray_cluster.address, "--max-concurrent", "2")
    # Snapshot the run every second (Ray's default: every 10 s or more) so that the
    # moment with a finished and a half-done trial is sure to be on disk.
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    with open(tmp_path / "sweep.log", "w") as out:  # its own process group, as in a shell
        sweep = subprocess.Popen([sys.executable, "-m", "covid_tune", *args], stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        wait_for(lambda: checkpoints(run_dir), "a first checkpoint")
        err = refused_line(capsys, *args[:-2])  # the same sweep again, same folder
        assert f"in use by pid {sweep.pid} on " in err and "covid-tune resume" in err
        code, seconds = stop_and_wait(sweep, signal.SIGINT, group=True)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    log = (tmp_path / "sweep.log").read_text()
    print(f"Ctrl-C: exit {code} after {seconds:.1f} s")
    assert code == 130 and seconds < 10, log[-3000:]
    assert ("stopped by SIGINT; finished trials and every other trial's last checkpoint "
            f"are kept; continue with: covid-tune resume {run_dir}") in log
    assert not (run_dir / LOCK_FILE).exists()

    # SIGTERM once the resume has written a checkpoint (by file time, not by name: a
    # resumed trial may write one under a name that is already there). Before the kill
    # below, so that there is still training to stop: the killed driver may finish
    # every trial past its last snapshot, and then a resume only re-reports.
    since = time.time()
    finished = threading.Event()
    signal_self_once(lambda: written_since(run_dir, since), signal.SIGTERM, finished)
    capsys.readouterr()
    try:
        code = main(["resume", str(run_dir)])
    finally:
        finished.set()
    err = capsys.readouterr().err
    assert code == 143 and "stopped by SIGTERM; " in err, err
    assert f"covid-tune resume {run_dir}" in err
    assert not (run_dir / LOCK_FILE).exists()

    since = time.time()
    resume = start_driver(["resume", str(run_dir)], tmp_path / "killed.log",
                          TUNE_GLOBAL_CHECKPOINT_S="1")
    try:
        seen = wait_for(lambda: stopped_at_snapshot_mid_sweep(run_dir, resume, since),
                        "a snapshot with a finished and a half-done trial", every=0.5)
    finally:
        resume.send_signal(signal.SIGKILL)
        resume.wait()
    done = {t.trial_id: t.last_result["timestamp"] for t in final_trials(run_dir)
            if t.trial_id in seen["done"]}
    assert (run_dir / LOCK_FILE).exists()  # left behind; its flock died with the driver

    capsys.readouterr()
    assert main(["resume", str(run_dir)]) == 0
    assert f"taking over the lock of pid {resume.pid} on " in capsys.readouterr().out
    trials = final_trials(run_dir)
    ids = [t.trial_id for t in trials]
    assert len(ids) == len(set(ids)) == 3
    assert all(t.status == "TERMINATED" and t.last_result["epoch"] == EPOCHS for t in trials)
    assert trial_folders(run_dir) == {f"trial_{i}" for i in ids}  # lost ones set aside
    by_id = {t.trial_id: t.last_result for t in trials}
    for trial_id, stamp in done.items():
        assert by_id[trial_id]["timestamp"] == stamp  # kept as it was, not run again
    for trial_id in seen["mid"]:
        assert started_from(by_id[trial_id]) >= 1  # went on from its checkpoint
    study = optuna.load_study(study_name="stopped", storage=f"sqlite:///{run_dir / STUDY_FILE}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert sorted(t.params["lr"] for t in study.trials) == sorted(t.config["lr"] for t in trials)


def test_resume_sets_aside_folders_of_trials_the_snapshot_lost(tmp_path):
    for name in ("trial_a", "trial_b", "trial_c"):
        (tmp_path / name / "checkpoint_000000").mkdir(parents=True)

    class Result:
        def __init__(self, name):
            self.path = str(tmp_path / name)

    lost = set_aside_lost_trials(str(tmp_path), [Result("trial_a"), Result("trial_b")])
    assert lost == ["trial_c"]
    assert trial_folders(tmp_path) == {"trial_a", "trial_b"}
    assert (tmp_path / LOST_DIR / "trial_c" / "checkpoint_000000").is_dir()


def trial_from_snapshot(state: str, metadata: str):
    """A trial as a resume reads it back from a snapshot of the run (its two JSON
    texts there, as ``Trial.get_json_state`` writes them)."""
    from ray.tune.experiment import Trial

    trial = Trial.from_json_state(state, stub=True)
    trial.restore_run_metadata(metadata)
    return trial


def snapshot_trial(trial):
    return trial_from_snapshot(*trial.get_json_state())


def test_a_checkpoint_gone_after_the_last_snapshot_is_not_asked_for_on_resume(tmp_path):
    """A driver killed between snapshots went on: a better checkpoint made Ray delete
    the one the snapshot names. The resumed trial goes on from the newest folder it
    still has (from the start when it has none) instead of failing on every try."""
    from ray.train._internal.session import _TrainingResult
    from ray.tune import Checkpoint, CheckpointConfig, PlacementGroupFactory
    from ray.tune.experiment import Trial

    trial = Trial("train_trial", config={}, stub=True,
                  placement_group_factory=PlacementGroupFactory([{"CPU": 1}]),
                  checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_order="min",
                                                     checkpoint_score_attribute="val_loss"))
    trial.create_placement_group_factory()  # as Tune does when it adds a trial
    folders = [tmp_path / "trial" / f"checkpoint_{i:06d}" for i in range(2)]
    for folder in folders:
        folder.mkdir(parents=True)
    manager = trial.run_metadata.checkpoint_manager
    manager.register_checkpoint(_TrainingResult(Checkpoint(str(folders[0])), {"val_loss": 0.9}))
    snapshot = snapshot_trial(trial)
    nothing_kept = snapshot_trial(trial)
    manager.register_checkpoint(_TrainingResult(Checkpoint(str(folders[1])), {"val_loss": 0.5}))
    assert not folders[0].exists()  # Ray deleted it after the snapshot was taken

    assert go_on_from_a_kept_checkpoint(snapshot) == str(folders[1])
    assert snapshot.checkpoint.path == str(folders[1])
    assert go_on_from_a_kept_checkpoint(snapshot) is None  # nothing gone now
    assert snapshot_trial(snapshot).checkpoint.path == str(folders[1])  # the next snapshot
    shutil.rmtree(tmp_path / "trial")
    assert go_on_from_a_kept_checkpoint(nothing_kept) is None
    assert nothing_kept.checkpoint is None  # it starts again


def test_trials_whose_checkpoint_went_after_the_last_snapshot_resume_to_their_end(
        swept, tmp_path, capsys):
    """The snapshot says two trials still run, from checkpoints that are gone; both in
    fact finished and kept their best epoch (``keep_best``). One goes on from its kept
    checkpoint to the last epoch; the other's kept checkpoint is its last epoch (here by
    giving it that many epochs), so it only tells Tune its end again. Every trial once."""
    from ray.tune.experiment import Trial

    run_dir = tmp_path / "binary"
    shutil.copytree(swept.binary, run_dir)
    newest = sorted(run_dir.glob(RAY_STATE_GLOB))[-1]
    state = json.loads(newest.read_text())
    trials = [trial_from_snapshot(*row) for row in state["trial_data"]]
    goes_on = next(t for t in trials if t.last_result["epoch"] == 3)
    ends = next(t for t in trials if t is not goes_on)
    kept = {t.trial_id: json.loads(recipe.read_text())["epoch"] for t in (goes_on, ends)
            for recipe in (run_dir / f"trial_{t.trial_id}").glob("checkpoint_*/recipe.json")}
    ends.config = {**ends.config, "max_epochs": kept[ends.trial_id]}
    for trial in (goes_on, ends):
        manager = trial.run_metadata.checkpoint_manager
        manager._latest_checkpoint_result = type(manager._latest_checkpoint_result)(
            # In the original run folder: Tune moves the paths to the copy it resumes.
            checkpoint=type(trial.checkpoint)(f"{trial.path}/checkpoint_000099"),
            metrics=trial.last_result)
        trial.set_status(Trial.RUNNING)
        trial.stub = False  # read as a stub (Tune's trainable is not registered here)
        trial.invalidate_json_state()
        trial.run_metadata.invalidate_cache()
    state["trial_data"] = [list(t.get_json_state()) for t in trials]
    newest.write_text(json.dumps(state))
    (run_dir / SNAPSHOT_FILE).unlink()  # its whole copy would name the kept checkpoints

    capsys.readouterr()
    assert main(["resume", str(run_dir)]) == 0
    out = capsys.readouterr().out
    for trial in (goes_on, ends):
        assert (f"note: trial {trial.trial_id}: the run's last snapshot names its checkpoint "
                f"checkpoint_000099, gone since; it goes on from ") in out
    after = {t.trial_id: t for t in final_trials(run_dir)}
    assert len(after) == 6 and trial_folders(run_dir) == {f"trial_{i}" for i in after}
    assert all(t.status == "TERMINATED" for t in after.values())
    assert after[goes_on.trial_id].last_result["epoch"] == 3
    assert started_from(after[goes_on.trial_id].last_result) == kept[goes_on.trial_id]
    told = after[ends.trial_id].last_result
    assert told["epoch"] == kept[ends.trial_id] and told["iterations_since_restore"] == 1
    assert len(list((run_dir / f"trial_{ends.trial_id}").glob("checkpoint_*"))) == 1


def test_resume_of_a_run_whose_ray_snapshot_is_damaged(swept, tmp_path, capsys, monkeypatch):
    """A truncated experiment_state file: one line, exit 2, and no Ray work done."""
    import covid_tune.search.sweep

    def start_ray(address):
        raise AssertionError("Ray was started before the damaged snapshot was found")

    monkeypatch.setattr(covid_tune.search.sweep, "start_ray", start_ray)
    run_dir = tmp_path / "binary"
    shutil.copytree(swept.binary, run_dir)
    newest = sorted(run_dir.glob(RAY_STATE_GLOB))[-1]
    text = newest.read_text()
    newest.write_text(text[: len(text) // 2])
    (run_dir / SNAPSHOT_FILE).unlink()  # with its whole copy it goes on (test_ray_state)
    before = sorted(p.name for p in run_dir.iterdir())
    assert main(["resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"covid-tune: error: {newest}: damaged, not readable JSON")
    assert err.count("\n") == 1 and "cannot be resumed" in err
    assert sorted(p.name for p in run_dir.iterdir()) == before


# --- the local Ray covid-tune starts ----------------------------------------------------

RAY_PROBE = textwrap.dedent("""
    import json, os
    from covid_tune.search.cluster import start_ray
    start_ray(None)
    import ray
    def read(pid, name):
        try:
            with open(f"/proc/{pid}/{name}") as file:
                return file.read()
        except OSError:
            return ""
    def descendants(pid):
        kids = [p for p in os.listdir("/proc") if p.isdigit()
                and read(p, "stat").rsplit(")", 1)[-1].split()[1:2] == [str(pid)]]
        return kids + [d for k in kids for d in descendants(k)]
    commands = [read(pid, "cmdline").split("\\0") for pid in descendants(os.getpid())]
    print(json.dumps({"nodes": len(ray.nodes()),
                      "own_gcs": any(c[0].endswith("gcs_server") for c in commands),
                      "dashboards": [c for c in commands if any("dashboard.py" in a for a in c)]}))
""")


def probe_local_ray(**env: str) -> dict:
    result = subprocess.run([sys.executable, "-c", RAY_PROBE], capture_output=True, text=True,
                            timeout=180, cwd=ROOT, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_the_local_ray_is_new_and_its_dashboard_listens_on_localhost_only(ray_cluster):
    """The test cluster is running and recorded in /tmp/ray/ray_current_cluster; the
    Ray that covid-tune starts must still be its own (its GCS a child process), with
    its dashboard bound to 127.0.0.1."""
    probe = probe_local_ray()
    assert probe["own_gcs"] and probe["nodes"] == 1
    assert probe["dashboards"], "no dashboard process found"
    for command in probe["dashboards"]:
        assert "--host=127.0.0.1" in command, command


@ray.remote(num_cpus=1)
class Hog:
    """Holds one CPU of the cluster, as another job would."""

    def ready(self) -> bool:
        return True


def test_a_sweep_with_nothing_it_can_run_says_why_stops_on_sigterm_then_ends_stalled(
        ray_cluster, binary_data, tmp_path, capsys, monkeypatch):
    """Every CPU of the cluster is held by another job, so no trial can start:

    1. the sweep's status line says why (trials wait for resources, none free), and
       SIGTERM in that state ends it within 10 s with the resume command;
    2. a resume with a stall limit of 4 s ends by itself: exit 1, one line saying it
       stalled and how to go on;
    3. once the CPUs are free, a resume runs every trial to its end.
    """
    hogs = [Hog.remote() for _ in range(2)]
    ray.get([hog.ready.remote() for hog in hogs])
    run_dir = tmp_path / "runs" / "waiting"
    args = sweep_args(space_file(tmp_path, 1, epochs=1), binary_data, tmp_path / "runs",
                      "waiting", ray_cluster.address)
    monkeypatch.setenv("COVID_TUNE_STALL_LIMIT", "4")  # the line notes a stall after 2 s
    saying = {}
    try:
        finished = threading.Event()
        signal_self_once(lambda: said_nothing_runs(capsys, saying), signal.SIGTERM, finished)
        try:
            code = main(args)
        finally:
            finished.set()
        seconds = time.monotonic() - saying["when"]
        out = saying["out"] + capsys.readouterr().err
        print(f"SIGTERM while waiting: exit {code} after {seconds:.1f} s")
        assert code == 143 and seconds < 10, out[-3000:]
        assert re.search(r"\d trial\(s\) wait for resources: each needs 1 CPU, the cluster "
                         r"has 0 CPU free", out), out[-3000:]
        assert f"continue with: covid-tune resume {run_dir}" in out

        assert main(["resume", str(run_dir)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("covid-tune: stalled: nothing ran for ")
        assert f"continue with: covid-tune resume {run_dir}" in err[0]
    finally:
        for hog in hogs:
            ray.kill(hog)

    monkeypatch.delenv("COVID_TUNE_STALL_LIMIT")
    wait_for(lambda: ray.available_resources().get("CPU", 0) >= 2, "the CPUs to be free")
    assert main(["resume", str(run_dir)]) == 0
    trials = final_trials(run_dir)
    assert len(trials) == 1 and trials[0].status == "TERMINATED"
    assert trials[0].last_result["epoch"] == 1


def said_nothing_runs(capsys, saying: dict) -> bool:
    """Whether the sweep's output so far says nothing runs; keeps what it read, and when."""
    saying["out"] = saying.get("out", "") + capsys.readouterr().out
    if "nothing running for" in saying["out"]:
        saying["when"] = time.monotonic()
        return True
    return False


# --- exact resume ----------------------------------------------------------------------

def exact_space(folder: Path) -> Path:
    """A study where ASHA stops trials and TPE takes over after two, small enough that
    a trial lasts seconds."""
    return small_study(folder / "exact.yaml", 7, 4, 14, (1e-4, 0.3))


def outcome(run_dir: Path) -> dict:
    """What the sweep found, independent of Ray's random trial ids: each trial's
    configuration with the epochs it trained and its score at each, and the best row."""
    trials = {}
    for folder in run_dir.glob("trial_*"):
        config = json.dumps(json.loads((folder / "params.json").read_text()), sort_keys=True)
        rows = [json.loads(line) for line in (folder / "result.json").read_text().splitlines()
                if line.strip()]
        trials[config] = {row["epoch"]: row["val_loss"] for row in rows}
    best = min((score, epoch, config) for config, scores in trials.items()
               for epoch, score in scores.items())
    return {"trials": trials, "best": best}


def results_in(run_dir: Path) -> int:
    """Epoch results the driver has written so far, over all trials."""
    count = 0
    for path in run_dir.glob("trial_*/result.json"):
        try:
            count += sum(1 for line in path.read_text().splitlines() if line.strip())
        except OSError:
            continue
    return count


def interrupted(args: list[str], run_dir: Path, log: Path, stop) -> int:
    """Start the sweep, let ``stop(driver)`` interrupt it, then resume it to its end in
    another driver; the resume's exit code."""
    driver = start_driver(args, log)
    try:
        stop(driver)
        driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    resume = start_driver(["resume", str(run_dir)], log.with_suffix(".resume.log"))
    return resume.wait(timeout=600)


@pytest.mark.realistic  # three sweeps with real stops: about 3 minutes (make soak)
def test_a_sweep_stopped_or_killed_then_resumed_finds_what_it_finds_uninterrupted(
        ray_cluster, binary_data, tmp_path):
    """Issue 23's exact resume: with one trial at a time and a fixed seed, a sweep
    interrupted by Ctrl-C after some of its trials, or killed (SIGKILL) at a random
    moment, then resumed, ends with the same trials (same parameters), the same
    epochs in each (the same ASHA stops), the same scores and the same best row as the
    same sweep never interrupted. ASHA's rungs come back from the run's snapshot, a
    trial goes on from its newest checkpoint and reports it again, and a snapshot Ray
    was copying when killed comes back from its whole copy."""
    import random

    space, storage = exact_space(tmp_path), tmp_path / "runs"

    def args(name: str) -> list[str]:
        return sweep_args(space, binary_data, storage, name, ray_cluster.address,
                          "--max-concurrent", "1")

    start = time.monotonic()
    whole = start_driver(args("whole"), tmp_path / "whole.log")
    assert whole.wait(timeout=600) == 0, (tmp_path / "whole.log").read_text()[-3000:]
    seconds = time.monotonic() - start
    expected = outcome(storage / "whole")
    stopped_early = sum(max(s) < 4 for s in expected["trials"].values())
    print(f"uninterrupted: {len(expected['trials'])} trials, {stopped_early} stopped by "
          f"ASHA, {seconds:.0f} s")
    assert len(expected["trials"]) == 7 and stopped_early >= 1

    def ctrl_c_after_three(driver):
        wait_for(lambda: len(list((storage / "ctrl-c").glob("trial_*/checkpoint_*"))) >= 3
                 and len(list((storage / "ctrl-c").glob("trial_*"))) >= 3, "three trials")
        driver.send_signal(signal.SIGINT)

    chance = random.Random()
    epochs = sum(len(scores) for scores in expected["trials"].values())
    after, jitter = chance.randint(1, epochs - 2), chance.uniform(0.0, 1.0)

    def kill_at_random(driver):
        """SIGKILL at a random moment: a random number of epochs into the sweep, then a
        random fraction of a second (mid-epoch, mid-snapshot or between trials)."""
        wait_for(lambda: results_in(storage / "killed") >= after, f"{after} epochs")
        time.sleep(jitter)
        assert driver.poll() is None, "the sweep ended before the kill"
        print(f"kill -9 {jitter:.2f} s after epoch {after} of {epochs}")
        driver.kill()

    for name, stop in (("ctrl-c", ctrl_c_after_three), ("killed", kill_at_random)):
        code = interrupted(args(name), storage / name, tmp_path / f"{name}.log", stop)
        log = (tmp_path / f"{name}.resume.log").read_text()
        assert code == 0, log[-3000:]
        found = outcome(storage / name)
        assert sorted(found["trials"]) == sorted(expected["trials"]), name  # same parameters
        for config, scores in expected["trials"].items():
            assert sorted(found["trials"][config]) == sorted(scores), (name, config)  # epochs
            assert found["trials"][config] == scores, (name, config)
        assert found["best"] == expected["best"], name
