"""cluster/ (Ray cluster launcher) and k8s/ (KubeRay, Kueue) configs, validated the way their tools do:
Ray's own config preparation and schema for `ray up`; KubeRay's and Kueue's CRD schemas (the
openAPIV3Schema that the API server enforces) and Kubernetes' schemas for the core kinds."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT.parent / "shared" / "reference" / "kuberay-crds"
# API group -> the folder of its project's CRDs (the reference copies beside the checkout)
CRD_FOLDERS = {"ray.io": CRDS, "kueue.x-k8s.io": ROOT.parent / "shared" / "reference" / "kueue-crds"}
KUBERNETES_VERSION = "1.33.0"
CLUSTER_CONFIGS = sorted((ROOT / "cluster").glob("*.yaml"))
MANIFEST_FILES = sorted(path for path in (ROOT / "k8s").glob("*.yaml") if path.name != "kustomization.yaml")


def ray_up_check(config: dict) -> dict:
    """What `ray up` does to a config before it touches a cloud: fill in defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_cluster_launcher_configs_pass_rays_validation(path):
    config = yaml.safe_load(path.read_text())
    prepared = ray_up_check(config)
    assert prepared["cluster_name"] == "deepyard"
    # every node tracks to the team's MLflow and checkpoints to shared storage
    options = " ".join(config["docker"]["run_options"])
    assert "MLFLOW_TRACKING_URI=" in options and "DEEPYARD_STORAGE=" in options


def test_cloud_configs_have_a_cpu_head_and_autoscaling_gpu_workers():
    for name in ("aws.yaml", "gcp.yaml"):
        types = yaml.safe_load((ROOT / "cluster" / name).read_text())["available_node_types"]
        assert types["gpu_workers"]["min_workers"] == 0 < types["gpu_workers"]["max_workers"]
        assert "docker" in types["gpu_workers"] and types["gpu_workers"]["docker"]["worker_image"].endswith(":gpu")


def test_a_broken_cluster_config_is_refused_by_the_same_check():
    config = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    config["available_node_types"]["gpu_workers"]["min_workerz"] = 1
    with pytest.raises(Exception, match="min_workerz"):
        ray_up_check(config)


def manifests() -> list[tuple[str, dict]]:
    return [(f"{path.name}:{doc['kind']}/{doc['metadata'].get('name') or doc['metadata'].get('generateName')}", doc)
            for path in MANIFEST_FILES for doc in yaml.safe_load_all(path.read_text()) if doc]


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the CRD's schema of that version, for every CRD at hand."""
    schemas = {}
    for folder in CRD_FOLDERS.values():
        for path in sorted(folder.glob("*.yaml")):  # ~1 MB each: libyaml's loader, once per session
            crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            for version in crd["spec"]["versions"]:
                api_version = f"{crd['spec']['group']}/{version['name']}"
                schemas[(api_version, crd["spec"]["names"]["kind"])] = version["schema"]["openAPIV3Schema"]
    return schemas


def _strict(schema):
    """A CRD schema as the API server applies it: unknown fields are errors (structural schemas
    prune them; `kubectl apply --validate=strict` refuses them)."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    return [_strict(item) for item in schema] if isinstance(schema, list) else schema


@pytest.mark.slow  # Kubernetes' schemas load in ~2 s: make test-fast skips these
@pytest.mark.parametrize(("name", "manifest"), manifests(), ids=[name for name, _ in manifests()])
def test_k8s_manifests_validate_against_their_schemas(name, manifest):
    group = manifest["apiVersion"].split("/")[0]
    if group in CRD_FOLDERS:
        if not CRD_FOLDERS[group].is_dir():
            pytest.skip(f"{group}'s CRDs are not here ({CRD_FOLDERS[group]})")
        import jsonschema

        schema = _strict(crd_schemas()[(manifest["apiVersion"], manifest["kind"])])
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in jsonschema.Draft7Validator(schema).iter_errors(manifest)]
        assert not errors, errors
    else:
        import kubernetes_validate

        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


@pytest.mark.slow  # KubeRay's CRDs load in ~2 s: make test-fast skips it
def test_the_crd_check_catches_a_misspelled_field():
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay's CRDs are not here ({CRDS}); CI has them")
    import jsonschema

    cluster = next(doc for _, doc in manifests() if doc["kind"] == "RayCluster")
    broken = copy.deepcopy(cluster)
    broken["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        jsonschema.validate(broken, _strict(crd_schemas()[("ray.io/v1", "RayCluster")]))


def test_every_training_node_frees_objects_as_a_local_cluster_does():
    """settings.NODE_ENV (the raylet's own settings, which a running cluster takes from its nodes'
    environment, not from a job) is in every `ray up` config and every KubeRay training container."""
    from deepyard.settings import NODE_ENV

    expected = {f"{key}={value}" for key, value in NODE_ENV.items()}
    for path in CLUSTER_CONFIGS:
        options = yaml.safe_load(path.read_text())["docker"]["run_options"]
        assert expected <= {option.removeprefix("--env ") for option in options}, path.name
    trainers = [doc for _, doc in manifests() if doc["kind"] in ("RayCluster", "RayJob")]
    for doc in trainers:
        cluster = doc["spec"].get("rayClusterSpec", doc["spec"])
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for group in groups:
            env = {item["name"]: item.get("value") for item in group["template"]["spec"]["containers"][0]["env"]}
            assert NODE_ENV.items() <= env.items(), (doc["kind"], group.get("groupName", "head"))


def test_the_manifests_tie_together():
    """kustomize lists every manifest but the RayJob template; GPU workers ask for nvidia.com/gpu;
    the RayJob cleans up after itself; the RayService serves what serving/digits.yaml serves."""
    kustomization = yaml.safe_load((ROOT / "k8s" / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {p.name for p in MANIFEST_FILES} - {"rayjob.yaml", "kueue.yaml"}
    documents = {doc["kind"]: doc for _, doc in manifests()}
    cluster = documents["RayCluster"]["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    gpu = next(group for group in cluster["workerGroupSpecs"] if group["groupName"] == "gpu")
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    job = documents["RayJob"]["spec"]
    assert job["shutdownAfterJobFinishes"] and job["ttlSecondsAfterFinished"] > 0 and job["backoffLimit"] >= 1
    assert job["entrypoint"].startswith("deepyard run jobs/") and (ROOT / job["entrypoint"].split()[2]).is_file()
    served = yaml.safe_load(documents["RayService"]["spec"]["serveConfigV2"])["applications"]
    assert served == yaml.safe_load((ROOT / "serving" / "digits.yaml").read_text())["applications"]
    assert {"Deployment", "StatefulSet", "Service"} <= set(documents)
    assert "images" not in kustomization or all("newTag" not in image for image in kustomization["images"])
    assert "--allowed-hosts" in " ".join(documents["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"])


def test_the_rayjob_is_queued_by_the_kueue_objects():
    """The RayJob's queue and priority labels name a LocalQueue and a WorkloadPriorityClass of
    k8s/kueue.yaml; the LocalQueue feeds the ClusterQueue, whose flavors exist and whose quota
    covers what one RayJob's cluster asks for (or it could never be admitted)."""
    documents = [doc for _, doc in manifests()]
    named = {(doc["kind"], doc["metadata"].get("name")): doc for doc in documents}
    job = next(doc for doc in documents if doc["kind"] == "RayJob")
    labels = job["metadata"]["labels"]
    local_queue = named[("LocalQueue", labels["kueue.x-k8s.io/queue-name"])]
    assert ("WorkloadPriorityClass", labels["kueue.x-k8s.io/priority-class"]) in named
    cluster_queue = named[("ClusterQueue", local_queue["spec"]["clusterQueue"])]
    quota = {}
    for group in cluster_queue["spec"]["resourceGroups"]:
        for flavor in group["flavors"]:
            assert ("ResourceFlavor", flavor["name"]) in named
            quota.update({r["name"]: r["nominalQuota"] for r in flavor["resources"]})
    spec = job["spec"]["rayClusterSpec"]
    pods = [(1, spec["headGroupSpec"]["template"])] + [(g.get("replicas", 1), g["template"])
                                                        for g in spec.get("workerGroupSpecs", [])]
    containers = [(count, c["resources"]) for count, template in pods for c in template["spec"]["containers"]]
    cpus = sum(count * float(r["requests"]["cpu"]) for count, r in containers)
    memory_gi = sum(count * gibibytes(r["requests"]["memory"]) for count, r in containers)
    gpus = sum(count * int(r.get("limits", {}).get("nvidia.com/gpu", 0)) for count, r in containers)
    assert cpus <= quota["cpu"] and memory_gi <= gibibytes(quota["memory"]) and gpus <= quota["nvidia.com/gpu"]


def gibibytes(quantity: str) -> float:
    """A Kubernetes memory quantity (Gi, Mi) in GiB."""
    units = {"Gi": 1, "Mi": 1 / 1024, "Ti": 1024}
    return next(float(quantity[:-2]) * factor for unit, factor in units.items() if quantity.endswith(unit))


def test_what_a_submitted_job_takes_from_here(monkeypatch):
    """To a remote cluster only settings that mean something there travel; credentials only when asked."""
    from deepyard.errors import BadInput
    from deepyard.submit import passed_environment

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////home/me/mlflow.db")
    monkeypatch.setenv("DEEPYARD_STORAGE", "s3://team/checkpoints")
    monkeypatch.setenv("DEEPYARD_HOME", "/home/me/.deepyard")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2")
    assert passed_environment(False, []) == {"DEEPYARD_STORAGE": "s3://team/checkpoints"}
    local = passed_environment(True, [])
    assert local["MLFLOW_TRACKING_URI"] == "sqlite:////home/me/mlflow.db" and "MLFLOW_TRACKING_PASSWORD" not in local
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    remote = passed_environment(False, ["MLFLOW_TRACKING_PASSWORD", "WANDB_MODE=offline"])
    assert remote == {"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000", "DEEPYARD_STORAGE": "s3://team/checkpoints",
                      "MLFLOW_TRACKING_PASSWORD": "hunter2", "WANDB_MODE": "offline"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://localhost:5000")  # a port-forward: not the cluster's
    assert "MLFLOW_TRACKING_URI" not in passed_environment(False, [])
    with pytest.raises(BadInput, match="--env NOT_SET_HERE: not set here"):
        passed_environment(False, ["NOT_SET_HERE"])
