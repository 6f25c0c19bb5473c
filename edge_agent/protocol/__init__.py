"""The wire protocol shared by agent and coordinator.

It lives on the device side because the agent must never import the
coordinator. Layout:

- ``constants``: versions, QoS, limits (with units in their names).
- ``errors``: the error-code enum and :class:`ProtocolError`.
- ``topics``: topic builders and the one parser/validator.
- ``messages``: frozen dataclasses for every control message.
- ``args``: frozen dataclasses for every command's arguments.
- ``serde``: the only place messages and chunk frames become bytes.
- ``codec``: the documented binary format for (sparse) tensor bundles.
"""

from .constants import PROTOCOL_VERSION
from .errors import ErrorCode, ProtocolError

__all__ = ["PROTOCOL_VERSION", "ErrorCode", "ProtocolError"]
