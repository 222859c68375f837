"""cluster/: the KubeRay manifests, the `ray up` config and the Serve config they embed are checked
against the fields Ray and KubeRay require; `cluster/local.sh` runs a real three-node Ray cluster on
which data preparation and a short training are submitted through the Jobs API.

Schema checks use Ray's own validators where Ray ships them (the `ray up` JSON schema, the Serve
config models, the `ray start` / `mlflow server` command-line parsers, the `bubogpt` parser) and,
for KubeRay (not installed here), required-field lists copied from its CRDs (below).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
KUBERAY_GPU = CLUSTER / "kuberay-gpu"  # the overlay with serve/config.gpu.yaml
MONITORING = CLUSTER / "monitoring"  # PodMonitor + Grafana dashboard
JOBS = KUBERAY / "jobs"  # the RayJobs, each with raycluster.yaml's spec as its own cluster
JOB_LABEL = "bubogpt.io/job"
SERVE_CONFIG = REPO / "serve" / "config.yaml"
SERVE_GPU_CONFIG = REPO / "serve" / "config.gpu.yaml"
GRAFANA_DASHBOARD = CLUSTER / "grafana" / "bubogpt-serving.json"
AWS_CONFIG = CLUSTER / "aws" / "bubogpt.yaml"
PROJECT_IMAGE = "ghcr.io/OWNER/bubogpt-ray"  # the image name the manifests use (kustomize `images`)
VENV_PYTHON = REPO / ".venv" / "bin" / "python"

# ------------------------------------------------------------------------------------------------
# Required fields, copied from the schemas (a minimal subset: what our manifests use).
#
# KubeRay CRDs: ray-project/kuberay, ray-operator/config/crd/bases/ray.io_rayclusters.yaml,
# ray.io_rayjobs.yaml, ray.io_rayservices.yaml (generated from ray-operator/apis/ray/v1/
# raycluster_types.go, rayjob_types.go, rayservice_types.go). `rayStartParams` of the head group is
# optional in recent CRDs and required in older ones: we always give it.
RAYCLUSTER_SPEC_REQUIRED = ("headGroupSpec",)
HEAD_GROUP_REQUIRED = ("rayStartParams", "template")
WORKER_GROUP_REQUIRED = ("groupName", "maxReplicas", "minReplicas", "rayStartParams", "template")
RAYJOB_SPEC_REQUIRED = ("entrypoint",)
# RayService: serveConfigV2 and rayClusterConfig are optional in the CRD, but a RayService without
# them deploys nothing; KubeRay's validation requires a head group in rayClusterConfig.
RAYSERVICE_SPEC_REQUIRED = ("serveConfigV2", "rayClusterConfig")
# RayClusterSpec.authOptions and .gcsFaultToleranceOptions (raycluster_types.go, KubeRay 1.6): the
# fields and the enum; KubeRay refuses a Redis password given both here and in rayStartParams.
AUTH_OPTIONS_FIELDS = {"mode", "secretName", "enableK8sTokenAuth"}
AUTH_MODES = ("disabled", "token")
RAY_AUTH_TOKEN_SECRET_KEY = "auth_token"  # utils.RAY_AUTH_TOKEN_SECRET_KEY: the key KubeRay reads
GCS_FT_FIELDS = {"backend", "redisUsername", "redisPassword", "externalStorageNamespace", "redisAddress", "storage"}
# Prometheus Operator (monitoring.coreos.com/v1 PodMonitor): what our PodMonitor uses.
PODMONITOR_SPEC_REQUIRED = ("selector", "podMetricsEndpoints")
# Kubernetes core/v1 and apps/v1 (embedded in the CRDs above as PodTemplateSpec):
POD_SPEC_REQUIRED = ("containers",)
CONTAINER_REQUIRED = ("name",)
CONTAINER_PORT_REQUIRED = ("containerPort",)
ENV_VAR_REQUIRED = ("name",)
VOLUME_MOUNT_REQUIRED = ("mountPath", "name")
DEPLOYMENT_SPEC_REQUIRED = ("selector", "template")
SERVICE_PORT_REQUIRED = ("port",)
OBJECT_REQUIRED = ("apiVersion", "kind", "metadata")
# `ray up`: ray-project/ray, python/ray/autoscaler/ray-schema.json (also validated in full below
# with the copy Ray installs).
RAY_UP_REQUIRED = ("cluster_name", "provider")
RAY_UP_PROVIDER_REQUIRED = ("type",)
RAY_UP_NODE_TYPE_REQUIRED = ("resources", "node_config")

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
KUBERAY_KINDS = {"RayCluster", "RayJob", "RayService"}


def missing(obj: dict, required: tuple[str, ...]) -> list[str]:
    return [key for key in required if key not in obj]


# ------------------------------------------------------------------------------------------------
# A kustomize build in Python: exactly the features cluster/kuberay/kustomization.yaml uses.


def kustomize_build(folder: Path) -> list[dict[str, Any]]:
    """The objects `kustomize build --load-restrictor LoadRestrictionsNone folder` prints."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "namespace", "resources", "images", "configMapGenerator", "replacements"}
    unknown = set(kustomization) - known
    assert not unknown, f"kustomization uses {unknown}, which this emulation does not implement"

    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        if (folder / resource).is_dir():  # a base: built first, its own transformations included
            objects += kustomize_build((folder / resource).resolve())
        else:
            objects += [doc for doc in yaml.safe_load_all((folder / resource).read_text()) if doc]
    for generator in kustomization.get("configMapGenerator", []):
        options = generator.get("options", {})
        assert options.get("disableNameSuffixHash"), "name hashes are not emulated"
        data = {}
        for entry in generator["files"]:
            key, _, path = entry.rpartition("=")
            data[key or Path(path).name] = (folder / path).read_text()
        if generator.get("behavior", "create") == "replace":
            find_object(objects, "ConfigMap", generator["name"])["data"] = data
            continue
        metadata = {"name": generator["name"], **({"labels": options["labels"]} if "labels" in options else {})}
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    for image in kustomization.get("images", []):
        for obj in objects:
            for container in iter_containers(obj):
                name, tag = split_image(container["image"])
                if name == image["name"]:
                    new_name = image.get("newName", name)
                    container["image"] = f"{new_name}:{image.get('newTag', tag)}"
    for replacement in kustomization.get("replacements", []):
        source = replacement["source"]
        value = get_path(find_object(objects, source["kind"], source["name"]), source["fieldPath"])
        for target in replacement["targets"]:
            select = target["select"]  # by kind, and by name where given
            chosen = [o for o in objects if o["kind"] == select["kind"] and o["metadata"]["name"] == select.get("name", o["metadata"]["name"])]
            assert chosen, f"replacement target {select} selects nothing"
            for obj, field_path in ((o, f) for o in chosen for f in target["fieldPaths"]):
                set_path(obj, field_path, copy.deepcopy(value), create=target.get("options", {}).get("create", False))
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] != "Namespace":
                obj["metadata"]["namespace"] = kustomization["namespace"]
    return objects


def split_image(image: str) -> tuple[str, str | None]:
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:  # no tag (a ':' before the last '/' is a registry port)
        return image, None
    return name, tag


def find_object(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def get_path(obj: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        assert key in obj, f"field path {dotted!r}: no {key!r}"
        obj = obj[key]
    return obj


def set_path(obj: dict, dotted: str, value: Any, create: bool = False) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        obj = obj.setdefault(key, {}) if create else obj[key]
    assert create or last in obj, f"kustomize refuses to create {dotted!r} (no `create: true`)"
    obj[last] = value


def iter_containers(obj: Any):
    """Every container (and init container) anywhere in a manifest, CRDs included."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from iter_containers(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from iter_containers(item)


def iter_pod_specs(obj: Any, path: str = ""):
    """(path, pod spec) for every PodTemplateSpec's spec in a manifest."""
    if isinstance(obj, dict):
        if "template" in obj and isinstance(obj["template"], dict) and "spec" in obj["template"]:
            yield f"{path}.template.spec", obj["template"]["spec"]
        for key, value in obj.items():
            yield from iter_pod_specs(value, f"{path}.{key}" if path else key)
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            yield from iter_pod_specs(item, f"{path}[{i}]")


_SUFFIX = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity ("500m", "16Gi", 4) as a number."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-zA-Z]*)", str(value))
    assert match and match.group(2) in ("", *_SUFFIX), f"not a Kubernetes quantity: {value!r}"
    return float(match.group(1)) * _SUFFIX.get(match.group(2), 1)


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return kustomize_build(KUBERAY)


@pytest.fixture(scope="module")
def rendered_gpu() -> list[dict[str, Any]]:
    return kustomize_build(KUBERAY_GPU)


@pytest.fixture(scope="module")
def rendered_monitoring() -> list[dict[str, Any]]:
    return kustomize_build(MONITORING)


@pytest.fixture(scope="module")
def job_manifests() -> dict[str, dict[str, Any]]:
    """The RayJobs as `kubectl kustomize cluster/kuberay/jobs` prints them (each with its cluster
    spec), by the `bubogpt.io/job` label that `kubectl apply -l` picks one with."""
    for path in sorted(JOBS.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
            assert len(docs) == 1 and docs[0]["kind"] == "RayJob", f"{path}: one RayJob per file"
            assert docs[0]["metadata"]["labels"].get(JOB_LABEL) == path.stem, f"{path}: label {JOB_LABEL}={path.stem}"
    return {o["metadata"]["labels"][JOB_LABEL]: o for o in kustomize_build(JOBS) if o["kind"] == "RayJob"}


# ------------------------------------------------------------------------------------------------
# Parsing and the Serve config


def test_every_manifest_and_config_parses():
    files = sorted(CLUSTER.rglob("*.yaml")) + [SERVE_CONFIG]
    assert len(files) >= 9
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: a document is not a mapping"
            if path.parent.name in ("kuberay", "jobs") and path.name != "kustomization.yaml":
                assert not missing(doc, OBJECT_REQUIRED), f"{path}: missing {missing(doc, OBJECT_REQUIRED)}"
                assert DNS1123_LABEL.match(doc["metadata"]["name"]), f"{path}: bad name {doc['metadata']['name']!r}"


def test_rayservice_embeds_serve_config_verbatim(rendered):
    """The RayService's serveConfigV2 is serve/config.yaml's text after the kustomize build, and
    only because of it: the manifest on disk holds a placeholder, not a copy."""
    serve_text = SERVE_CONFIG.read_text()
    on_disk = yaml.safe_load((KUBERAY / "rayservice.yaml").read_text())
    assert on_disk["spec"]["serveConfigV2"] != serve_text
    assert yaml.safe_load(on_disk["spec"]["serveConfigV2"]) is None  # a comment, not a Serve config

    service = find_object(rendered, "RayService", "bubogpt")
    assert service["spec"]["serveConfigV2"] == serve_text
    assert find_object(rendered, "ConfigMap", "bubogpt-serve-config")["data"]["serveConfigV2"] == serve_text

    # No other file under cluster/ carries a copy of the Serve config.
    import_path = yaml.safe_load(serve_text)["applications"][0]["import_path"]
    copies = [p for p in CLUSTER.rglob("*") if p.is_file() and import_path in p.read_text(errors="ignore")]
    assert copies == [], f"copies of the Serve config: {copies}"


@pytest.mark.parametrize("folder", [KUBERAY, KUBERAY_GPU, MONITORING, JOBS], ids=lambda f: f.name)
def test_real_kustomize_build_matches(folder):
    """Where kustomize (or kubectl's built-in one) is installed, its build agrees with ours."""
    if shutil.which("kustomize"):
        command = ["kustomize", "build", "--load-restrictor", "LoadRestrictionsNone", str(folder)]
    elif shutil.which("kubectl"):
        command = ["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(folder)]
    else:
        pytest.skip("neither kustomize nor kubectl is installed")
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    real = [d for d in yaml.safe_load_all(result.stdout) if d]
    rendered = kustomize_build(folder)
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, real)) == sorted(map(key, rendered))
    for obj in real:
        ours = find_object(rendered, *key(obj))
        assert obj.get("metadata", {}).get("namespace") == ours["metadata"].get("namespace"), key(obj)
        assert obj.get("metadata", {}).get("labels") == ours["metadata"].get("labels"), key(obj)
        assert sorted(c["image"] for c in iter_containers(obj)) == sorted(c["image"] for c in iter_containers(ours))
        if obj["kind"] in ("RayService", "RayJob", "ConfigMap"):
            assert obj.get("spec", obj.get("data")) == ours.get("spec", ours.get("data")), key(obj)


def test_serve_config_is_a_valid_ray_serve_config():
    """Ray's own Serve schema accepts it, its import path builds an app with exactly the deployments
    it configures, and every autoscaling_config holds only Serve's autoscaling keys."""
    from ray.serve._private.build_app import build_app
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    assert schema.applications
    for app in schema.applications:
        module_name, _, attribute = app.import_path.partition(":")
        assert module_name and attribute, f"import_path {app.import_path!r} is not module:attribute"
        module = __import__(module_name, fromlist=[attribute])
        application = getattr(module, attribute)(app.args)
        built = {d.name for d in build_app(application, name=app.name).deployments}
        configured = [d.name for d in app.deployments]
        assert configured and set(configured) <= built, f"{app.name}: {configured} not all in {built}"
        for deployment in app.deployments:
            autoscaling = deployment.autoscaling_config
            if autoscaling in (None, {}):
                continue
            unknown = set(autoscaling) - set(AutoscalingConfig.model_fields)
            assert not unknown, f"{deployment.name}: unknown autoscaling_config keys {unknown}"
            bounds = AutoscalingConfig(**autoscaling)
            assert 0 <= bounds.min_replicas <= bounds.max_replicas


def test_rayservice_serve_proxies_listen_beyond_loopback():
    from ray.serve.schema import ServeDeploySchema

    host = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text())).http_options.host
    assert host not in ("127.0.0.1", "localhost", "::1"), host


# ------------------------------------------------------------------------------------------------
# KubeRay objects


def check_pod_spec(where: str, spec: dict[str, Any], volumes_ok: set[str] | None = None) -> None:
    assert not missing(spec, POD_SPEC_REQUIRED), f"{where}: missing {missing(spec, POD_SPEC_REQUIRED)}"
    names = [c.get("name") for c in spec["containers"]]
    assert len(set(names)) == len(names), f"{where}: duplicate container names {names}"
    volume_names = {v["name"] for v in spec.get("volumes", [])}
    for container in spec["containers"]:
        at = f"{where}.containers[{container.get('name')}]"
        assert not missing(container, CONTAINER_REQUIRED), f"{at}: missing name"
        assert DNS1123_LABEL.match(container["name"]), f"{at}: bad container name"
        assert container.get("image"), f"{at}: no image"
        for port in container.get("ports", []):
            assert not missing(port, CONTAINER_PORT_REQUIRED), f"{at}: port without containerPort"
        for env in container.get("env", []):
            assert not missing(env, ENV_VAR_REQUIRED), f"{at}: env var without name"
            assert ("value" in env) != ("valueFrom" in env), f"{at}: env {env['name']} needs value or valueFrom"
        for mount in container.get("volumeMounts", []):
            assert not missing(mount, VOLUME_MOUNT_REQUIRED), f"{at}: volumeMount missing fields"
            assert mount["name"] in volume_names, f"{at}: mounts undeclared volume {mount['name']!r}"
        resources = container.get("resources", {})
        requests, limits = resources.get("requests", {}), resources.get("limits", {})
        assert {"cpu", "memory"} <= set(requests), f"{at}: requests need cpu and memory, got {requests}"
        assert {"cpu", "memory"} <= set(limits), f"{at}: limits need cpu and memory, got {limits}"
        for name, request in requests.items():
            if name in limits:
                assert quantity(request) <= quantity(limits[name]), f"{at}: {name} request > limit"
        if "nvidia.com/gpu" in requests or "nvidia.com/gpu" in limits:
            # Extended resources: Kubernetes requires the limit, and a request equal to it.
            assert limits.get("nvidia.com/gpu") == requests.get("nvidia.com/gpu", limits.get("nvidia.com/gpu"))
            assert quantity(limits["nvidia.com/gpu"]) >= 1 and float(limits["nvidia.com/gpu"]).is_integer()


def check_ray_cluster_spec(where: str, spec: dict[str, Any]) -> dict[str, dict]:
    """Checks a RayClusterSpec (RayCluster.spec, RayService.spec.rayClusterConfig); returns the
    worker groups by name."""
    assert not missing(spec, RAYCLUSTER_SPEC_REQUIRED), f"{where}: missing {missing(spec, RAYCLUSTER_SPEC_REQUIRED)}"
    import ray

    assert spec.get("rayVersion") == ray.__version__, f"{where}: rayVersion must equal the image's Ray"
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: the autoscaler is off"
    head = spec["headGroupSpec"]
    assert not missing(head, HEAD_GROUP_REQUIRED), f"{where}.headGroupSpec: missing {missing(head, HEAD_GROUP_REQUIRED)}"
    # rayStartParams is map[string]string in the CRD: an unquoted 0 is rejected by the API server.
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), f"{where}: non-string rayStartParams"
    assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: the head must not run tasks"
    check_pod_spec(f"{where}.headGroupSpec", head["template"]["spec"])
    head_container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"], f"{where}: the head is CPU-only"
    head_ports = {p["containerPort"] for p in head_container.get("ports", [])}
    assert {6379, 8265} <= head_ports, f"{where}: the head must expose GCS (6379) and the dashboard (8265)"

    groups = {}
    for group in spec.get("workerGroupSpecs", []):
        at = f"{where}.workerGroupSpecs[{group.get('groupName')}]"
        assert not missing(group, WORKER_GROUP_REQUIRED), f"{at}: missing {missing(group, WORKER_GROUP_REQUIRED)}"
        assert DNS1123_LABEL.match(group["groupName"]), f"{at}: bad groupName"
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), f"{at}: non-string rayStartParams"
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        check_pod_spec(at, group["template"]["spec"])
        groups[group["groupName"]] = group
    assert len(groups) == len(spec.get("workerGroupSpecs", [])), f"{where}: duplicate group names"
    return groups


def group_gpus(group: dict) -> float:
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return quantity(limits.get("nvidia.com/gpu", 0))


def test_raycluster(rendered):
    cluster = find_object(rendered, "RayCluster", "bubogpt-jobs")
    assert cluster["apiVersion"] == "ray.io/v1"
    groups = check_ray_cluster_spec("RayCluster", cluster["spec"])
    gpu_groups = [g for g in groups.values() if group_gpus(g) > 0]
    assert gpu_groups, "no GPU worker group"
    for group in gpu_groups:
        # Autoscaled from zero: GPU nodes exist only while a job needs them.
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
    assert any(group_gpus(g) == 0 for g in groups.values()), "no CPU worker group for Ray Data"


def test_rayservice_cluster(rendered):
    service = find_object(rendered, "RayService", "bubogpt")
    assert service["apiVersion"] == "ray.io/v1"
    assert not missing(service["spec"], RAYSERVICE_SPEC_REQUIRED)
    groups = check_ray_cluster_spec("RayService.rayClusterConfig", service["spec"]["rayClusterConfig"])
    assert any(group_gpus(g) >= 1 for g in groups.values()), "no GPU group for the model replicas"
    serve_port = yaml.safe_load(SERVE_CONFIG.read_text()).get("http_options", {}).get("port", 8000)
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert serve_port in {p["containerPort"] for p in head["ports"]}, "the head must expose Serve's port"


def test_every_ray_pod_runs_the_project_image_and_reaches_mlflow(rendered):
    mlflow_service = find_object(rendered, "Service", "mlflow")
    mlflow_uri = f"http://mlflow:{mlflow_service['spec']['ports'][0]['port']}"
    ray_objects = [o for o in rendered if o["kind"] in KUBERAY_KINDS]
    containers = [c for o in ray_objects for c in iter_containers(o)]
    assert len(containers) >= 6
    for container in containers:
        assert split_image(container["image"])[0] == PROJECT_IMAGE, container["image"]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env.get("MLFLOW_TRACKING_URI") == mlflow_uri, f"{container['name']}: {env}"
    for obj in rendered:
        for where, spec in iter_pod_specs(obj):
            check_pod_spec(f"{obj['kind']}/{obj['metadata']['name']}:{where}", spec)


def test_mlflow_server(rendered):
    """A database backend and an artifact store; the command parses with the installed mlflow;
    the Host header the jobs send is allowed."""
    from mlflow.cli import server

    deployment = find_object(rendered, "Deployment", "mlflow")
    assert not missing(deployment["spec"], DEPLOYMENT_SPEC_REQUIRED)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["mlflow", "server"]
    context = server.make_context("server", list(container["args"]))  # raises on an unknown option
    params = context.params
    backend = urllib.parse.urlsplit(params["backend_store_uri"])
    assert backend.scheme.startswith("postgresql"), params["backend_store_uri"]
    assert params["serve_artifacts"] and params["artifacts_destination"]
    allowed = params["allowed_hosts"].split(",")
    assert "mlflow:5000" in allowed and "mlflow" in allowed

    # The database it names exists, on the port it uses, with the same credentials secret.
    db_service = find_object(rendered, "Service", backend.hostname)
    assert backend.port in {p["port"] for p in db_service["spec"]["ports"]}
    db = find_object(rendered, "Deployment", "mlflow-postgres")
    db_env = {e["name"]: e for e in db["spec"]["template"]["spec"]["containers"][0]["env"]}
    mlflow_env = {e["name"]: e for e in container["env"]}
    assert db_env["POSTGRES_DB"]["value"] == backend.path.lstrip("/")
    assert db_env["POSTGRES_USER"]["value"] == backend.username
    assert db_env["POSTGRES_PASSWORD"]["valueFrom"] == mlflow_env["MLFLOW_DB_PASSWORD"]["valueFrom"]
    assert f"$(MLFLOW_DB_PASSWORD)" == backend.password  # expanded by Kubernetes from the env above

    # The artifact destination is on a mounted volume backed by a claim in the build.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert params["artifacts_destination"] in mounts
    claims = {o["metadata"]["name"] for o in rendered if o["kind"] == "PersistentVolumeClaim"}
    for obj in rendered:
        for _, spec in iter_pod_specs(obj):
            for volume in spec.get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims, volume


def test_service_names_do_not_collide(rendered):
    """KubeRay creates <RayCluster>-head-svc, <RayService>-head-svc and <RayService>-serve-svc in the
    namespace; none may clash with each other or with the kustomization's own Services."""
    created = [f"{o['metadata']['name']}-head-svc" for o in rendered if o["kind"] in ("RayCluster", "RayService")]
    created += [f"{o['metadata']['name']}-serve-svc" for o in rendered if o["kind"] == "RayService"]
    created += [o["metadata"]["name"] for o in rendered if o["kind"] == "Service"]
    assert len(created) == len(set(created)) == 6, created


def test_services_select_their_pods(rendered):
    deployments = [o for o in rendered if o["kind"] == "Deployment"]
    for deployment in deployments:
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{deployment['metadata']['name']}: selector misses its pods"
    for service in (o for o in rendered if o["kind"] == "Service"):
        for port in service["spec"]["ports"]:
            assert not missing(port, SERVICE_PORT_REQUIRED)
        selector = service["spec"]["selector"]
        targets = [d for d in deployments if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(targets) == 1, f"Service {service['metadata']['name']} selects {len(targets)} deployments"
        named_ports = {p["name"] for p in targets[0]["spec"]["template"]["spec"]["containers"][0]["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named_ports, f"{service['metadata']['name']}: no port {port['targetPort']}"


# ------------------------------------------------------------------------------------------------
# One source of deployment options; the GPU overlay; GCS fault tolerance; token auth; monitoring

SERVE_SOURCES = [REPO / "serve" / name for name in ("llm.py", "grounding.py", "ingress.py")]
# What serve/config.gpu.yaml may change in serve/config.yaml (each marked "GPU" in the file).
GPU_VALUES = {
    "args.model_dir", "args.device", "args.dtype", "args.torch_threads", "args.llm_max_batch_size",
    "args.grounding_max_batch_size", "deployments.LLM.max_ongoing_requests",
    *(f"deployments.{d}.{option}" for d in ("LLM", "Grounding", "Ingress")
      for option in ("autoscaling_config.max_replicas", "ray_actor_options.num_cpus", "ray_actor_options.num_gpus")),
}  # fmt: skip


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted paths of a Serve config's application; deployments are keyed by name."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
        items = ((v["name"], {k: x for k, x in v.items() if k != "name"}) for v in value)
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat |= flatten(item, f"{prefix}.{key}" if prefix else str(key))
    return flat


def test_deployment_options_come_only_from_the_serve_config():
    """The deployment classes set no option but their name, and @serve.batch no batch size or wait
    (the settings set those at start-up): nothing in code competes with serve/config.yaml."""
    import ast

    from serve.grounding import GroundingDeployment
    from serve.ingress import ChatIngress
    from serve.llm import LLMDeployment

    for deployment in (LLMDeployment, GroundingDeployment, ChatIngress):
        assert deployment._deployment_config.user_configured_option_names == {"name"}, deployment.name
    configured = {d["name"] for d in yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["deployments"]}
    assert configured == {"LLM", "Grounding", "Ingress"}
    for path in SERVE_SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("serve.deployment", "serve.batch"):
                keywords = {k.arg for k in node.keywords}
                allowed = {"name"} if ast.unparse(node.func) == "serve.deployment" else {"max_concurrent_batches"}
                assert keywords <= allowed, f"{path.name}: {ast.unparse(node)} sets {keywords - allowed}"


@pytest.mark.parametrize("path", [SERVE_CONFIG, SERVE_GPU_CONFIG], ids=lambda p: p.name)
def test_scale_down_never_cuts_a_request(path):
    """Serve waits graceful_shutdown_timeout_s for a stopping replica's requests: at least the time
    a request may take (args.request_timeout_s; the ingress answers 504 after it)."""
    app = yaml.safe_load(path.read_text())["applications"][0]
    for deployment in app["deployments"]:
        assert deployment["graceful_shutdown_timeout_s"] >= app["args"]["request_timeout_s"], deployment["name"]


def test_gpu_serve_config_is_the_cpu_one_with_gpu_values():
    from ray.serve.schema import ServeDeploySchema

    from serve.settings import ServeSettings

    cpu, gpu = (yaml.safe_load(p.read_text()) for p in (SERVE_CONFIG, SERVE_GPU_CONFIG))
    ServeDeploySchema.model_validate(gpu)
    cpu_flat, gpu_flat = flatten(cpu["applications"][0]), flatten(gpu["applications"][0])
    changed = {k for k in cpu_flat.keys() | gpu_flat.keys() if cpu_flat.get(k) != gpu_flat.get(k)}
    assert changed <= GPU_VALUES, f"config.gpu.yaml differs beyond the GPU values: {changed - GPU_VALUES}"
    assert {k: v for k, v in cpu.items() if k != "applications"} == {k: v for k, v in gpu.items() if k != "applications"}

    app = gpu["applications"][0]
    settings = ServeSettings.from_dict(app["args"])
    assert (settings.device, settings.dtype) == ("cuda", "bfloat16")
    assert settings.model_dir.startswith("/") or settings.model_dir.startswith("models:/")
    cpu_args = cpu["applications"][0]["args"]
    assert settings.llm_max_batch_size > cpu_args["llm_max_batch_size"]
    assert settings.grounding_max_batch_size > cpu_args["grounding_max_batch_size"]
    options = {d["name"]: d for d in app["deployments"]}
    assert options["LLM"]["ray_actor_options"]["num_gpus"] >= 1
    assert 0 < options["Grounding"]["ray_actor_options"]["num_gpus"] <= 1
    assert "num_gpus" not in options["Ingress"]["ray_actor_options"]
    # a replica's torch threads are the CPUs it reserves
    assert settings.torch_threads == options["LLM"]["ray_actor_options"]["num_cpus"]
    # LLM batches of llm_max_batch_size, several waiting while one generates
    assert options["LLM"]["max_ongoing_requests"] >= 2 * settings.llm_max_batch_size


def test_gpu_overlay_deploys_the_gpu_config_on_gpu_pods(rendered, rendered_gpu):
    """kuberay-gpu = the base with serve/config.gpu.yaml in the RayService (nothing else changed);
    the model path is on a volume the Ray pods mount, and the GPU group has room for every replica."""
    gpu_text = SERVE_GPU_CONFIG.read_text()
    service = find_object(rendered_gpu, "RayService", "bubogpt")
    assert service["spec"]["serveConfigV2"] == gpu_text
    assert find_object(rendered_gpu, "ConfigMap", "bubogpt-serve-config")["data"]["serveConfigV2"] == gpu_text
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, rendered_gpu)) == sorted(map(key, rendered))
    for obj in rendered_gpu:
        if key(obj) not in {("RayService", "bubogpt"), ("ConfigMap", "bubogpt-serve-config")}:
            assert obj == find_object(rendered, *key(obj)), key(obj)
    base_service = find_object(rendered, "RayService", "bubogpt")
    assert {**service["spec"], "serveConfigV2": None} == {**base_service["spec"], "serveConfigV2": None}

    app = yaml.safe_load(gpu_text)["applications"][0]
    groups = check_ray_cluster_spec("RayService.rayClusterConfig", service["spec"]["rayClusterConfig"])
    gpu_groups = [g for g in groups.values() if group_gpus(g) > 0]
    for group in gpu_groups:
        for container in group["template"]["spec"]["containers"]:
            mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
            if app["args"]["model_dir"].startswith("models:/"):  # replicas download it (serve/registry.py)
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                assert env.get("MLFLOW_TRACKING_URI") and env.get("BUBOGPT_MODEL_CACHE") in mounts, env
                assert not mounts[env["BUBOGPT_MODEL_CACHE"]].get("readOnly"), "the model cache must be writable"
            else:  # a path on a volume every pod mounts
                assert any(app["args"]["model_dir"].startswith(m.rstrip("/") + "/") for m in mounts), mounts
    needed = sum(d["autoscaling_config"]["max_replicas"] * d["ray_actor_options"].get("num_gpus", 0)
                 for d in app["deployments"])  # fmt: skip
    available = sum(group_gpus(g) * g["maxReplicas"] for g in gpu_groups)
    assert 0 < needed <= available, f"the Serve config may ask for {needed} GPUs, the GPU group has {available}"
    for d in app["deployments"]:
        cpus, gpus = d["ray_actor_options"]["num_cpus"], d["ray_actor_options"].get("num_gpus", 0)
        fits = [g for g in groups.values() if group_gpus(g) >= gpus and quantity(
            g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) >= cpus]  # fmt: skip
        assert fits, f"no worker group fits a {d['name']} replica ({cpus} CPUs, {gpus} GPUs)"


def secret_refs(obj: Any) -> list[tuple[str, str]]:
    """(Secret name, key) of every secretKeyRef anywhere in a manifest."""
    if isinstance(obj, dict):
        found = [(obj["secretKeyRef"]["name"], obj["secretKeyRef"]["key"])] if "secretKeyRef" in obj else []
        return found + [ref for value in obj.values() for ref in secret_refs(value)]
    if isinstance(obj, list):
        return [ref for item in obj for ref in secret_refs(item)]
    return []


def test_rayservice_gcs_fault_tolerance_uses_the_redis_in_the_build(rendered):
    cluster = find_object(rendered, "RayService", "bubogpt")["spec"]["rayClusterConfig"]
    options = cluster["gcsFaultToleranceOptions"]
    assert set(options) <= GCS_FT_FIELDS, set(options) - GCS_FT_FIELDS
    assert options.get("backend", "redis") == "redis"
    host, _, port = options["redisAddress"].partition(":")
    redis_service = find_object(rendered, "Service", host)
    assert int(port) in {p["port"] for p in redis_service["spec"]["ports"]}
    # one password: the Secret Redis requires is the one the head is given
    redis = find_object(rendered, "Deployment", host)["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in redis["env"]}
    assert options["redisPassword"]["valueFrom"] == env["REDIS_PASSWORD"]["valueFrom"]
    args = redis["command"] + redis["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"  # expanded by Kubernetes
    assert args[args.index("--appendonly") + 1] == "yes"  # a Redis restart keeps the GCS data ...
    data_dir = args[args.index("--dir") + 1]
    volume = {m["mountPath"]: m["name"] for m in redis["volumeMounts"]}[data_dir]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in find_object(rendered, "Deployment", host)["spec"]["template"]["spec"]["volumes"]}  # fmt: skip
    find_object(rendered, "PersistentVolumeClaim", claims[volume])  # ... on a volume
    # KubeRay refuses a Redis password both here and in rayStartParams; and the old annotation is not mixed in
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert not {"redis-password", "redis-username"} & set(group["rayStartParams"])
    assert "ray.io/ft-enabled" not in find_object(rendered, "RayService", "bubogpt")["metadata"].get("annotations", {})


def test_rayservice_token_auth_and_the_serve_api_key_from_secrets(rendered):
    service = find_object(rendered, "RayService", "bubogpt")
    auth = service["spec"]["rayClusterConfig"]["authOptions"]
    assert set(auth) <= AUTH_OPTIONS_FIELDS and auth["mode"] == "token" and auth["mode"] in AUTH_MODES
    import ray

    assert tuple(map(int, ray.__version__.split(".")[:2])) >= (2, 52)  # Ray's token auth
    # The Serve config requires a bearer token from the variable it names; every Ray container has
    # that variable, from a Secret (a replica may land on any of them).
    api_key_env = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]["api_key_env"]
    assert api_key_env
    containers = list(iter_containers(service))
    assert len(containers) >= 3
    for container in containers:
        env = {e["name"]: e for e in container.get("env", [])}
        assert "secretKeyRef" in env[api_key_env]["valueFrom"], container["name"]

    # Every Secret the manifests read is created in cluster/README.md, with the key they read.
    readme = (CLUSTER / "README.md").read_text()
    created = {(name, key) for name, key in re.findall(r"create secret generic (\S+) --from-literal=([\w-]+)=", readme)}
    wanted = {ref for obj in rendered for ref in secret_refs(obj)} | {(auth["secretName"], RAY_AUTH_TOKEN_SECRET_KEY)}
    assert wanted <= created, f"Secrets the manifests read but cluster/README.md never creates: {wanted - created}"


def exported_series() -> set[str]:
    """The Prometheus names of serve/metrics.py's metrics: Counter x -> x_total; Histogram x ->
    x_bucket / x_sum / x_count; Gauge x -> x (read from the source: the metrics need a Serve replica)."""
    source = (REPO / "serve" / "metrics.py").read_text()
    names = set()
    for kind, name in re.findall(r'\b(Counter|Gauge|Histogram)\(\s*"(bubogpt_\w+)"', source):
        names |= {"Counter": {f"{name}_total"}, "Gauge": {name},
                  "Histogram": {f"{name}_bucket", f"{name}_sum", f"{name}_count"}}[kind]  # fmt: skip
    return names


def test_podmonitor_scrapes_every_serving_pod_and_renames_the_series(rendered, rendered_monitoring):
    monitor = find_object(rendered_monitoring, "PodMonitor", "bubogpt-serve")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert not missing(spec, PODMONITOR_SPEC_REQUIRED)
    service = find_object(rendered, "RayService", "bubogpt")
    assert spec["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    selector = spec["selector"]["matchLabels"]
    cluster = service["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    ports = {endpoint["port"] for endpoint in spec["podMetricsEndpoints"]}
    for template in templates:  # every serving pod is selected, and has the port
        assert selector.items() <= template["metadata"]["labels"].items()
        for container in template["spec"]["containers"]:
            assert ports <= {p.get("name") for p in container.get("ports", [])}, container["name"]
    for obj in rendered:  # and nothing else (the jobs cluster, MLflow, Redis)
        if obj is not service:
            for template in _templates(obj):
                assert not selector.items() <= template.get("metadata", {}).get("labels", {}).items(), obj["metadata"]
    # ray_bubogpt_* (Ray's exporter) -> bubogpt_* (what the dashboard uses); Ray's own series untouched
    rules = [r for endpoint in spec["podMetricsEndpoints"] for r in endpoint.get("metricRelabelings", [])]
    rename = next(r for r in rules if r["targetLabel"] == "__name__")

    def stored(name: str) -> str:
        match = re.fullmatch(rename["regex"], name)  # Prometheus anchors its regexes
        return re.sub(r"\$(\d+)", lambda m: match.group(int(m.group(1))), rename["replacement"]) if match else name

    for name in exported_series():
        assert stored(f"ray_{name}") == name
    assert stored("ray_serve_num_http_requests_total") == "ray_serve_num_http_requests_total"


def _templates(obj: Any) -> list[dict]:
    """Every pod template (a dict with metadata and spec.containers) anywhere in a manifest."""
    if isinstance(obj, dict):
        own = [obj["template"]] if isinstance(obj.get("template"), dict) and "spec" in obj["template"] else []
        return own + [t for value in obj.values() for t in _templates(value)]
    if isinstance(obj, list):
        return [t for item in obj for t in _templates(item)]
    return []


def test_grafana_dashboard_plots_every_application_series(rendered_monitoring):
    dashboard = json.loads(GRAFANA_DASHBOARD.read_text())
    config_map = find_object(rendered_monitoring, "ConfigMap", "bubogpt-grafana-dashboard")
    assert config_map["metadata"]["labels"] == {"grafana_dashboard": "1"}  # Grafana's sidecar loads it
    assert json.loads(config_map["data"]["bubogpt-serving.json"]) == dashboard
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\b(bubogpt_\w+)", expr)}
    exported = exported_series()
    assert used <= exported, f"the dashboard queries series nobody exports: {used - exported}"
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in exported}
    plotted = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in used}
    assert families <= plotted, f"series no panel shows: {families - plotted}"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert [t["refId"] for t in panel["targets"]] == [chr(65 + i) for i in range(len(panel["targets"]))]


def parse_bubogpt(command: str):
    """Parses a `bubogpt ...` command line with the real CLI parser; fails on any unknown option.
    Returns the command (and data subcommand) with every option of the job, defaults included."""
    from types import SimpleNamespace

    from workflows.cli import build_parser, parse

    argv = shlex.split(command)
    assert argv[0] == "bubogpt", command
    try:
        raw = build_parser().parse_args(argv[1:])
        _, options = parse(argv[1:])
    except SystemExit as exit_:  # argparse's way of refusing
        pytest.fail(f"`{command}` does not parse (exit {exit_.code})")
    return SimpleNamespace(command=raw.command, data_command=getattr(raw, "data_command", None), **vars(options))


def check_kuberay_rayjob_rules(name: str, spec: dict[str, Any]) -> None:
    """The RayJob rules KubeRay 1.6's webhook and controller enforce (ray-operator/controllers/ray/
    utils/validation.go, ValidateRayJobSpec and validateDeletionConfiguration) for the fields we use."""
    selector_mode = bool(spec.get("clusterSelector"))
    assert selector_mode != ("rayClusterSpec" in spec), f"{name}: exactly one of rayClusterSpec, clusterSelector"
    if spec.get("ttlSecondsAfterFinished", 0) > 0:
        assert spec.get("shutdownAfterJobFinishes"), f"{name}: a TTL needs shutdownAfterJobFinishes"
    if selector_mode:
        assert spec.get("backoffLimit", 0) == 0, f"{name}: backoffLimit is refused with clusterSelector"
        assert not spec.get("suspend"), f"{name}: suspend is refused with clusterSelector"


def test_rayjobs(rendered, job_manifests):
    cluster = find_object(rendered, "RayCluster", "bubogpt-jobs")
    assert {"prepare", "train-stage1", "train-stage2"} <= set(job_manifests)
    stages = {}
    for name, job in job_manifests.items():
        assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob", name
        assert DNS1123_LABEL.match(job["metadata"]["name"]), name
        assert job["metadata"].get("namespace") == "bubogpt", f"{name}: not in the kustomization's namespace"
        spec = job["spec"]
        assert not missing(spec, RAYJOB_SPEC_REQUIRED), f"{name}: missing {missing(spec, RAYJOB_SPEC_REQUIRED)}"
        check_kuberay_rayjob_rules(name, spec)
        # A cluster of its own, with the long-lived jobs cluster's spec (and so its image and
        # MLflow wiring), deleted 0 < TTL after the job ends; failed runs are retried.
        assert spec["rayClusterSpec"] == cluster["spec"], f"{name}: not raycluster.yaml's spec"
        check_ray_cluster_spec(f"RayJob {name}", spec["rayClusterSpec"])
        assert spec["shutdownAfterJobFinishes"] is True and 0 < spec["ttlSecondsAfterFinished"] <= 3600, name
        assert spec["backoffLimit"] >= 1 and spec["activeDeadlineSeconds"] > 0, name
        assert spec["entrypointNumCpus"] >= 1, f"{name}: the driver must reserve a CPU (the head has none)"
        args = parse_bubogpt(spec["entrypoint"])
        if name == "prepare":
            assert (args.command, args.data_command) == ("data", "prepare")
            assert str(args.input).startswith("/data/") and str(args.out).startswith("/data/")
            prepared = str(args.out)
        else:
            assert args.command == "train", name
            stages[args.stage] = args
    assert {"stage1", "stage2"} <= set(stages)
    for stage, args in stages.items():
        assert str(args.data) == prepared, f"{stage} does not read what prepare writes"
    assert len({str(a.out) for a in stages.values()}) == 1, "stages must share one run folder"
    # Stage 1 starts from --init; stage 2 from stage 1's checkpoint, which an --init would replace
    # (workflows/train.py: a single later stage continues from the one before only without --init).
    assert stages["stage1"].init is not None and stages["stage2"].init is None

    # Every training worker gets a GPU, and the workers fit the gpu-train group.
    group = check_ray_cluster_spec("RayCluster", cluster["spec"])["gpu-train"]
    pod = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus_per_pod, cpus_per_pod = quantity(pod["nvidia.com/gpu"]), quantity(pod["cpu"])
    for stage, args in stages.items():
        assert args.use_gpu, f"{stage} would train on CPUs"
        assert args.num_workers <= gpus_per_pod * group["maxReplicas"], f"{stage}: more workers than GPUs"
        per_pod = min(args.num_workers, gpus_per_pod)
        assert per_pod * args.cpus_per_worker < cpus_per_pod, f"{stage}: workers leave no CPU for data"


def test_readme_runs_the_jobs_in_order_and_stops_on_failure(job_manifests):
    """cluster/README.md's step 4 applies each RayJob alone from the jobs build (by its label), in
    the order the workflow needs, and waits for Complete or Failed (a failed job ends the loop)."""
    text = (CLUSTER / "README.md").read_text()
    loop = re.search(r"^( *)for job in ([\w\- ]+); do\n(.*?)\n\1done$", text, re.S | re.M)  # to its own `done`
    assert loop, "no `for job in ...` loop in cluster/README.md"
    order, body = loop.group(2).split(), loop.group(3)
    assert order == ["prepare", "train-stage1", "train-stage2"] and set(order) == set(job_manifests)
    assert "kubectl kustomize --load-restrictor LoadRestrictionsNone cluster/kuberay/jobs" in text[: loop.start()]
    assert re.search(rf"kubectl apply -f \S+ -l {re.escape(JOB_LABEL)}=\$job", body), body
    assert "$state == Complete || $state == Failed" in body, "the wait must also end on Failed"
    assert "|| break" in body


def test_readme_submits_every_workflow_through_the_jobs_api():
    """cluster/README.md shows `ray job submit --working-dir . -- bubogpt ...` for every workflow,
    and every one of those command lines parses with the real `bubogpt` parser."""
    lines = [l.strip() for l in (CLUSTER / "README.md").read_text().splitlines() if l.strip().startswith("ray job submit")]
    covered = set()
    for line in lines:
        options, sep, command = line.partition(" -- ")
        assert sep and "--working-dir ." in options, line
        args = parse_bubogpt(command)
        if args.command == "data":
            covered.add(f"data {args.data_command}")
        elif args.command == "train":
            covered.add(f"train {args.stage}")
        else:
            covered.add(args.command)
    wanted = {"data synth", "data prepare", "train stage1", "train stage2", "train all", "train grounding", "eval", "serve"}
    assert wanted <= covered, f"README lacks Jobs API commands for {wanted - covered}"


# ------------------------------------------------------------------------------------------------
# `ray up` (AWS) and the image


def test_ray_up_config_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(AWS_CONFIG.read_text())
    assert not missing(config, RAY_UP_REQUIRED)
    assert not missing(config["provider"], RAY_UP_PROVIDER_REQUIRED) and config["provider"]["type"] == "aws"
    for name, node_type in config["available_node_types"].items():
        assert not missing(node_type, RAY_UP_NODE_TYPE_REQUIRED), f"{name}: {missing(node_type, RAY_UP_NODE_TYPE_REQUIRED)}"
    validate_config(prepare_config(config))  # the full ray-schema.json Ray installs, plus its checks


def test_ray_up_config_gpu_types_limits_and_commands():
    from ray.scripts.scripts import start

    config = yaml.safe_load(AWS_CONFIG.read_text())
    types = config["available_node_types"]
    # GPUs of each instance type (AWS's published specs), by what the node type is for.
    training_gpus = {"p4d.24xlarge": "A100", "p4de.24xlarge": "A100", "p5.48xlarge": "H100"}
    serving_gpus = {"g5.xlarge": "A10G", "g5.2xlarge": "A10G", "g6.xlarge": "L4", "g6.2xlarge": "L4"}
    instance = {name: t["node_config"]["InstanceType"] for name, t in types.items()}
    assert {instance[n] for n in types if n.startswith("gpu-train")} <= set(training_gpus)
    assert {instance[n] for n in types if n.startswith("gpu-serve")} <= set(serving_gpus)
    assert any(n.startswith("gpu-train") for n in types) and any(n.startswith("gpu-serve") for n in types)
    for name, node_type in types.items():
        if name == config["head_node_type"]:
            continue
        assert node_type.get("min_workers", 0) == 0, f"{name}: should scale from zero"
        assert 1 <= node_type["max_workers"] <= config["max_workers"], name
    assert config["idle_timeout_minutes"] > 0

    assert config["docker"]["image"].split(":")[0] == PROJECT_IMAGE
    assert config["file_mounts"] == {"/home/ray/bubogpt": "."}
    assert any("pip install" in c and "/home/ray/bubogpt" in c for c in config["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c[c.index("ray start"):] for c in config[key] if "ray start" in c]
        assert len(starts) == 1, key
        argv = shlex.split(starts[0])[2:]
        params = start.make_context("start", argv).params  # raises on an unknown flag
        assert params["head"] == (key == "head_start_ray_commands")
        if params["head"]:
            assert params["num_cpus"] == 0
        assert any("MLFLOW_TRACKING_URI" in c for c in config[key]), key


def test_dockerfile_matches_the_project():
    import ray

    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", text, re.M).group(1)
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.11,<3.12"' in pyproject  # py311 in the base image
    assert f'"ray[data,train,serve]=={ray.__version__}"' in pyproject
    for package in ("bubogpt", "workflows", "serve"):
        assert re.search(rf"^COPY --chown=ray:users {package} {package}$", text, re.M), package
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


# ------------------------------------------------------------------------------------------------
# Must show: a real three-node cluster (cluster/local.sh), jobs through the Jobs API over HTTP.
# The pytest process's own Ray (tests/conftest.py: ray_session) never connects to it: the cluster
# has its own ports, temp dir and auth token, and is reached only through its dashboard's HTTP API.

LOCAL_SH = CLUSTER / "local.sh"
PORT_BLOCK = 400  # ports local.sh uses from its base


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def free_port_block() -> int:
    """A base whose whole block is free; not local.sh's default (a developer's cluster may run)."""
    for base in range(29000 + PORT_BLOCK, 32768 - PORT_BLOCK, PORT_BLOCK):
        if all(port_free(base + i) for i in range(PORT_BLOCK)):
            return base
    pytest.fail("no free block of 400 ports under 32768")


def processes_naming(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if text.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


class LocalCluster:
    def __init__(self, base: int, temp_dir: str):
        self.dashboard = f"http://127.0.0.1:{base + 1}"
        self.temp_dir = temp_dir
        self.headers = {"Authorization": f"Bearer {Path(temp_dir, 'auth_token').read_text().strip()}"}

    def get(self, path: str, **query: str) -> Any:
        """GET on the dashboard's HTTP API (the state API lives under /api/v0)."""
        url = f"{self.dashboard}{path}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(urllib.request.Request(url, headers=self.headers), timeout=30) as response:
            return json.loads(response.read())

    def nodes(self) -> dict[str, dict]:
        """Alive nodes by id: {"resources": {...}}."""
        result = self.get("/api/v0/nodes", limit="100", detail="true")["data"]["result"]["result"]
        return {n["node_id"]: n for n in result if n["state"] == "ALIVE"}

    def job_nodes(self, job_id: str, kind: str) -> dict[str, set[str]]:
        """Node id -> names of the job's tasks or actors that ran there (state API, by job id)."""
        query = {"limit": "10000", "detail": "true", "filter_keys": "job_id", "filter_predicates": "=", "filter_values": job_id}
        rows = self.get(f"/api/v0/{kind}", **query)["data"]["result"]["result"]
        placed: dict[str, set[str]] = {}
        for row in rows:
            name = row.get("name") or row.get("class_name") or "?"
            if row.get("node_id"):
                placed.setdefault(row["node_id"], set()).add(name)
        return placed


@pytest.fixture(scope="module")
def local_cluster():
    base = free_port_block()
    temp_dir = tempfile.mkdtemp(prefix="bubo-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # 3 logical CPUs per worker node: a training worker of 2 CPUs fits once per node (so two of them
    # must use both nodes) and leaves 1 CPU per node for the Ray Data tasks feeding it.
    env = {**os.environ, "BUBOGPT_LOCAL_PORT_BASE": str(base), "BUBOGPT_LOCAL_TEMP_DIR": temp_dir,
           "BUBOGPT_LOCAL_WORKER_CPUS": "3"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    try:
        up = subprocess.run(["bash", str(LOCAL_SH), "up"], env=env, capture_output=True, text=True, timeout=240)
        assert up.returncode == 0, f"local.sh up failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
        yield LocalCluster(base, temp_dir)
    finally:
        down = subprocess.run(["bash", str(LOCAL_SH), "down"], env=env, capture_output=True, text=True, timeout=120)
        left = processes_naming(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert down.returncode == 0, down.stderr
        assert left == [], f"local.sh down left processes {left}"


def run_job(client, entrypoint: str, timeout_s: float) -> tuple[str, str]:
    """Submits with the repository as working dir; waits; returns (Ray job id, logs)."""
    from ray.job_submission import JobStatus

    started = time.monotonic()
    submission = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(REPO)})
    deadline = started + timeout_s
    status = client.get_job_status(submission)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
        status = client.get_job_status(submission)
    logs = client.get_job_logs(submission)
    if not status.is_terminal():
        client.stop_job(submission)
    assert status == JobStatus.SUCCEEDED, f"{entrypoint}\n-> {status}\n{logs[-12000:]}"
    print(f"{submission}: {status} in {time.monotonic() - started:.0f} s: {entrypoint}")
    return client.get_job_info(submission).job_id, logs


def placed_nodes(cluster: LocalCluster, job_id: str, wanted: set[str], wait_s: float = 20) -> dict[str, set[str]]:
    """The job's tasks and actors by node; task events reach the state API a little late, so wait
    (up to wait_s) until every node in `wanted` shows up."""
    deadline = time.monotonic() + wait_s
    while True:
        placed: dict[str, set[str]] = {}
        for kind in ("tasks", "actors"):
            for node, names in cluster.job_nodes(job_id, kind).items():
                placed.setdefault(node, set()).update(names)
        if wanted <= set(placed) or time.monotonic() > deadline:
            return placed
        time.sleep(1)


@pytest.mark.slow
def test_jobs_api_prepare_and_train_stages_run_on_two_nodes(local_cluster, tmp_path):
    from ray.job_submission import JobSubmissionClient

    from bubogpt.data.synth import synthesize

    # The cluster: three alive nodes, each custom resource on its own node, no CPUs on the head.
    nodes = local_cluster.nodes()
    assert len(nodes) == 3, nodes
    by_resource = {}
    for node_id, node in nodes.items():
        for name in ("head", "worker_a", "worker_b"):
            if name in node["resources_total"]:
                by_resource[name] = node_id
    assert set(by_resource) == {"head", "worker_a", "worker_b"} and len(set(by_resource.values())) == 3
    assert nodes[by_resource["head"]]["resources_total"].get("CPU", 0) == 0
    workers = {by_resource["worker_a"], by_resource["worker_b"]}

    client = JobSubmissionClient(local_cluster.dashboard, headers=local_cluster.headers)
    corpus, prepared, run = tmp_path / "corpus", tmp_path / "prepared", tmp_path / "run"
    synthesize(corpus, size="tiny")

    prepare_id, _ = run_job(
        client,
        f"{VENV_PYTHON} -m workflows.cli data prepare --input {corpus} --out {prepared} --preset tiny --workers 2",
        timeout_s=300,
    )
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert sum(n for splits in manifest["counts"].values() for n in splits.values()) > 0
    prepare_nodes = placed_nodes(local_cluster, prepare_id, wanted=workers)
    # The head has no CPUs: the preprocessing (CPU tasks and actors) ran on worker nodes.
    assert set(prepare_nodes) & workers, prepare_nodes

    train_id, train_logs = run_job(
        client,
        f"{VENV_PYTHON} -m workflows.cli train --data {prepared} --out {run} --stage stage1 --preset tiny "
        f"--max-steps 5 --num-workers 2 --cpus-per-worker 2 --no-eval",
        timeout_s=420,
    )
    train_nodes = placed_nodes(local_cluster, train_id, wanted=workers)
    # Two training workers of 2 CPUs each on 3-CPU worker nodes (and a head without CPUs): one on each.
    assert workers <= set(train_nodes), {n[:8]: sorted(v)[:5] for n, v in train_nodes.items()}
    # ... and each worker says so in the job's output.
    printed = set(re.findall(r"bubogpt train worker rank \d/2 on node ([0-9a-f]+)", train_logs))
    assert printed == workers, (printed, workers)
    assert set(train_nodes) <= set(nodes)

    # Stage 2 as a job of its own on the same OUT, as the RayJobs in cluster/kuberay chain them: it
    # starts from the final checkpoint the stage-1 job recorded in OUT/stages.json, and redoes nothing.
    stage1_end = json.loads((run / "stages.json").read_text())["stage1"]
    _, stage2_logs = run_job(
        client,
        f"{VENV_PYTHON} -m workflows.cli train --data {prepared} --out {run} --stage stage2 --preset tiny "
        f"--max-steps 3 --num-workers 2 --cpus-per-worker 2 --no-eval",
        timeout_s=420,
    )
    assert f"starting from stage1's final checkpoint {stage1_end}" in stage2_logs, stage2_logs[-3000:]
    ends = json.loads((run / "stages.json").read_text())
    assert ends["stage1"] == stage1_end and Path(ends["stage2"]).name == "stage2_step_000003", ends
