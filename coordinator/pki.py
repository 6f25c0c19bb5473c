"""A small certificate authority for one fleet (the ``cryptography`` library does the crypto).

``edgeprune pki init`` makes, in ``<home>/pki``: the CA, the broker's server
certificate (names and addresses the devices use to reach it) and the
coordinator's client certificate. ``edgeprune pki issue DEVICE_ID`` makes a
device's client certificate. Mosquitto runs with ``use_identity_as_username``,
so a certificate's common name *is* the MQTT user name the ACL is written for:
a device certificate's CN is its device id; the coordinator's is
:data:`COORDINATOR_CN`. Keys are ECDSA P-256 (every TLS stack has it), written 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from edge_agent.protocol.errors import EdgepruneError
from edge_agent.protocol.topics import ID_RE
from edge_agent.service import write_private

COORDINATOR_CN = "edgeprune-coordinator"
BROKER_CN = "edgeprune-broker"
CA_DAYS = 3650
LEAF_DAYS = 825  # the longest leaf lifetime common TLS clients accept


class PkiError(EdgepruneError, RuntimeError):
    """Certificates or keys that cannot be made or read; the message says which and what to do."""

    code = "pki"


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path
    ca: Path

    @property
    def sign_key(self) -> Path:
        return self.cert.with_suffix(".sign.key")

    @property
    def coordinator_pub(self) -> Path:
        return self.ca.parent / f"{COORDINATOR_CN}.sign.pub"

    def as_settings(self) -> dict[str, str]:
        return {
            "tls_ca": str(self.ca),
            "tls_cert": str(self.cert),
            "tls_key": str(self.key),
            "sign_key": str(self.sign_key),
            "coordinator_key": str(self.coordinator_pub),
        }


def pki_dir(home: Path) -> Path:
    return Path(home) / "pki"


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load(directory: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
        ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    except FileNotFoundError:
        raise PkiError(f"no CA in {directory}: run `edgeprune pki init` first") from None
    return ca_cert, ca_key


def _sign(ca_cert, ca_key, cn: str, *, days: int, server_names: list[str] = (), client: bool = True):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False,
        )
    )
    if server_names:
        sans = []
        for name in server_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert, key


def _pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def init(home: Path, broker_names: list[str] = (), force: bool = False) -> dict:
    """Create the CA, the broker and the coordinator certificates."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    d = pki_dir(home)
    if (d / "ca.crt").exists() and not force:
        raise PkiError(f"a CA already exists in {d}; --force replaces it (every issued certificate stops working)")
    ca_key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"edgeprune fleet CA ({socket.gethostname()})")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
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
        .sign(ca_key, hashes.SHA256())
    )
    write_private(d / "ca.key", _key_pem(ca_key))
    (d / "ca.crt").write_bytes(_pem(ca_cert))
    names = list(dict.fromkeys(["localhost", "127.0.0.1", "::1", socket.gethostname(), *broker_names]))
    cert, key = _sign(ca_cert, ca_key, BROKER_CN, days=LEAF_DAYS, server_names=names, client=False)
    (d / "broker.crt").write_bytes(_pem(cert))
    write_private(d / "broker.key", _key_pem(key))
    issue(home, COORDINATOR_CN)
    return {"dir": str(d), "ca": str(d / "ca.crt"), "broker_names": names}


def _signing_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """An Ed25519 key pair for signing messages (separate from the TLS key: different job, different lifetime)."""
    from edge_agent.protocol import signing

    key_path, pub_path = directory / f"{name}.sign.key", directory / f"{name}.sign.pub"
    key = signing.new_key()
    write_private(key_path, signing.private_pem(key))
    pub_path.write_bytes(signing.public_pem(key))
    return key_path, pub_path


def signing_keys(home: Path):
    """(coordinator private key, device id -> public key or None) for a secure session."""
    from edge_agent.protocol import signing

    d = pki_dir(home)
    path = d / f"{COORDINATOR_CN}.sign.key"
    if not path.exists():
        return None, None
    cache: dict[str, object] = {}

    def device_key(device_id: str):
        if device_id not in cache:
            pub = d / "devices" / f"{device_id}.sign.pub"
            cache[device_id] = signing.load_public(pub) if ID_RE.match(device_id) and pub.exists() else None
        return cache[device_id]

    return signing.load_private(path), device_key


def issue(home: Path, name: str, days: int = LEAF_DAYS) -> Identity:
    """A client certificate whose CN is ``name`` (a device id, or the coordinator)."""
    if name != COORDINATOR_CN:
        check_device_name(name)
    d = pki_dir(home)
    ca_cert, ca_key = _load(d)
    cert, key = _sign(ca_cert, ca_key, name, days=days)
    sub = d if name == COORDINATOR_CN else d / "devices"
    ident = Identity(sub / f"{name}.crt", sub / f"{name}.key", d / "ca.crt")
    write_private(ident.key, _key_pem(key))
    ident.cert.write_bytes(_pem(cert))
    _signing_pair(sub, name)
    return ident


def check_device_name(name: str) -> None:
    """A device id is a topic level and a file name: never a path, never a reserved identity."""
    if not isinstance(name, str) or not ID_RE.match(name):
        raise PkiError(f"device id {name!r} must be 1-64 characters from [A-Za-z0-9_-]")
    if name in (COORDINATOR_CN, BROKER_CN):
        raise PkiError(f"{name!r} is reserved for the {'coordinator' if name == COORDINATOR_CN else 'broker'}")


def session_security(home: Path, broker_url: str) -> dict:
    """Session keyword arguments for a TLS broker: this home's coordinator certificate (from `edgeprune pki
    init`) and, with it, signed commands and verified replies; nothing for a plain broker or a home
    without a PKI."""
    if not broker_url.startswith(("mqtts://", "ssl://")):
        return {}
    ident = identity(home)
    if ident is None:
        return {}
    sign_key, device_keys = signing_keys(home)
    return {
        "tls_files": (str(ident.ca), str(ident.cert), str(ident.key)),
        "sign_key": sign_key,
        "device_keys": device_keys,
    }


def identity(home: Path, name: str = COORDINATOR_CN, *, device: bool = False) -> Identity | None:
    """The coordinator's identity, or with ``device=True`` a device's (the name is checked first)."""
    d = pki_dir(home)
    if device:
        check_device_name(name)
    sub = d / "devices" if device else d
    ident = Identity(sub / f"{name}.crt", sub / f"{name}.key", d / "ca.crt")
    return ident if ident.cert.exists() and ident.key.exists() and ident.ca.exists() else None


def mosquitto_acl() -> str:
    """Who may read and write what. %u is the certificate CN (use_identity_as_username).

    A device writes only its own status/caps/reply/data/want, reads only its own
    commands, the coordinator's status and broadcast blobs. Only the coordinator
    identity writes commands, blobs and the coordinator status.
    """
    return "\n".join(
        [
            f"user {COORDINATOR_CN}",
            "topic readwrite edgeprune/#",
            "",
            "pattern write edgeprune/v1/+/device/%u/status",
            "pattern write edgeprune/v1/+/device/%u/caps",
            "pattern write edgeprune/v1/+/device/%u/reply",
            "pattern write edgeprune/v1/+/device/%u/data",
            "pattern write edgeprune/v1/+/device/%u/want",
            "pattern read edgeprune/v1/+/device/%u/cmd",
            "pattern read edgeprune/v1/+/device/%u/down",
            "pattern read edgeprune/v1/+/coordinator/status",
            "pattern read edgeprune/v1/+/blob/#",
            "",
        ]
    )
