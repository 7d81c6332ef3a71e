"""`sidecar inject` without a server: annotations, the JSON patch, AdmissionReview, --dry-run.

Pods are what the API server sends a mutating webhook on CREATE: a
ReplicaSet's pod with `generateName`, defaults filled in and the service
account volume already added. Patches are applied with the small RFC 6902
applier below, written apart from the one in `sidecar.inject.jsonpatch`.
"""

from __future__ import annotations

import base64
import copy
import json
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.cli import main
from sidecar.inject import annotations as ann
from sidecar.inject.annotations import (
    SidecarSettings,
    is_dns1123_subdomain,
    is_image,
    parse_quantity,
    settings_for,
)
from sidecar.inject.jsonpatch import PatchError, apply_patch, escape, pointer
from sidecar.inject.manifests import ManifestError, inject_documents
from sidecar.inject.pod import (
    INJECTED_LABEL,
    SIDECAR_NAME,
    Outcome,
    plan_injection,
    sidecar_container,
    sidecar_volumes,
)
from sidecar.inject.review import BadReview, review

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
# Native sidecars (initContainers with restartPolicy) need 1.29+; deploy/ promises 1.30.
K8S_VERSION = "1.30.0"
IMAGE = "registry.example:5000/team/ai-gateway-sidecar:1.2.3"
DEFAULTS = SidecarSettings(image=IMAGE)
INJECT = {"ai-gateway-sidecar/inject": "true"}

Obj = dict[str, Any]


# --------------------------------------------------------------------------- helpers


def _rfc6902(doc: Any, ops: list[Obj]) -> Any:
    """A minimal independent RFC 6902 applier (add, replace) for checking patches."""
    doc = copy.deepcopy(doc)
    for op in ops:
        assert op["op"] in ("add", "replace"), op
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in op["path"].split("/")[1:]]
        parent = doc
        for t in tokens[:-1]:
            parent = parent[int(t)] if isinstance(parent, list) else parent[t]
        last = tokens[-1]
        if isinstance(parent, list):
            if last == "-":
                parent.append(op["value"])
            elif op["op"] == "add":
                parent.insert(int(last), op["value"])
            else:
                parent[int(last)] = op["value"]
        else:
            assert op["op"] == "add" or last in parent, op
            parent[last] = op["value"]
    return doc


def _pod(
    annotations: dict[str, str] | None = None,
    *,
    containers: list[Obj] | None = None,
    **spec: Any,
) -> Obj:
    """A Deployment's pod as a mutating webhook receives it on CREATE."""
    app = {
        "name": "app",
        "image": "registry.example/team/app:2.0",
        "ports": [{"name": "http", "containerPort": 8000, "protocol": "TCP"}],
        "env": [{"name": "LOG_LEVEL", "value": "info"}],
        "resources": {},
        "volumeMounts": [
            {
                "name": "kube-api-access-abcde",
                "readOnly": True,
                "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
            }
        ],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent",
    }
    metadata: Obj = {
        "generateName": "web-7d9c8f5b6-",
        "namespace": "team-a",
        "labels": {"app": "web", "pod-template-hash": "7d9c8f5b6"},
        "ownerReferences": [
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": "web-7d9c8f5b6",
                "uid": "6f1b2c1e-0c1d-4b53-9b67-2f0f7e1f1a11",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    if annotations is not None:
        metadata["annotations"] = annotations
    pod_spec: Obj = {
        "volumes": [
            {
                "name": "kube-api-access-abcde",
                "projected": {
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {
                            "configMap": {
                                "name": "kube-root-ca.crt",
                                "items": [{"key": "ca.crt", "path": "ca.crt"}],
                            }
                        },
                    ],
                    "defaultMode": 420,
                },
            }
        ],
        "containers": containers if containers is not None else [app],
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 30,
        "dnsPolicy": "ClusterFirst",
        "serviceAccountName": "default",
        "serviceAccount": "default",
        "securityContext": {},
        "schedulerName": "default-scheduler",
        "enableServiceLinks": True,
        "preemptionPolicy": "PreemptLowerPriority",
        "priority": 0,
    }
    pod_spec.update(spec)
    return {"kind": "Pod", "apiVersion": "v1", "metadata": metadata, "spec": pod_spec}


def _admission_review(obj: Obj, *, kind: str = "Pod", operation: str = "CREATE") -> Obj:
    group, version = ("", "v1") if kind == "Pod" else ("apps", "v1")
    resource = {"group": group, "version": version, "resource": kind.lower() + "s"}
    return {
        "kind": "AdmissionReview",
        "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": resource,
            "requestKind": {"group": group, "version": version, "kind": kind},
            "requestResource": resource,
            "namespace": "team-a",
            "operation": operation,
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "0ab0ae3c-2fd8-4c2b-9f2b-23b5d1b7ac93",
                "groups": ["system:serviceaccounts", "system:authenticated"],
            },
            "object": obj,
            "oldObject": None,
            "dryRun": False,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
        },
    }


def _answer(obj: Obj, **kwargs: Any) -> Obj:
    body = json.dumps(_admission_review(obj, **kwargs)).encode()
    answer: Obj = review(body, DEFAULTS).answer
    return answer


def _patch_of(answer: Obj) -> list[Obj]:
    response = answer["response"]
    assert response["patchType"] == "JSONPatch"
    ops: list[Obj] = json.loads(base64.b64decode(response["patch"]))
    return ops


def _injected(pod: Obj) -> Obj:
    """The pod after the webhook's patch, applied by the test's own applier."""
    mutated: Obj = _rfc6902(pod, _patch_of(_answer(pod)))
    return mutated


def _validate(obj: Obj) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{obj['kind']}: {exc.message} at {list(exc.path)}")


def _env(container: Obj) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


# --------------------------------------------------------------------------- the webhook's answer


def test_pod_without_the_annotation_is_allowed_unchanged() -> None:
    for asked in (None, {}, {"ai-gateway-sidecar/inject": "false"}):
        answer = _answer(_pod(asked))
        assert answer == {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": True},
        }


def test_annotated_pod_gets_the_native_sidecar_first_among_init_containers() -> None:
    pod = _pod(dict(INJECT), initContainers=[{"name": "migrate", "image": "busybox"}])
    answer = _answer(pod)
    assert answer["response"]["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    assert answer["response"]["allowed"] is True
    assert "warnings" not in answer["response"]
    mutated = _injected(pod)
    spec = mutated["spec"]
    assert [c["name"] for c in spec["initContainers"]] == [SIDECAR_NAME, "migrate"]
    sidecar = spec["initContainers"][0]
    assert sidecar == sidecar_container(DEFAULTS)
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == IMAGE
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "sidecar-admin"}
    assert [c["name"] for c in spec["containers"]] == ["app"]
    assert [v["name"] for v in spec["volumes"]] == [
        "kube-api-access-abcde", "sidecar-config", "sidecar-vault", "sidecar-state", "sidecar-tmp",
    ]  # fmt: skip
    assert spec["terminationGracePeriodSeconds"] == 35
    assert mutated["metadata"]["annotations"] == {
        **INJECT,
        "ai-gateway-sidecar/status": "injected",
        "kubectl.kubernetes.io/default-container": "app",
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9090",
        "prometheus.io/path": "/metrics",
    }
    assert mutated["metadata"]["labels"]["ai-gateway-sidecar/injected"] == "true"
    _validate(mutated)


def test_app_containers_get_the_base_urls_but_keep_their_own() -> None:
    own = {"name": "OPENAI_BASE_URL", "value": "http://proxy.internal/v1"}
    containers = [
        {"name": "app", "image": "app:1", "env": [own]},
        {"name": "worker", "image": "worker:1"},
        {"name": "empty", "image": "worker:1", "env": []},
    ]
    mutated = _injected(_pod(dict(INJECT), containers=containers))
    app, worker, empty = mutated["spec"]["containers"]
    assert _env(app) == {
        "OPENAI_BASE_URL": "http://proxy.internal/v1",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:8080",
        "GOOGLE_GEMINI_BASE_URL": "http://127.0.0.1:8080",
    }
    expected = {
        "OPENAI_BASE_URL": "http://127.0.0.1:8080/v1",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:8080",
        "GOOGLE_GEMINI_BASE_URL": "http://127.0.0.1:8080",
    }
    assert _env(worker) == expected
    assert _env(empty) == expected
    # The sidecar's own env holds only the key reference, never a value.
    (key_env,) = mutated["spec"]["initContainers"][0]["env"]
    assert key_env == {
        "name": "SIDECAR_PRIVATE_KEY",
        "valueFrom": {"secretKeyRef": {"name": "sidecar-private-key", "key": "sidecar.key"}},
    }
    _validate(mutated)


def test_security_contexts_of_the_app_are_never_touched() -> None:
    pod_security = {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 3000,
        "fsGroup": 2000,
        "supplementalGroups": [4000],
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container_security = {
        "runAsUser": 1001,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
    }
    containers = [{"name": "app", "image": "app:1", "securityContext": container_security}]
    pod = _pod(dict(INJECT), containers=containers, securityContext=pod_security)
    ops = _patch_of(_answer(pod))
    assert not [op for op in ops if "securityContext" in op["path"]]
    assert not [op for op in ops if op["path"].startswith("/spec/containers/0/") and
                not op["path"].startswith("/spec/containers/0/env")]  # fmt: skip
    mutated = _rfc6902(pod, ops)
    assert mutated["spec"]["securityContext"] == pod_security
    assert mutated["spec"]["containers"][0]["securityContext"] == container_security
    _validate(mutated)


def test_missing_arrays_and_objects_are_created() -> None:
    pod = _pod(dict(INJECT), containers=[{"name": "app", "image": "app:1"}])
    del pod["spec"]["volumes"], pod["spec"]["terminationGracePeriodSeconds"]
    del pod["metadata"]["labels"]
    ops = _patch_of(_answer(pod))
    paths = {op["path"] for op in ops}
    assert {"/spec/initContainers", "/spec/volumes", "/spec/containers/0/env",
            "/spec/terminationGracePeriodSeconds", "/metadata/labels"} <= paths  # fmt: skip
    mutated = _rfc6902(pod, ops)
    assert [v["name"] for v in mutated["spec"]["volumes"]] == [v["name"] for v in
                                                               sidecar_volumes(DEFAULTS)]  # fmt: skip
    assert mutated["spec"]["terminationGracePeriodSeconds"] == 35
    _validate(mutated)


def test_annotation_keys_are_escaped_as_json_pointers() -> None:
    ops = _patch_of(_answer(_pod(dict(INJECT))))
    annotation_paths = [op["path"] for op in ops if op["path"].startswith("/metadata/annotations/")]
    assert "/metadata/annotations/ai-gateway-sidecar~1status" in annotation_paths
    assert "/metadata/annotations/kubectl.kubernetes.io~1default-container" in annotation_paths
    assert escape("a~b/c") == "a~0b~1c"
    assert pointer("metadata", "annotations", "x/~y") == "/metadata/annotations/x~1~0y"


def test_grace_period_is_raised_only_when_lower() -> None:
    assert _injected(_pod(dict(INJECT), terminationGracePeriodSeconds=60))["spec"][
        "terminationGracePeriodSeconds"] == 60  # fmt: skip
    ops = _patch_of(_answer(_pod(dict(INJECT), terminationGracePeriodSeconds=5)))
    assert {"op": "replace", "path": "/spec/terminationGracePeriodSeconds", "value": 35} in ops


def test_existing_default_container_and_scrape_annotations_are_kept() -> None:
    mine = {
        **INJECT,
        "kubectl.kubernetes.io/default-container": "other",
        "prometheus.io/scrape": "false",
    }
    containers = [{"name": "app", "image": "a:1"}, {"name": "other", "image": "b:1"}]
    annotations = _injected(_pod(mine, containers=containers))["metadata"]["annotations"]
    assert annotations["kubectl.kubernetes.io/default-container"] == "other"
    assert annotations["prometheus.io/scrape"] == "false"
    assert "prometheus.io/port" not in annotations


def test_injection_is_idempotent() -> None:
    mutated = _injected(_pod(dict(INJECT)))
    assert plan_injection(mutated, DEFAULTS).outcome is Outcome.ALREADY_INJECTED
    assert "patch" not in _answer(mutated)["response"]
    # A pod that carries the sidecar already (kustomize component), without the status mark.
    by_hand = _pod(dict(INJECT), initContainers=[{"name": SIDECAR_NAME, "image": "x:1"}])
    answer = _answer(by_hand)["response"]
    assert "patch" not in answer
    assert "warnings" not in answer
    classic = _pod(dict(INJECT), containers=[{"name": "app", "image": "a:1"},
                                             {"name": SIDECAR_NAME, "image": "x:1"}])  # fmt: skip
    assert plan_injection(classic, DEFAULTS).outcome is Outcome.ALREADY_INJECTED


def test_annotations_choose_config_vault_key_image_and_resources() -> None:
    chosen = {
        **INJECT,
        "ai-gateway-sidecar/config": "team-a.sidecar-config",
        "ai-gateway-sidecar/vault": "team-a-vault",
        "ai-gateway-sidecar/key-secret": "team-a-key",
        "ai-gateway-sidecar/image": "ghcr.io/acme/sidecar@sha256:" + "ab" * 32,
        "ai-gateway-sidecar/cpu-request": "100m",
        "ai-gateway-sidecar/cpu-limit": "1",
        "ai-gateway-sidecar/memory-request": "128Mi",
        "ai-gateway-sidecar/memory-limit": "0.5Gi",
    }
    mutated = _injected(_pod(chosen))
    sidecar = mutated["spec"]["initContainers"][0]
    assert sidecar["image"] == chosen["ai-gateway-sidecar/image"]
    assert sidecar["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"cpu": "1", "memory": "0.5Gi"},
    }
    assert sidecar["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "team-a-key"
    volumes = {v["name"]: v for v in mutated["spec"]["volumes"]}
    assert volumes["sidecar-config"]["configMap"]["name"] == "team-a.sidecar-config"
    assert volumes["sidecar-vault"]["configMap"]["name"] == "team-a-vault"
    _validate(mutated)


def test_classic_variant_appends_the_sidecar_last_without_native_fields() -> None:
    pod = _pod({**INJECT, "ai-gateway-sidecar/native": "false"})
    mutated = _injected(pod)
    assert "initContainers" not in mutated["spec"]
    names = [c["name"] for c in mutated["spec"]["containers"]]
    assert names == ["app", SIDECAR_NAME]
    sidecar = mutated["spec"]["containers"][-1]
    assert "restartPolicy" not in sidecar
    assert "startupProbe" not in sidecar
    assert _env(sidecar) == {"SIDECAR_PRIVATE_KEY": None}  # the sidecar gets no base URLs
    assert mutated["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "app"
    _validate(mutated)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ai-gateway-sidecar/inject", "True"),
        ("ai-gateway-sidecar/config", "Team_A"),
        ("ai-gateway-sidecar/vault", "a" * 254),
        ("ai-gateway-sidecar/key-secret", "key/../other"),
        ("ai-gateway-sidecar/image", "nginx latest; rm -rf /"),
        ("ai-gateway-sidecar/image", "registry.example/" + "a" * 600),
        ("ai-gateway-sidecar/cpu-request", "lots"),
        ("ai-gateway-sidecar/cpu-limit", "0"),
        ("ai-gateway-sidecar/memory-request", "-64Mi"),
        ("ai-gateway-sidecar/memory-limit", "1e999"),
        ("ai-gateway-sidecar/memory-limit", "64MB"),
        ("ai-gateway-sidecar/native", "no"),
        ("ai-gateway-sidecar/cpu-requests", "100m"),
    ],
)
def test_invalid_annotation_admits_the_pod_unchanged_with_a_warning(key: str, value: str) -> None:
    pod = _pod({**INJECT, key: value})
    response = _answer(pod)["response"]
    assert response["allowed"] is True
    assert "patch" not in response
    assert "patchType" not in response
    (warning,) = response["warnings"]
    assert key in warning
    assert "not injected" in warning
    if len(value) > 3:
        assert value not in warning  # named, never echoed
    assert len(warning) <= 256
    assert "\n" not in warning


def test_request_above_limit_is_refused_before_the_api_server_would() -> None:
    pod = _pod({**INJECT, "ai-gateway-sidecar/memory-request": "512Mi"})  # limit 256Mi
    response = _answer(pod)["response"]
    assert "patch" not in response
    assert "memory-request" in response["warnings"][0]
    assert "memory-limit" in response["warnings"][0]


def test_every_bad_annotation_is_named() -> None:
    pod = _pod({**INJECT, "ai-gateway-sidecar/config": "A", "ai-gateway-sidecar/cpu-limit": "x"})
    warnings = _answer(pod)["response"]["warnings"]
    assert len(warnings) == 2
    assert any("ai-gateway-sidecar/config" in w for w in warnings)
    assert any("ai-gateway-sidecar/cpu-limit" in w for w in warnings)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"volumes": [{"name": "sidecar-config", "emptyDir": {}}]}, "volume named sidecar-config"),
        ({"hostNetwork": True}, "hostNetwork"),
        (
            {"containers": [{"name": "app", "image": "a:1", "ports": [{"containerPort": 8080}]}]},
            "port 8080",
        ),
        (
            {"containers": [{"name": "app", "image": "a:1", "ports": [{"containerPort": 9090}]}]},
            "port 9090",
        ),
    ],
)
def test_what_the_sidecar_needs_already_taken_is_refused(spec: Obj, words: str) -> None:
    pod = _pod(dict(INJECT))
    pod["spec"].update(spec)
    response = _answer(pod)["response"]
    assert "patch" not in response
    assert words in response["warnings"][0]


def test_malformed_pod_spec_is_refused_not_crashed() -> None:
    odd: list[Obj] = [
        {"containers": []},
        {"containers": [{"name": "a", "ports": 8080, "env": "x"}]},
        {
            "containers": [{"name": "a", "ports": [[1]], "env": [[1], {"name": ["x"]}]}],
            "volumes": [{"name": ["sidecar-config"]}],
        },
    ]
    for spec in odd:
        pod = {"metadata": {"annotations": dict(INJECT)}, "spec": spec}
        plan_injection(pod, DEFAULTS)  # never raises
    assert plan_injection({"metadata": {"annotations": dict(INJECT)}, "spec": odd[0]},
                          DEFAULTS).outcome is Outcome.REFUSED  # fmt: skip
    for spec in ({}, {"containers": "app"}, {"containers": [{"image": "a"}]},
                 {"containers": [{"name": "a"}], "initContainers": [1]}):  # fmt: skip
        decision = plan_injection({"metadata": {"annotations": dict(INJECT)}, "spec": spec},
                                  DEFAULTS)  # fmt: skip
        assert decision.outcome is Outcome.REFUSED
        assert not decision.patch


def test_only_pod_creates_are_looked_at() -> None:
    deployment = {
        "kind": "Deployment",
        "apiVersion": "apps/v1",
        "metadata": {"annotations": INJECT},
    }
    assert _answer(deployment, kind="Deployment")["response"] == {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "allowed": True,
    }
    assert "patch" not in _answer(_pod(dict(INJECT)), operation="UPDATE")["response"]


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1beta1", "request": {"uid": "a"}}',
        b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}',
        b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {"uid": 5}}',
        b'{"kind": "Pod", "apiVersion": "v1"}',
    ],
)
def test_what_is_not_an_admission_review_is_a_bad_review(body: bytes) -> None:
    with pytest.raises(BadReview):
        review(body, DEFAULTS)


def test_review_names_the_pod_for_the_log_without_its_contents() -> None:
    body = json.dumps(_admission_review(_pod({**INJECT, "ai-gateway-sidecar/cpu-limit": "x"})))
    reviewed = review(body.encode(), DEFAULTS)
    assert (reviewed.namespace, reviewed.pod, reviewed.outcome) == (
        "team-a", "web-7d9c8f5b6-", "refused",
    )  # fmt: skip


# --------------------------------------------------------------------------- annotation values


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("500m", Fraction(1, 2)),
        ("1", Fraction(1)),
        ("64Mi", Fraction(64 * 2**20)),
        ("1.5Gi", Fraction(3 * 2**29)),
        ("1e3", Fraction(1000)),
        ("2E-2", Fraction(2, 100)),
        (".5", Fraction(1, 2)),
        ("100k", Fraction(100_000)),
        ("250u", Fraction(250, 10**6)),
    ],
)
def test_quantities_parse_like_kubernetes(text: str, value: Fraction) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize(
    "text",
    ["", "m", "1.2.3", "5 Mi", "-1", "+1", "1Mb", "1e100", "1ki", "0x10", "1" * 40, "\u0661"],
)
def test_what_is_not_a_quantity(text: str) -> None:
    assert parse_quantity(text) is None


@pytest.mark.parametrize(
    ("image", "ok"),
    [
        ("nginx", True),
        ("ghcr.io/example/ai-gateway-sidecar:0.1.0", True),
        ("localhost:5000/a/b_c__d-e:v1.2-rc.1", True),
        ("registry.example/app@sha256:" + "0" * 64, True),
        ("registry.example/app:1@sha256:" + "0" * 64, True),
        ("Nginx", False),
        ("nginx:latest latest", False),
        ("nginx:", False),
        ("-nginx", False),
        ("nginx\n", False),
        ("a/" * 300 + "b", False),
    ],
)
def test_image_references(image: str, ok: bool) -> None:
    assert is_image(image) is ok


def test_dns1123_names() -> None:
    assert is_dns1123_subdomain("sidecar-config")
    assert is_dns1123_subdomain("a.b-c.d")
    for bad in ("", "A", "a_b", "-a", "a-", "a..b", "a" * 254, "ä"):
        assert not is_dns1123_subdomain(bad)


def test_defaults_are_the_shared_design() -> None:
    s = settings_for(dict(INJECT), SidecarSettings())
    assert (s.config_map, s.vault_map, s.key_secret) == (
        "sidecar-config", "sidecar-vault", "sidecar-private-key",
    )  # fmt: skip
    assert (s.cpu_request, s.cpu_limit, s.memory_request, s.memory_limit) == (
        "50m", "500m", "64Mi", "256Mi",
    )  # fmt: skip
    assert s.native
    assert s.image == ann.DEFAULT_IMAGE


# --------------------------------------------------------------------------- jsonpatch


def test_own_applier_agrees_with_the_reference_one() -> None:
    pod = _pod(dict(INJECT), initContainers=[{"name": "migrate", "image": "busybox"}])
    ops = list(plan_injection(pod, DEFAULTS).patch)
    assert apply_patch(pod, ops) == _rfc6902(pod, ops)
    assert pod == _pod(dict(INJECT), initContainers=[{"name": "migrate", "image": "busybox"}])


@pytest.mark.parametrize(
    "op",
    [
        {"op": "remove", "path": "/a"},
        {"op": "add", "path": "/missing/x", "value": 1},
        {"op": "add", "path": "/list/7", "value": 1},
        {"op": "add", "path": "/list/01", "value": 1},
        {"op": "replace", "path": "/nope", "value": 1},
        {"op": "add", "path": "no-slash", "value": 1},
    ],
)
def test_own_applier_refuses_what_does_not_apply(op: Obj) -> None:
    with pytest.raises(PatchError):
        apply_patch({"a": 1, "list": [1, 2]}, [op])


# --------------------------------------------------------------------------- --dry-run


def _workloads() -> list[Obj]:
    template = {
        "metadata": {"labels": {"app": "web"}, "annotations": dict(INJECT)},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
    }
    selector = {"matchLabels": {"app": "web"}}
    job_template = copy.deepcopy(template)
    job_template["spec"]["restartPolicy"] = "Never"
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
         "spec": {"selector": selector, "template": copy.deepcopy(template)}},
        {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"},
         "spec": {"selector": selector, "serviceName": "db", "template": copy.deepcopy(template)}},
        {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "agent"},
         "spec": {"selector": selector, "template": copy.deepcopy(template)}},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "once"},
         "spec": {"template": copy.deepcopy(job_template)}},
        {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "nightly"},
         "spec": {"schedule": "0 3 * * *",
                  "jobTemplate": {"spec": {"template": copy.deepcopy(job_template)}}}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "solo", **template["metadata"]},
         "spec": copy.deepcopy(template["spec"])},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
         "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}},
    ]  # fmt: skip


def _template_of(doc: Obj) -> Obj:
    if doc["kind"] == "Pod":
        return doc
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]  # type: ignore[no-any-return]
    return doc["spec"]["template"]  # type: ignore[no-any-return]


def test_dry_run_injects_every_workload_kind_and_leaves_the_rest() -> None:
    docs = _workloads()
    result = inject_documents(yaml.safe_dump_all(docs), DEFAULTS)
    out = list(yaml.safe_load_all(result.text))
    assert result.injected == 6
    assert result.warnings == ()
    assert [d["kind"] for d in out] == [d["kind"] for d in docs]
    for doc in out[:-1]:
        pod = _template_of(doc)
        sidecar = pod["spec"]["initContainers"][0]
        assert sidecar == sidecar_container(DEFAULTS), doc["kind"]
        _validate(doc)
    assert out[-1] == docs[-1]


def test_dry_run_equals_applying_the_webhooks_patch() -> None:
    (deployment,) = [d for d in _workloads() if d["kind"] == "Deployment"]
    template = deployment["spec"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod", **copy.deepcopy(template)}
    from_webhook = _injected(pod)
    out = next(yaml.safe_load_all(inject_documents(yaml.safe_dump(deployment), DEFAULTS).text))
    from_dry_run = out["spec"]["template"]
    assert {"metadata": from_webhook["metadata"], "spec": from_webhook["spec"]} == from_dry_run


def test_dry_run_of_a_list_and_a_refused_template() -> None:
    bad = _workloads()[0]
    bad["spec"]["template"]["metadata"]["annotations"]["ai-gateway-sidecar/cpu-limit"] = "x"
    listed = {"apiVersion": "v1", "kind": "List", "items": [_workloads()[0], bad]}
    result = inject_documents(yaml.safe_dump(listed), DEFAULTS)
    (out,) = yaml.safe_load_all(result.text)
    assert "initContainers" in out["items"][0]["spec"]["template"]["spec"]
    assert out["items"][1] == bad
    (warning,) = result.warnings
    assert warning.startswith("Deployment/web: ")
    assert "cpu-limit" in warning


def test_dry_run_refuses_what_is_not_yaml() -> None:
    with pytest.raises(ManifestError, match="line 2"):
        inject_documents("a: 1\n  b: 2\n", DEFAULTS)


def test_cli_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "deployment.yaml"
    manifest.write_text(yaml.safe_dump_all(_workloads()[:1]))
    assert main(["inject", "--dry-run", "-f", str(manifest), "--image", IMAGE]) == 0
    captured = capsys.readouterr()
    (out,) = yaml.safe_load_all(captured.out)
    assert out["spec"]["template"]["spec"]["initContainers"][0]["image"] == IMAGE
    assert "injected 1 pod template(s)" in captured.err


def test_cli_inject_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["inject"], ["inject", "--dry-run"], ["inject", "--image", "Bad Image"],
                 ["inject", "--make-certs", "d", "--namespace", "Bad_NS"],
                 ["inject", "--dry-run", "--make-certs", "d", "-f", "x"]):  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv
    assert main(["inject", "--dry-run", "-f", str(tmp_path / "missing.yaml")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_cli_make_certs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x509 = pytest.importorskip("cryptography.x509")
    out_dir = tmp_path / "certs"
    assert main(["inject", "--make-certs", str(out_dir), "--service", "hook",
                 "--namespace", "infra", "--days", "30"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    ca_pem = (out_dir / "ca.crt").read_bytes()
    assert base64.b64decode(captured.out.strip()) == ca_pem
    assert (out_dir / "tls.key").stat().st_mode & 0o777 == 0o600
    assert "kubectl -n infra create secret tls hook-tls" in captured.err
    assert "PRIVATE KEY" not in captured.err + captured.out
    cert = x509.load_pem_x509_certificate((out_dir / "tls.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [
        "hook", "hook.infra", "hook.infra.svc", "hook.infra.svc.cluster.local",
    ]  # fmt: skip
    ca = x509.load_pem_x509_certificate(ca_pem)
    cert.verify_directly_issued_by(ca)
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 30
    # Never overwrites: a second run is refused and the files stay.
    assert main(["inject", "--make-certs", str(out_dir)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (out_dir / "ca.crt").read_bytes() == ca_pem


# --------------------------------------------------------------------------- the manifests' sidecar


def _sidecars_in(directory: Path) -> list[Obj]:
    """Every `ai-gateway-sidecar` container written in a component's files, whatever the patch form."""
    found: list[Obj] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("name") == SIDECAR_NAME and "image" in node:
                found.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            walk(doc)
    return found


def _pod_template_patch(directory: Path) -> Obj:
    """The strategic-merge patch's pod template (label, volumes, grace period) in a component."""
    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "Deployment":
                template: Obj = doc["spec"]["template"]
                return template
    pytest.fail(f"no Deployment patch in {directory}")


NATIVE_COMPONENT = K8S / "add-to-existing"
CLASSIC_COMPONENT = K8S / "add-to-existing-classic"


@pytest.mark.parametrize(
    ("directory", "native"), [(NATIVE_COMPONENT, True), (CLASSIC_COMPONENT, False)]
)
def test_injected_sidecar_is_the_components_sidecar(directory: Path, native: bool) -> None:
    theirs = _sidecars_in(directory)
    if not theirs:
        pytest.skip(f"no {SIDECAR_NAME} container in {directory.relative_to(ROOT)}/*.yaml yet")
    assert theirs == [sidecar_container(SidecarSettings(native=native))]
    template = _pod_template_patch(directory)
    label, value = INJECTED_LABEL
    assert template["metadata"]["labels"][label] == value
    spec = template["spec"]
    assert spec["volumes"] == sidecar_volumes(SidecarSettings())
    assert spec["terminationGracePeriodSeconds"] == 35
