"""The gped wire protocol: versioned messages as msgpack header plus raw array frames.

Pure code -- no sockets, no torch -- so it is tested without a network.  The socket layer calls
:func:`encode` to get the frames of a message and :func:`decode` (or :func:`safe_decode`, which
counts and logs rejections instead of raising) on what it receives.  See ``messages`` for the
message types and ``codec`` for the format.
"""

from .codec import (
    MAX_ARRAYS,
    MAX_HEADER_BYTES,
    MAX_MESSAGE_BYTES,
    WIRE_DTYPES,
    RejectCounter,
    SeqStatus,
    SeqTracker,
    decode,
    encode,
    safe_decode,
    to_wire_array,
)
from .messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    REJECT_KINDS,
    ROLES,
    CheckpointDone,
    CheckpointRequest,
    Heartbeat,
    Hello,
    Message,
    Params,
    ProtocolError,
    Report,
    Start,
    Stop,
    Targets,
    Welcome,
    array,
    is_safe_name,
    message,
    scalar,
    spec_of,
)

__all__ = [
    "MAX_ARRAYS",
    "MAX_HEADER_BYTES",
    "MAX_MESSAGE_BYTES",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "REJECT_KINDS",
    "ROLES",
    "WIRE_DTYPES",
    "CheckpointDone",
    "CheckpointRequest",
    "Heartbeat",
    "Hello",
    "Message",
    "Params",
    "ProtocolError",
    "RejectCounter",
    "Report",
    "SeqStatus",
    "SeqTracker",
    "Start",
    "Stop",
    "Targets",
    "Welcome",
    "array",
    "decode",
    "encode",
    "is_safe_name",
    "message",
    "safe_decode",
    "scalar",
    "spec_of",
    "to_wire_array",
]
