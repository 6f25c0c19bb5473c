"""Ed25519 signatures on commands (coordinator) and replies (devices).

A signature covers the canonical JSON of the message, every field but ``sig``
(sorted keys, no whitespace). Models, artifacts and updates travel as blobs
named by their sha256 inside a signed command or reply, and every blob is
checked against its sha256 on arrival, so signing the messages covers the bytes
they point to. The ``cryptography`` library does the maths; it is imported only
when a key is configured, so an agent without signing stays small.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ErrorCode, ProtocolError

if TYPE_CHECKING:  # cryptography is imported only in a secure fleet
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


def canonical(msg: Any) -> bytes:
    body = {"type": msg.TYPE, **{k: v for k, v in dataclasses.asdict(msg).items() if k != "sig"}}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def sign(msg: Any, private_key: "Ed25519PrivateKey") -> Any:
    """A copy of ``msg`` with ``sig`` set."""
    sig = base64.b64encode(private_key.sign(canonical(msg))).decode("ascii")
    return dataclasses.replace(msg, sig=sig)


def verify(msg: Any, public_key: "Ed25519PublicKey", what: str = "message") -> None:
    from cryptography.exceptions import InvalidSignature

    if not msg.sig:
        raise ProtocolError(ErrorCode.BAD_SIGNATURE, f"{what} is not signed")
    try:
        public_key.verify(base64.b64decode(msg.sig, validate=True), canonical(msg))
    except (InvalidSignature, ValueError):
        raise ProtocolError(ErrorCode.BAD_SIGNATURE, f"{what}: signature does not verify") from None


def new_key() -> "Ed25519PrivateKey":
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def private_pem(key: "Ed25519PrivateKey") -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def public_pem(key: "Ed25519PrivateKey") -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def load_private(path: str | Path) -> "Ed25519PrivateKey":
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_pem_private_key(Path(path).read_bytes(), None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def load_public(path: str | Path) -> "Ed25519PublicKey":
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key
