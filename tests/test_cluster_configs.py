"""cluster/ against the schemas of the tools that read it: Ray's autoscaler schema for the `ray up` configs,
KubeRay's CRDs for the manifests (strictly: an unknown field fails), the jobs' own parsers for the RayJob
entrypoints, serve_app/config.yaml for the RayService, constraints.txt and the tree for the image recipe.

KubeRay's CRD schemas declare `properties` without `additionalProperties: false`, so a plain validator
accepts any misspelt field (Kubernetes drops those fields, and the API server only warns). Here every object
schema that lists its properties refuses others, unless it says `x-kubernetes-preserve-unknown-fields`;
`x-kubernetes-int-or-string` accepts an integer or a string, `x-kubernetes-list-type` (`set`, `map` with its
`x-kubernetes-list-map-keys`) refuses duplicates; CEL rules (`x-kubernetes-validations`) are not evaluated.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.resources
import json
import re
import shlex
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cluster import render_rayservice
from jobs.common import parse_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
CRDS = Path(__file__).parent / "fixtures" / "kuberay"
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]
IMAGE = "my-registry/magiclens-ray:latest"
GPU_IMAGE = f"{IMAGE}-gpu"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
RAY_PIN = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE).group(1)
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=Loader)


def errors(validator: jsonschema.protocols.Validator, document: Any) -> list[str]:
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(document)]


# --- ray up: Ray's own autoscaler schema -----------------------------------------------------------------------

@cache
def launcher_validator() -> jsonschema.Draft7Validator:
    schema = json.loads((importlib.resources.files("ray") / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(params=LAUNCHER_CONFIGS)
def launcher(request) -> dict:
    return load(CLUSTER / request.param)


def test_launcher_configs_match_rays_schema(launcher):
    assert errors(launcher_validator(), launcher) == []


@pytest.mark.parametrize(("path", "key", "typo"), [
    ((), "idle_timeout_minutes", "idle_timeout_minute"),
    (("available_node_types", "gpu"), "max_workers", "max_worker"),
    (("docker",), "worker_image", "worker_imag"),
])
def test_a_misspelt_launcher_key_is_rejected(path, key, typo):
    config = load(CLUSTER / "aws.yaml")
    node = config
    for step in path:
        node = node[step]
    node[typo] = node.pop(key)
    assert any(typo in problem for problem in errors(launcher_validator(), config))


def test_launcher_node_roles_and_bounds(launcher):
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert any("--num-cpus=0" in command for command in launcher["head_start_ray_commands"])
    workers = {name: spec for name, spec in types.items() if name != launcher["head_node_type"]}
    gpu = [spec for spec in workers.values() if spec["resources"].get("GPU", 0) >= 1]
    cpu = [spec for spec in workers.values() if not spec["resources"].get("GPU")]
    assert gpu and cpu
    for spec in workers.values():
        assert 0 <= spec["min_workers"] <= spec["max_workers"]
    assert sum(spec["max_workers"] for spec in workers.values()) <= launcher["max_workers"]
    assert launcher["idle_timeout_minutes"] > 0
    assert launcher["docker"]["head_image"] == launcher["docker"]["worker_image"] == f"rayproject/ray:{RAY_PIN}-py311"
    for spec in gpu:
        assert spec["docker"]["worker_image"] == f"rayproject/ray:{RAY_PIN}-py311-gpu"


def test_launcher_syncs_and_installs_the_repository(launcher):
    (destination,) = [remote for remote, local in launcher["file_mounts"].items() if local == "."]
    assert ".gitignore" in launcher["rsync_filter"] and ".venv" in launcher["rsync_exclude"]
    installs = [command for command in launcher["setup_commands"] if "pip install" in command]
    assert installs and all(command.startswith(f"cd {destination} && ") for command in installs)
    assert any("-c constraints.txt -e " in command for command in installs)
    assert any("/mnt/shared:/shared" in option for option in launcher["docker"]["run_options"])


def test_the_launcher_configs_agree_but_for_the_provider():
    aws, gcp = (load(CLUSTER / name) for name in LAUNCHER_CONFIGS)
    for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands", "file_mounts",
                "docker", "max_workers", "idle_timeout_minutes"):
        assert aws[key] == gcp[key], key
    resources = {name: spec["resources"] for name, spec in aws["available_node_types"].items()}
    assert resources == {name: spec["resources"] for name, spec in gcp["available_node_types"].items()}


# --- KubeRay: the CRDs' own schemas, strictly -------------------------------------------------------------------

def _int_or_string(validator, enabled, instance, schema):
    if enabled and (isinstance(instance, bool) or not isinstance(instance, (int, str))):
        yield jsonschema.ValidationError(f"{instance!r} is neither an integer nor a string")


def _list_type(validator, kind, instance, schema):
    if not isinstance(instance, list) or kind == "atomic":
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    seen = set()
    for item in instance:
        identity = json.dumps([item.get(key) for key in keys] if kind == "map" and isinstance(item, dict) else item,
                              sort_keys=True)
        if identity in seen:
            yield jsonschema.ValidationError(f"duplicate entry {identity} in a list of type {kind}")
        seen.add(identity)


KubernetesValidator = jsonschema.validators.extend(jsonschema.Draft4Validator, {
    "x-kubernetes-int-or-string": _int_or_string, "x-kubernetes-list-type": _list_type})


def strict(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` wherever an object schema lists its properties and neither
    allows other keys itself nor preserves unknown fields."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: strict(value) for key, value in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        result["additionalProperties"] = False
    return result


@cache
def crd_schema(kind: str) -> dict:
    """The `openAPIV3Schema` of the CRD's `v1` version, as shipped."""
    crd = load(CRDS / CRD_FILES[kind])
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [version for version in crd["spec"]["versions"] if version["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


@cache
def crd_validator(kind: str, strictly: bool = True) -> jsonschema.protocols.Validator:
    return KubernetesValidator(strict(crd_schema(kind)) if strictly else crd_schema(kind))


def manifests() -> list[Path]:
    return sorted(path for path in KUBERAY.glob("*.yaml") if load(path)["apiVersion"] == "ray.io/v1")


def jobs() -> list[Path]:
    return sorted(KUBERAY.glob("*-rayjob.yaml"))


@pytest.mark.parametrize("path", manifests(), ids=lambda path: path.name)
def test_manifest_matches_its_crd(path):
    manifest = load(path)
    assert manifest["kind"] in CRD_FILES
    assert errors(crd_validator(manifest["kind"]), manifest) == []
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"])


def test_every_kind_has_a_manifest():
    assert {load(path)["kind"] for path in manifests()} == set(CRD_FILES)


def _index_job() -> dict:
    return load(KUBERAY / "index-rayjob.yaml")


def _head_container(cluster_spec: dict) -> dict:
    return cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0]


def test_an_unknown_field_is_rejected_only_by_the_strict_schema():
    job = _index_job()
    job["spec"]["entrypointt"] = job["spec"].pop("entrypoint")
    assert errors(crd_validator("RayJob", strictly=False), job) == []  # the CRD alone lets it through
    assert any("entrypointt" in problem for problem in errors(crd_validator("RayJob"), job))
    cluster = load(KUBERAY / "raycluster.yaml")
    _head_container(cluster["spec"])["imagePullPolicyy"] = "Always"
    assert any("imagePullPolicyy" in problem for problem in errors(crd_validator("RayCluster"), cluster))


def test_wrong_types_and_duplicates_are_rejected():
    cluster = load(KUBERAY / "raycluster.yaml")
    cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    assert errors(crd_validator("RayCluster"), cluster)
    cluster = load(KUBERAY / "raycluster.yaml")
    containers = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    containers.append(copy.deepcopy(containers[0]))  # two containers of one name (a list of type map)
    assert any("duplicate" in problem for problem in errors(crd_validator("RayCluster"), cluster))


@pytest.mark.parametrize("cpu", ["4", 4, "500m"])
def test_quantities_are_int_or_string(cpu):
    cluster = load(KUBERAY / "raycluster.yaml")
    _head_container(cluster["spec"])["resources"]["limits"]["cpu"] = cpu
    assert errors(crd_validator("RayCluster"), cluster) == []
    _head_container(cluster["spec"])["resources"]["limits"]["cpu"] = 4.5
    assert errors(crd_validator("RayCluster"), cluster)


# --- what the manifests say -----------------------------------------------------------------------------------

def config_type(module: Any) -> type:
    """The job's options dataclass (its `<Name>Config`)."""
    (found,) = [value for value in vars(module).values() if isinstance(value, type) and dataclasses.is_dataclass(value)
                and value.__module__ == module.__name__ and value.__name__.endswith("Config")]
    return found


def entrypoint(path: Path) -> tuple[Any, list[str]]:
    argv = shlex.split(load(path)["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs.")
    return importlib.import_module(argv[2]), argv[3:]


@pytest.mark.parametrize("path", jobs(), ids=lambda path: path.name)
def test_rayjob_entrypoint_parses_with_the_jobs_own_parser(path):
    module, argv = entrypoint(path)
    config = parse_config(config_type(module), argv)
    assert dataclasses.is_dataclass(config)


def test_rayjobs_cover_the_batch_jobs_and_a_wrong_flag_fails():
    assert {entrypoint(path)[0].__name__ for path in jobs()} >= {"jobs.index", "jobs.train", "jobs.mine",
                                                                  "jobs.evaluate"}
    module, argv = entrypoint(KUBERAY / "index-rayjob.yaml")
    with pytest.raises(SystemExit):
        parse_config(config_type(module), [*argv, "--gpus-per-workers", "1"])


def test_the_cluster_readmes_job_commands_parse():
    text = (CLUSTER / "README.md").read_text().replace("\\\n", " ")
    commands = re.findall(r"python -m (jobs\.\w+)(.*)$", text, re.MULTILINE)
    assert {module for module, _ in commands} >= {"jobs.index", "jobs.train", "jobs.mine", "jobs.evaluate"}
    for module, flags in commands:
        parse_config(config_type(importlib.import_module(module)), shlex.split(flags))


def _pod_specs(cluster_spec: dict) -> list[tuple[dict, bool]]:
    """(pod spec, is a worker group with GPUs) of the head and each worker group."""
    groups = [(cluster_spec["headGroupSpec"], False)]
    for group in cluster_spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        groups.append((group, "nvidia.com/gpu" in limits))
    return [(group["template"]["spec"], gpu) for group, gpu in groups]


def test_the_ray_cluster_autoscales_cpu_and_gpu_workers_on_the_projects_image():
    spec = load(KUBERAY / "raycluster.yaml")["spec"]
    assert spec["rayVersion"] == RAY_PIN and spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert sorted(gpu for _, gpu in _pod_specs(spec)[1:]) == [False, True]
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    claim = load(KUBERAY / "shared-pvc.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for pod, gpu in _pod_specs(spec):
        (container,) = pod["containers"]
        assert container["image"] == (GPU_IMAGE if gpu else IMAGE)
        shared = {volume["name"] for volume in pod["volumes"]
                  if volume.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]}
        assert {"name": shared.pop(), "mountPath": "/shared"} in container["volumeMounts"]


def test_rayjobs_run_on_the_ray_cluster():
    name = load(KUBERAY / "raycluster.yaml")["metadata"]["name"]
    for path in jobs():
        assert load(path)["spec"]["clusterSelector"] == {"ray.io/cluster": name}, path.name


# --- the RayService: rendered from serve_app/config.yaml and the RayCluster --------------------------------------

def leaf_paths(document: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    """Every leaf of a parsed YAML document by its path (lists of mappings are walked, other lists are leaves)."""
    if isinstance(document, list) and document and all(isinstance(item, dict) for item in document):
        document = dict(enumerate(document))
    if isinstance(document, dict) and document:
        return {path: value for key, child in document.items()
                for path, value in leaf_paths(child, (*prefix, key)).items()}
    return {prefix: document}


@pytest.fixture(scope="module")
def serve_config() -> dict:
    return load(render_rayservice.SERVE_CONFIG)


def test_the_committed_rayservice_is_what_the_script_renders():
    assert render_rayservice.RAY_SERVICE.read_text() == render_rayservice.render_files(), \
        "cluster/kuberay/rayservice.yaml is out of date: run python -m cluster.render_rayservice"
    assert render_rayservice.main(["--check"]) == 0


def test_serve_config_v2_is_serve_app_config_but_for_the_documented_overrides(serve_config):
    manifest = load(render_rayservice.RAY_SERVICE)
    served = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert served == render_rayservice.apply_overrides(serve_config)
    source, rendered = leaf_paths(serve_config), leaf_paths(served)
    assert source.keys() == rendered.keys()
    differing = {path for path in source if source[path] != rendered[path]}
    assert differing == {path for path, _ in render_rayservice.OVERRIDES}
    assert manifest["spec"]["rayClusterConfig"] == load(KUBERAY / "raycluster.yaml")["spec"]


def test_a_changed_serve_config_makes_the_manifest_drift(serve_config):
    cluster = load(KUBERAY / "raycluster.yaml")
    changed = copy.deepcopy(serve_config)
    changed["applications"][0]["args"]["max_batch_size"] = 8
    assert render_rayservice.render(changed, cluster) != render_rayservice.RAY_SERVICE.read_text()
    del changed["applications"][0]["args"]["db"]
    with pytest.raises(KeyError, match="args.db"):
        render_rayservice.render(changed, cluster)
    changed = copy.deepcopy(serve_config)
    changed["applications"][0]["deployments"][0]["max_ongoing_requests"] = 4  # under max_batch_size
    with pytest.raises(ValueError, match="batches can never fill"):
        render_rayservice.render(changed, cluster)


# --- the image recipe and the local head script -----------------------------------------------------------------

def dockerfile() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined."""
    return [line for line in (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_the_image_is_rays_pinned_version_with_the_project_installed():
    lines = dockerfile()
    (tag,) = [line.split("=", 1)[1] for line in lines if line.startswith("ARG RAY_IMAGE_TAG=")]
    assert tag == f"{RAY_PIN}-py311"
    assert "FROM rayproject/ray:${RAY_IMAGE_TAG}" in lines
    assert any(line.startswith("RUN pip install") and "-c constraints.txt" in line for line in lines)
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "data", "models", "test-artifacts", "**/__pycache__", ".pytest_cache"} <= ignored
    copied = [part for line in lines if line.startswith("COPY ")
              for part in line.split()[1:-1] if not part.startswith("--")]
    assert {"pyproject.toml", "constraints.txt", "magiclens_core", "jobs", "serve_app"} <= set(copied)
    for source in copied:
        assert (ROOT / source).exists() and source not in ignored, source


def test_the_cluster_readme_names_the_images_and_the_gpu_build():
    readme = (CLUSTER / "README.md").read_text()
    assert IMAGE in readme and GPU_IMAGE in readme
    assert f"--build-arg RAY_IMAGE_TAG={RAY_PIN}-py311-gpu" in readme


def test_the_local_head_script_is_valid_bash():
    script = CLUSTER / "local_head.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "start|stop|status|env" in usage.stderr
