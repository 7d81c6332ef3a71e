"""`sidecar inject` as a process, over real TLS, with a certificate from `--make-certs`.

One webhook per module; clients trust only the CA `--make-certs` wrote and
connect by the Service's DNS name, as the API server does. The certificate
reload runs in-process on a real TLS listener.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.inject.certs import make_certs
from sidecar.inject.webhook import ServingCert
from tests.harness import sidecar_cmd, subprocess_env
from tests.test_inject import INJECT, _admission_review, _pod, _rfc6902, _validate

WAIT = 10.0
SERVICE, NAMESPACE = "ai-gateway-sidecar-injector", "ai-gateway-sidecar"
HOSTNAME = f"{SERVICE}.{NAMESPACE}.svc"
IMAGE = "registry.example/team/sidecar:9.9.9"
# A value that must never reach the webhook's log.
CANARY = "canary-value-3f9c2a"


@dataclass
class Webhook:
    proc: subprocess.Popen[bytes]
    port: int
    ca: Path
    stderr: Path

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stderr.read_text().splitlines() if line.strip()]


def _wait_listening(proc: subprocess.Popen[bytes], stderr: Path) -> int:
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        for line in stderr.read_text().splitlines():
            record = json.loads(line)
            if record.get("event") == "listening":
                return int(record["address"].rsplit(":", 1)[1])
        if proc.poll() is not None:
            raise RuntimeError(f"sidecar inject exited: {stderr.read_text()[-2000:]}")
        time.sleep(0.05)
    raise RuntimeError("sidecar inject did not start listening")


@pytest.fixture(scope="module")
def webhook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhook]:
    pytest.importorskip("cryptography")
    tmp = tmp_path_factory.mktemp("inject")
    certs = tmp / "certs"
    made = subprocess.run(
        sidecar_cmd(
            "inject", "--make-certs", str(certs), "--service", SERVICE, "--namespace", NAMESPACE
        ),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert base64.b64decode(made.stdout.strip()) == (certs / "ca.crt").read_bytes()
    stderr = tmp / "inject.err"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            sidecar_cmd(
                "inject",
                "--listen",
                "127.0.0.1:0",
                "--image",
                IMAGE,
                "--tls-cert",
                str(certs / "tls.crt"),
                "--tls-key",
                str(certs / "tls.key"),
            ),
            stdout=subprocess.DEVNULL,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=subprocess_env(),
        )
    try:
        yield Webhook(proc, _wait_listening(proc, stderr), certs / "ca.crt", stderr)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(WAIT)
    assert proc.returncode == 0, stderr.read_text()[-2000:]


def _client_ssl(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


async def _post(webhook: Webhook, body: bytes) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http,
        http.post(
            f"https://127.0.0.1:{webhook.port}/mutate",
            data=io.BytesIO(body),
            headers={"content-type": "application/json"},
            ssl=_client_ssl(webhook.ca),
            server_hostname=HOSTNAME,
        ) as r,
    ):
        return r.status, await r.read()


async def test_answers_a_real_admission_review_over_tls(webhook: Webhook) -> None:
    pod = _pod(dict(INJECT))
    pod["spec"]["containers"][0]["env"].append({"name": "SECRETISH", "value": CANARY})
    status, body = await _post(webhook, json.dumps(_admission_review(pod)).encode())
    assert status == 200
    answer = json.loads(body)
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    mutated = _rfc6902(pod, json.loads(base64.b64decode(response["patch"])))
    assert mutated["spec"]["initContainers"][0]["image"] == IMAGE  # the --image default
    _validate(mutated)
    # One JSON line per review, with names only: no pod contents.
    await asyncio.sleep(0.05)
    records = [r for r in webhook.lines() if r.get("event") == "admission"]
    assert records
    assert records[-1]["namespace"] == "team-a"
    assert records[-1]["pod"] == "web-7d9c8f5b6-"
    assert records[-1]["outcome"] == "injected"
    assert CANARY not in webhook.stderr.read_text()


async def test_refused_annotation_is_allowed_with_a_warning(webhook: Webhook) -> None:
    pod = _pod({**INJECT, "ai-gateway-sidecar/image": "not an image"})
    status, body = await _post(webhook, json.dumps(_admission_review(pod)).encode())
    assert status == 200
    response = json.loads(body)["response"]
    assert response["allowed"] is True
    assert "patch" not in response
    assert "ai-gateway-sidecar/image" in response["warnings"][0]


async def test_non_pod_kinds_are_allowed_unchanged(webhook: Webhook) -> None:
    deployment = {"kind": "Deployment", "apiVersion": "apps/v1", "metadata": {"name": "web"}}
    review = _admission_review(deployment, kind="Deployment")
    status, body = await _post(webhook, json.dumps(review).encode())
    assert status == 200
    assert json.loads(body)["response"] == {"uid": review["request"]["uid"], "allowed": True}


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}', 400),
        (b"[" + b" " * (2 * 1024 * 1024) + b"]", 413),
    ],
)
async def test_bad_and_oversize_bodies_are_refused(
    webhook: Webhook, body: bytes, status: int
) -> None:
    assert (await _post(webhook, body))[0] == status


async def test_healthz_and_an_untrusted_ca(webhook: Webhook, tmp_path: Path) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http:
        url = f"https://127.0.0.1:{webhook.port}/healthz"
        async with http.get(url, ssl=_client_ssl(webhook.ca), server_hostname=HOSTNAME) as r:
            assert r.status == 200
        other = make_certs(tmp_path / "other", SERVICE, NAMESPACE)
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await http.get(url, ssl=_client_ssl(other.ca), server_hostname=HOSTNAME)
        # The certificate is for the Service's names, not for any name.
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await http.get(url, ssl=_client_ssl(webhook.ca), server_hostname="other.example")


# --------------------------------------------------------------------------- certificate reload


async def _handshake(port: int, ca: Path) -> None:
    _, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=_client_ssl(ca), server_hostname=HOSTNAME),
        WAIT,
    )
    writer.close()
    await writer.wait_closed()


def _replace(src: Path, dst: Path) -> None:
    """Swap a file in place and move its mtime, as a renewed Secret's mount does."""
    tmp = dst.with_suffix(".new")
    tmp.write_bytes(src.read_bytes())
    os.replace(tmp, dst)
    stat = dst.stat()
    os.utime(dst, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


async def test_new_connections_get_a_renewed_certificate(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    first = make_certs(tmp_path / "first", SERVICE, NAMESPACE)
    second = make_certs(tmp_path / "second", SERVICE, NAMESPACE)
    served = tmp_path / "served"
    served.mkdir()
    cert, key = served / "tls.crt", served / "tls.key"
    _replace(first.cert, cert)
    _replace(first.key, key)
    certs = ServingCert(cert, key)
    assert certs.reload_if_changed() is None

    async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(ok, "127.0.0.1", 0, ssl=certs.listening)
    port = server.sockets[0].getsockname()[1]
    try:
        await _handshake(port, first.ca)
        # Half-renewed: the new certificate beside the old key does not load; the old pair stays.
        _replace(second.cert, cert)
        assert certs.reload_if_changed() is False
        await _handshake(port, first.ca)
        _replace(second.key, key)
        assert certs.reload_if_changed() is True
        await _handshake(port, second.ca)
        with pytest.raises(ssl.SSLCertVerificationError):
            await _handshake(port, first.ca)
    finally:
        server.close()
        await server.wait_closed()
