"""Protocol constants. Units are part of every name that has one."""

PROTOCOL_VERSION = "1.5"
"""major.minor. Peers refuse a different major; minors only add optional keys and messages
(1.1: ``blob_want``, ``blob_get`` with ``chunks``; 1.2: chunk frames in little-endian like the
tensor codec, ``EPF2``, written only to peers that speak 1.2 and read from all; 1.3: ``train_round``
with ``model_digest``, ``delta`` and ``delta_base``, the sparse downlink; chunks a device asks for
with ``blob_want`` come on its own ``down`` topic, not to the whole fleet; 1.4: seeded values,
``uniform`` and ``const``, in a model bundle: a fresh run's first model, drawn by the device; 1.5:
``train_round`` with ``delta_chain``, the deltas a device that missed rounds applies before ``delta``)."""

SEEDED_MODELS_SINCE = (1, 4)
"""The protocol version from which a device draws a seeded model (``codec.encode_seeded``)."""

DELTA_CHAINS_SINCE = (1, 5)
"""The protocol version from which a device catches up on missed rounds by a chain of deltas."""

MAX_DELTA_CHAIN = 1000
"""Most deltas one ``train_round`` asks a device to apply before its own (``delta_chain``)."""

WANT_DOWN_SINCE = (1, 3)
"""The protocol version from which a device takes re-sent chunks on its own ``down`` topic."""

BROADCAST_PATIENCE_S = 10.0
"""A device already receiving a broadcast's retained chunks (the broker replays them, only slowly: a
thousand devices fetching at once) waits this long without progress before asking for the rest."""

FRAMES_LITTLE_ENDIAN_SINCE = (1, 2)
"""The protocol version from which a peer reads ``EPF2`` chunk frames."""

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

MAX_WANTED_CHUNKS = 4096
"""Most chunk indices one ``blob_want`` or ``blob_get`` may list (4096 x 256 KiB = 1 GiB)."""

BROADCAST_WAIT_S = 2.0
"""How long a device waits for a broadcast blob's retained chunks before it asks for the missing
ones as ordinary messages (brokers that replay no retained messages to wildcards: RabbitMQ)."""

CHUNK_IDLE_S = 10.0
"""A pull with no new chunk for this long asks again for the chunks still missing."""

RESEND_MIN_S = 1.0
"""The coordinator re-sends one broadcast chunk at most this often, however many devices ask."""

UPLOAD_WINDOW_CHUNKS = 4
"""Chunks a sender keeps unacknowledged by the broker at once (paced, not all queued at once)."""

PUBLISH_TIMEOUT_S = 60.0
"""Longest wait for the broker to acknowledge one chunk before the transfer fails."""
