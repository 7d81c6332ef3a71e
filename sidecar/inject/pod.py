"""The sidecar an annotated pod receives, and the JSON patch that adds it.

`plan_injection(pod, defaults)` decides and returns the RFC 6902 patch; the
webhook sends that patch and `--dry-run` applies the very same one, so both
show the same pod. The patch never touches the app's security contexts (pod
or container): the sidecar brings its own, and its private key arrives as an
environment variable from the key Secret, so no `fsGroup` is needed.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from sidecar.inject import annotations as ann
from sidecar.inject.annotations import AnnotationError, SidecarSettings, settings_for
from sidecar.inject.jsonpatch import Op, add, pointer, replace

SIDECAR_NAME: Final = "ai-gateway-sidecar"
PROXY_PORT: Final = 8080
ADMIN_PORT: Final = 9090
CONFIG_DIR: Final = "/etc/sidecar/config"
VAULT_DIR: Final = "/etc/sidecar/vault"
STATE_DIR: Final = "/var/lib/sidecar"
PRIVATE_KEY_ENV: Final = "SIDECAR_PRIVATE_KEY"
PRIVATE_KEY_ITEM: Final = "sidecar.key"
#: Above the sidecar's exit bound (shutdown_grace 25s + 1s), with a margin.
MIN_GRACE_SECONDS: Final = 35
#: What the app containers get, unless they already set the variable in `env`.
APP_ENV: Final = (
    ("OPENAI_BASE_URL", f"http://127.0.0.1:{PROXY_PORT}/v1"),
    ("ANTHROPIC_BASE_URL", f"http://127.0.0.1:{PROXY_PORT}"),
    ("GOOGLE_GEMINI_BASE_URL", f"http://127.0.0.1:{PROXY_PORT}"),
)
VOLUME_NAMES: Final = ("sidecar-config", "sidecar-vault", "sidecar-state", "sidecar-tmp")
DEFAULT_CONTAINER: Final = "kubectl.kubernetes.io/default-container"
SCRAPE: Final = "prometheus.io/scrape"
#: The pod label a PodMonitor selects injected pods by (deploy/k8s/components/podmonitor).
INJECTED_LABEL: Final = ("ai-gateway-sidecar/injected", "true")


class Outcome(enum.Enum):
    INJECTED = "injected"
    NOT_REQUESTED = "not-requested"
    ALREADY_INJECTED = "already-injected"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Decision:
    """What the injector does with one pod: the patch (empty unless injected) and why."""

    outcome: Outcome
    patch: tuple[Op, ...] = ()
    warnings: tuple[str, ...] = ()


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "sidecar-admin"},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def sidecar_container(s: SidecarSettings) -> dict[str, Any]:
    """The sidecar container; native (an init container that keeps running) unless `s.native` is off."""
    container: dict[str, Any] = {"name": SIDECAR_NAME, "image": s.image}
    if s.native:
        container["restartPolicy"] = "Always"
    container |= {
        "args": ["serve", "--config", f"{CONFIG_DIR}/sidecar.yaml"],
        "env": [
            {
                "name": PRIVATE_KEY_ENV,
                "valueFrom": {"secretKeyRef": {"name": s.key_secret, "key": PRIVATE_KEY_ITEM}},
            }
        ],
        "ports": [{"name": "sidecar-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"}],
    }
    if s.native:
        # Ready before the app starts: the kubelet starts the next container only then.
        container["startupProbe"] = _probe("/readyz", 1, 60)
    container |= {
        "livenessProbe": _probe("/healthz", 10, 3),
        "readinessProbe": _probe("/readyz", 5, 2),
        "resources": {
            "requests": {"cpu": s.cpu_request, "memory": s.memory_request},
            "limits": {"cpu": s.cpu_limit, "memory": s.memory_limit},
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
            {"name": "sidecar-config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "sidecar-vault", "mountPath": VAULT_DIR, "readOnly": True},
            {"name": "sidecar-state", "mountPath": STATE_DIR},
            {"name": "sidecar-tmp", "mountPath": "/tmp"},
        ],
    }
    return container


def sidecar_volumes(s: SidecarSettings) -> list[dict[str, Any]]:
    return [
        {"name": "sidecar-config", "configMap": {"name": s.config_map}},
        {"name": "sidecar-vault", "configMap": {"name": s.vault_map}},
        {"name": "sidecar-state", "emptyDir": {"sizeLimit": "256Mi"}},
        {"name": "sidecar-tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
    ]


def plan_injection(pod: Mapping[str, Any], defaults: SidecarSettings) -> Decision:
    """Whether and how to inject into `pod` (a Pod or a pod template: `metadata` + `spec`).

    Fails open: anything wrong (an annotation, a name or port the sidecar needs
    already taken, a malformed spec) gives REFUSED with warnings and no patch.
    """
    metadata, spec = pod.get("metadata"), pod.get("spec")
    annotations = metadata.get("annotations") if isinstance(metadata, dict) else None
    annotations = annotations if isinstance(annotations, dict) else {}
    requested = annotations.get(ann.INJECT)
    if requested is None or requested == "false":
        return Decision(Outcome.NOT_REQUESTED)
    if requested != "true":
        return _refused(f'annotation {ann.INJECT} is neither "true" nor "false" (quoted)')
    if not isinstance(spec, dict) or not _is_container_list(spec.get("containers") or None):
        return _refused("the pod spec has no list of named containers")
    if not _is_container_list(spec.get("initContainers") or []):
        return _refused("the pod spec's initContainers are not a list of named containers")
    if annotations.get(ann.STATUS) == ann.INJECTED or _has_sidecar(spec):
        return Decision(Outcome.ALREADY_INJECTED)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
        return _refused("the pod's annotations are not all strings")
    try:
        settings = settings_for(annotations, defaults)
    except AnnotationError as exc:
        return _refused(*exc.problems)
    conflicts = _conflicts(spec)
    if conflicts:
        return _refused(*conflicts)
    return Decision(Outcome.INJECTED, tuple(_patch(pod, spec, annotations, settings)))


def _refused(*problems: str) -> Decision:
    return Decision(
        Outcome.REFUSED, (), tuple(f"{SIDECAR_NAME} not injected: {p}" for p in problems)
    )


def _is_container_list(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(c, dict) and isinstance(c.get("name"), str) for c in value
    )


def _containers(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [*spec["containers"], *(spec.get("initContainers") or [])]


def _has_sidecar(spec: Mapping[str, Any]) -> bool:
    return any(c["name"] == SIDECAR_NAME for c in _containers(spec))


def _conflicts(spec: Mapping[str, Any]) -> list[str]:
    """What the pod already has that the sidecar needs for itself."""
    problems = []
    volumes = spec.get("volumes") or []
    if not isinstance(volumes, list) or not all(isinstance(v, dict) for v in volumes):
        return ["the pod spec's volumes are not a list"]
    taken = [name for name in VOLUME_NAMES if any(v.get("name") == name for v in volumes)]
    if taken:
        problems.append(f"the pod already has a volume named {', '.join(taken)}")
    if spec.get("hostNetwork") is True:
        problems.append(
            "the pod uses hostNetwork: the sidecar's loopback ports would be the node's"
        )
    for container in _containers(spec):
        ports = container.get("ports")
        ports = [p for p in ports if isinstance(p, dict)] if isinstance(ports, list) else []
        numbers = [p.get("containerPort") for p in ports]
        problems += [f"container {container['name']} declares port {port}, which the sidecar "
                     "listens on" for port in (PROXY_PORT, ADMIN_PORT) if port in numbers]  # fmt: skip
        if any(p.get("name") == "sidecar-admin" for p in ports):
            problems.append(f"container {container['name']} already has a port named sidecar-admin")
    return problems


def _patch(
    pod: Mapping[str, Any],
    spec: Mapping[str, Any],
    annotations: Mapping[str, str],
    s: SidecarSettings,
) -> list[Op]:
    ops: list[Op] = []
    new_annotations = {ann.STATUS: ann.INJECTED}
    if DEFAULT_CONTAINER not in annotations:
        new_annotations[DEFAULT_CONTAINER] = spec["containers"][0]["name"]
    if SCRAPE not in annotations:
        new_annotations |= {SCRAPE: "true", "prometheus.io/port": str(ADMIN_PORT),
                            "prometheus.io/path": "/metrics"}  # fmt: skip
    # The pod has annotations: it was asked to be injected by one.
    ops += [add(pointer("metadata", "annotations", k), v) for k, v in new_annotations.items()]

    label, value = INJECTED_LABEL
    if isinstance(pod["metadata"].get("labels"), dict):
        ops.append(add(pointer("metadata", "labels", label), value))
    else:
        ops.append(add(pointer("metadata", "labels"), {label: value}))

    sidecar = sidecar_container(s)
    if not s.native:
        ops.append(add(pointer("spec", "containers", "-"), sidecar))
    elif spec.get("initContainers"):
        ops.append(add(pointer("spec", "initContainers", 0), sidecar))  # first: before other inits
    else:
        ops.append(add(pointer("spec", "initContainers"), [sidecar]))

    for i, container in enumerate(spec["containers"]):
        ops += _env_ops(i, container)

    volumes = sidecar_volumes(s)
    if spec.get("volumes"):
        ops += [add(pointer("spec", "volumes", "-"), v) for v in volumes]
    else:
        ops.append(add(pointer("spec", "volumes"), volumes))

    grace = spec.get("terminationGracePeriodSeconds")
    if not isinstance(grace, int) or isinstance(grace, bool):
        ops.append(add(pointer("spec", "terminationGracePeriodSeconds"), MIN_GRACE_SECONDS))
    elif grace < MIN_GRACE_SECONDS:
        ops.append(replace(pointer("spec", "terminationGracePeriodSeconds"), MIN_GRACE_SECONDS))
    return ops


def _env_ops(index: int, container: Mapping[str, Any]) -> list[Op]:
    env = container.get("env")
    env = env if isinstance(env, list) else None
    present = [e.get("name") for e in env or [] if isinstance(e, dict)]
    missing = [{"name": n, "value": v} for n, v in APP_ENV if n not in present]
    if not missing:
        return []
    if env is None:
        return [add(pointer("spec", "containers", index, "env"), missing)]
    return [add(pointer("spec", "containers", index, "env", "-"), e) for e in missing]
