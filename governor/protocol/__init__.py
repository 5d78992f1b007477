"""The daemon's wire format: length-prefixed JSON messages over a Unix socket.

Data flow, and the module that does each part::

    client                                         daemon (governor serve)
    ------                                         -----------------------
    Submit(id=1, step=...).to_wire() -> dict       (messages)
    send_message(sock, dict)  ──── frame ────>     read_message(reader) -> dict      (framing)
                                                   parse_request(dict) -> Submit | Batch | ...
                                                   ... journal, supervisor ...
                                                   ok_reply(id, ...) / error_reply(id, error)
    recv_message(sock) -> dict  <─── frame ─────   write_message(writer, reply)
    unwrap_reply(reply): the reply, or raises the error rebuilt by error_from_wire (codec)

``values`` says what a JSON value is and how large a message may be, ``decoders`` how each
request field is checked, ``errors`` the protocol's own errors.
"""

from governor.protocol.codec import error_from_wire, error_to_wire, with_task_id
from governor.protocol.decoders import (MAX_PARAMS_DEPTH, MAX_PATH_CHARS, MAX_REQUEST_ID_CHARS, MAX_TASK_ID,
                                        WIRE_LIMITS, RequestId)
from governor.protocol.errors import ErrorCode, ProtocolError, RemoteError, ResultNotSerialisable
from governor.protocol.framing import FrameDecoder, encode, read_message, recv_message, send_message, write_message
from governor.protocol.messages import (DEFAULT_STATUS_LIMIT, MAX_BATCH_CALLS, MAX_CANCEL_IDS, MAX_KEY_CHARS,
                                        MAX_PRIORITY, MAX_STATE_CHARS, MAX_STATUS_LIMIT, MAX_STEP_NAME_CHARS,
                                        MAX_WORKFLOW_CALLS,
                                        PROTOCOL_VERSION, REQUEST_TYPES, Batch, Cancel, Live, Metrics, Page, Ping,
                                        Request, Status, StepCall, Steps, Submit, Wait, Workers, WorkflowRequest,
                                        error_reply,
                                        ok_reply, parse_request, request_id_of, unwrap_reply)
from governor.protocol.values import MAX_MESSAGE_BYTES, MAX_REPLY_BYTES, MAX_RESULT_DEPTH, to_json_value

__all__ = [
    "Batch", "Cancel", "DEFAULT_STATUS_LIMIT", "ErrorCode", "FrameDecoder", "Live", "MAX_BATCH_CALLS",
    "MAX_CANCEL_IDS", "MAX_KEY_CHARS", "MAX_MESSAGE_BYTES", "MAX_REPLY_BYTES", "MAX_PARAMS_DEPTH", "MAX_PATH_CHARS",
    "MAX_REQUEST_ID_CHARS", "MAX_RESULT_DEPTH", "MAX_PRIORITY", "MAX_STATE_CHARS", "MAX_STATUS_LIMIT",
    "MAX_STEP_NAME_CHARS",
    "MAX_TASK_ID", "MAX_WORKFLOW_CALLS", "Metrics", "PROTOCOL_VERSION", "Page", "Ping", "ProtocolError", "REQUEST_TYPES",
    "RemoteError", "Request", "RequestId", "ResultNotSerialisable", "Status", "StepCall", "Steps", "Submit",
    "WIRE_LIMITS", "Wait", "Workers", "WorkflowRequest", "encode", "error_from_wire", "error_reply",
    "error_to_wire", "ok_reply", "parse_request", "read_message", "recv_message", "request_id_of", "send_message",
    "to_json_value", "unwrap_reply", "with_task_id", "write_message",
]
