"""Protocol constants. Units are part of every name that has one."""

PROTOCOL_VERSION = "1.0"
"""major.minor. Peers refuse a different major; minors only add optional keys."""

TOPIC_ROOT = "edgeprune"
TOPIC_VERSION = "v1"

QOS_CONTROL = 1
"""Commands, replies, status and chunks all use QoS 1 (at least once).

QoS 2 would cost two more packets per message and is not honoured end to end
by every broker; duplicates are handled by request ids and chunk indices."""

MAX_CONTROL_BYTES = 1 << 20
"""Largest JSON control message a peer accepts (1 MiB). Bulk data goes in chunks."""

DEFAULT_CHUNK_BYTES = 256 * 1024
"""Payload bytes per chunk frame: well under EMQX's 1 MB default message limit."""

MAX_CHUNK_BYTES = 8 << 20
"""Largest chunk a peer accepts (8 MiB); a frame above it is refused."""

MAX_BLOB_BYTES = 1 << 30
"""Largest blob (model, artifact, update) a peer will assemble (1 GiB)."""

DEFAULT_HEARTBEAT_S = 10.0
DEFAULT_KEEPALIVE_S = 15
DEFAULT_STALE_AFTER_BEATS = 3
"""A device whose heartbeat is this many intervals late is shown as stale."""

IMPORTANCE_METHODS = ("activation", "l1", "l2", "taylor")
"""How a device may rank its units for structured pruning (see edge_agent.worker.Run.importance)."""
