"""The AdmissionReview exchange (admission.k8s.io/v1), without I/O.

The answer always allows the object (the webhook fails open): it carries a
JSON patch only when the pod is injected, and `warnings` when the pod asked
for injection and was refused. Only Pod CREATE requests are looked at.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Final

import orjson

from sidecar.inject.annotations import SidecarSettings
from sidecar.inject.pod import Decision, Outcome, plan_injection

API_VERSION: Final = "admission.k8s.io/v1"
#: The largest AdmissionReview accepted; a pod is far smaller (etcd keeps objects under 1.5 MiB).
MAX_REVIEW_BYTES: Final = 2 * 1024 * 1024
_MAX_UID: Final = 128


class BadReview(ValueError):
    """The body is not an AdmissionReview this webhook can answer (HTTP 400)."""


@dataclass(frozen=True, slots=True)
class Reviewed:
    """The answer, and what the log line says about it (names only, never pod contents)."""

    answer: dict[str, Any]
    uid: str
    outcome: str
    namespace: str
    pod: str
    warnings: tuple[str, ...]


def review(body: bytes, defaults: SidecarSettings) -> Reviewed:
    """Answer one AdmissionReview request body; BadReview when it is not one."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadReview("the body is not JSON") from None
    if not isinstance(doc, dict) or doc.get("kind") != "AdmissionReview":
        raise BadReview("not an AdmissionReview")
    if doc.get("apiVersion") != API_VERSION:
        raise BadReview(f"apiVersion must be {API_VERSION}")
    request = doc.get("request")
    if not isinstance(request, dict):
        raise BadReview("no request in the AdmissionReview")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid or len(uid) > _MAX_UID:
        raise BadReview("request.uid is missing or not a short string")
    namespace = request.get("namespace")
    namespace = namespace if isinstance(namespace, str) else ""
    pod = request.get("object")
    if not _is_pod_create(request) or not isinstance(pod, dict):
        return Reviewed(_answer(uid, Decision(Outcome.NOT_REQUESTED)), uid, "ignored",
                        namespace, "", ())  # fmt: skip
    decision = plan_injection(pod, defaults)
    return Reviewed(_answer(uid, decision), uid, decision.outcome.value, namespace,
                    _pod_name(pod), decision.warnings)  # fmt: skip


def _is_pod_create(request: dict[str, Any]) -> bool:
    kind = request.get("kind")
    return (
        request.get("operation") == "CREATE"
        and isinstance(kind, dict)
        and kind.get("group") == ""
        and kind.get("kind") == "Pod"
        and not request.get("subResource")
    )


def _pod_name(pod: dict[str, Any]) -> str:
    """`name`, else `generateName` (pods of a Deployment have only that on CREATE)."""
    metadata = pod.get("metadata")
    if not isinstance(metadata, dict):
        return ""
    name = metadata.get("name") or metadata.get("generateName") or ""
    return name[:253] if isinstance(name, str) else ""


def _answer(uid: str, decision: Decision) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if decision.patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(orjson.dumps(list(decision.patch))).decode("ascii")
    if decision.warnings:
        response["warnings"] = list(decision.warnings)
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}
