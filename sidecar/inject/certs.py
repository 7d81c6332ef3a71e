"""`sidecar inject --make-certs`: a self-signed CA and the webhook's serving certificate.

The bootstrap for clusters without cert-manager. The CA's private key is used
once and never written: to renew, run the command again and paste the new
caBundle. Needs the `cryptography` package.
"""

from __future__ import annotations

import base64
import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from sidecar.errors import UserError

CA_FILE: Final = "ca.crt"
CERT_FILE: Final = "tls.crt"
KEY_FILE: Final = "tls.key"


@dataclass(frozen=True, slots=True)
class MadeCerts:
    ca: Path
    cert: Path
    key: Path
    dns_names: tuple[str, ...]
    #: base64 of the CA certificate (PEM): the webhook configuration's `caBundle`.
    ca_bundle: str
    not_after: datetime.datetime


def service_dns_names(service: str, namespace: str) -> tuple[str, ...]:
    """The names the API server may use for `service` in `namespace`."""
    return (
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    )


def make_certs(
    directory: Path,
    service: str,
    namespace: str,
    *,
    days: int = 365,
    now: datetime.datetime | None = None,
) -> MadeCerts:
    """Write `ca.crt`, `tls.crt` and `tls.key` (0600) into `directory`; refuse to overwrite."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise UserError("--make-certs needs the `cryptography` package: "
                        "pip install cryptography") from None  # fmt: skip
    paths = [directory / CA_FILE, directory / CERT_FILE, directory / KEY_FILE]
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise UserError(f"refusing to overwrite {', '.join(existing)}")
    directory.mkdir(parents=True, exist_ok=True)

    start = (now or datetime.datetime.now(datetime.UTC)) - datetime.timedelta(minutes=5)
    end = start + datetime.timedelta(days=days)
    dns_names = service_dns_names(service, namespace)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{service} webhook CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[2])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(paths[0], ca_pem, 0o644)
    _write(paths[1], cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(paths[2], key_pem, 0o600)
    return MadeCerts(paths[0], paths[1], paths[2], dns_names,
                     base64.b64encode(ca_pem).decode("ascii"), end)  # fmt: skip


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
