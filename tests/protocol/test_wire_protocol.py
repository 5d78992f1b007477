"""The wire protocol: framing, requests, replies, the error codec and JSON values. No processes."""

import asyncio
import json
import math
import pickle
import socket
import struct
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from governor import protocol
from governor.errors import (GovernorError, InvalidParameters, MemoryLimitExceeded, QueueFull, RegistrationError,
                             StepCancelled, StepFailed, StepSkipped, StepTimeout, SupervisorClosed, UnknownStep,
                             WorkerCrashed, WorkerStartFailed, WorkflowFailed)
from governor.limits import Limits
from governor.protocol import ErrorCode, FrameDecoder, ProtocolError


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 63) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=5)


# ----------------------------------------------------------------------------- framing

def test_encode_is_a_big_endian_length_then_compact_json():
    assert protocol.encode({"v": 1, "ok": True}) == b'\x00\x00\x00\x11{"v":1,"ok":true}'


@given(st.lists(json_objects, max_size=5), st.integers(1, 64))
def test_frames_round_trip_in_any_chunking(messages, chunk):
    stream = b"".join(protocol.encode(message) for message in messages)
    decoder = FrameDecoder()
    decoded = []
    for start in range(0, len(stream), chunk):
        decoded.extend(decoder.feed(stream[start:start + chunk]))
    assert decoded == messages
    assert decoder.buffered == 0
    decoder.eof()  # at a frame boundary: nothing to complain about


def test_decoder_fed_byte_by_byte_yields_each_message_once_complete():
    stream = protocol.encode({"a": "é"}) + protocol.encode({"b": [1, 2]})
    decoder = FrameDecoder()
    yielded = [(index, decoder.feed(stream[index:index + 1])) for index in range(len(stream))]
    completed = [(index, items) for index, items in yielded if items]
    first_end = len(protocol.encode({"a": "é"})) - 1
    assert completed == [(first_end, [{"a": "é"}]), (len(stream) - 1, [{"b": [1, 2]}])]


def test_oversized_declared_length_breaks_the_stream_without_reading_the_body():
    decoder = FrameDecoder(max_bytes=10)
    items = decoder.feed(protocol.encode({"a": 1}) + struct.pack(">I", 11) + b"x" * 11)
    assert items[0] == {"a": 1}
    assert isinstance(items[1], ProtocolError) and items[1].code is ErrorCode.TOO_LARGE
    assert "cannot be resynchronised" in str(items[1])
    assert decoder.broken
    with pytest.raises(ProtocolError) as raised:
        decoder.feed(protocol.encode({}))
    assert raised.value.code is ErrorCode.TOO_LARGE


def test_a_frame_at_the_cap_is_accepted():
    message = {"s": "x" * 10}
    size = len(protocol.encode(message)) - 4
    assert FrameDecoder(max_bytes=size).feed(protocol.encode(message, max_bytes=size)) == [message]


@pytest.mark.parametrize("body, says", [
    (b"\xff\xfe{}", "UTF-8"),
    (b'{"a": ', "JSON"),
    (b"", "JSON"),
    (b"[1, 2]", "not array"),
    (b'"text"', "not string"),
    (b"null", "not null"),
    (b'{"a": NaN}', "NaN"),
    (b'{"a": -Infinity}', "Infinity"),
    (b"[" * 100_000 + b"]" * 100_000, "JSON"),  # RecursionError in the decoder
    (b'\xef\xbb\xbf{"a": 1}', "JSON"),  # a BOM is not JSON
])
def test_a_bad_body_is_reported_and_the_stream_stays_in_sync(body, says):
    decoder = FrameDecoder(max_bytes=1 << 20)
    items = decoder.feed(frame(body) + protocol.encode({"next": True}))
    assert len(items) == 2
    assert isinstance(items[0], ProtocolError) and items[0].code is ErrorCode.BAD_JSON
    assert says in str(items[0])
    assert items[1] == {"next": True}
    assert not decoder.broken


def test_eof_mid_frame_is_truncated():
    decoder = FrameDecoder()
    assert decoder.feed(protocol.encode({"a": 1})[:-1]) == []
    with pytest.raises(ProtocolError) as raised:
        decoder.eof()
    assert raised.value.code is ErrorCode.TRUNCATED


@settings(max_examples=300)
@given(st.binary(max_size=400), st.integers(1, 40), st.integers(1, 200))
def test_random_bytes_only_ever_give_messages_or_protocol_errors(data, chunk, max_bytes):
    decoder = FrameDecoder(max_bytes=max_bytes)
    for start in range(0, len(data), chunk):
        if decoder.broken:
            with pytest.raises(ProtocolError):
                decoder.feed(data[start:start + chunk])
            return
        for item in decoder.feed(data[start:start + chunk]):
            assert isinstance(item, (dict, ProtocolError))
    try:
        decoder.eof()
    except ProtocolError as error:
        assert error.code is ErrorCode.TRUNCATED


@pytest.mark.parametrize("message, code", [
    ({"x": math.nan}, ErrorCode.BAD_JSON),
    ({"x": math.inf}, ErrorCode.BAD_JSON),
    ({"x": {1, 2}}, ErrorCode.BAD_JSON),
    ([1, 2], ErrorCode.BAD_JSON),
    ({"x": "y" * 100}, ErrorCode.TOO_LARGE),
])
def test_encode_refuses_what_cannot_be_sent(message, code):
    with pytest.raises(ProtocolError) as raised:
        protocol.encode(message, max_bytes=50)
    assert raised.value.code is code


def test_encode_keeps_any_python_string():
    message = {"path": "caf\udcc3"}  # a surrogate escape, as os.fsdecode gives for bad bytes
    assert FrameDecoder().feed(protocol.encode(message)) == [message]


@pytest.mark.parametrize("max_bytes", [0, -1, 2 ** 32, True, 1.5])
def test_max_bytes_must_fit_the_header(max_bytes):
    with pytest.raises(ValueError):
        FrameDecoder(max_bytes=max_bytes)


# ----------------------------------------------------------------------------- blocking and asyncio helpers

@pytest.fixture
def sockets():
    left, right = socket.socketpair()
    with left, right:
        left.settimeout(10)
        right.settimeout(10)
        yield left, right


def test_send_and_recv_over_a_socket(sockets):
    left, right = sockets
    messages = [{"v": 1, "text": "x" * 500_000}, {"v": 1, "n": 2}]

    def sender():  # the big frame outgrows the socket's buffer: it arrives in many reads
        for message in messages:
            protocol.send_message(left, message)
        left.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=sender)
    thread.start()
    try:
        assert [protocol.recv_message(right) for _ in messages] == messages
        with pytest.raises(EOFError):
            protocol.recv_message(right)
    finally:
        thread.join()


@pytest.mark.parametrize("sent", [b"\x00\x00", frame(b'{"a": 1}')[:-2]], ids=["in the header", "in the body"])
def test_recv_of_a_truncated_frame(sockets, sent):
    left, right = sockets
    left.sendall(sent)
    left.shutdown(socket.SHUT_WR)
    with pytest.raises(ProtocolError) as raised:
        protocol.recv_message(right)
    assert raised.value.code is ErrorCode.TRUNCATED


def test_recv_refuses_an_oversized_frame_and_a_bad_body(sockets):
    left, right = sockets
    left.sendall(frame(b"[]"))
    with pytest.raises(ProtocolError) as raised:
        protocol.recv_message(right)
    assert raised.value.code is ErrorCode.BAD_JSON
    left.sendall(struct.pack(">I", 101))
    with pytest.raises(ProtocolError) as raised:
        protocol.recv_message(right, max_bytes=100)
    assert raised.value.code is ErrorCode.TOO_LARGE


def read_all(data: bytes, max_bytes: int = protocol.MAX_MESSAGE_BYTES):
    """Everything ``read_message`` makes of a stream holding ``data`` then EOF."""
    async def main():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        outcomes = []
        while True:
            try:
                outcomes.append(await protocol.read_message(reader, max_bytes))
            except (EOFError, ProtocolError) as error:
                outcomes.append(error)
                if not (isinstance(error, ProtocolError) and error.code is ErrorCode.BAD_JSON):
                    return outcomes
    return asyncio.run(main())


def test_read_message_reads_frames_until_a_clean_eof():
    outcomes = read_all(protocol.encode({"a": 1}) + frame(b"nope") + protocol.encode({"b": 2}))
    assert outcomes[0] == {"a": 1}
    assert outcomes[1].code is ErrorCode.BAD_JSON
    assert outcomes[2] == {"b": 2}
    assert isinstance(outcomes[3], EOFError)


@pytest.mark.parametrize("data, code", [
    (b"\x00", ErrorCode.TRUNCATED),
    (frame(b"{}")[:-1], ErrorCode.TRUNCATED),
    (struct.pack(">I", 2 ** 32 - 1), ErrorCode.TOO_LARGE),
])
def test_read_message_errors(data, code):
    (outcome,) = read_all(data)
    assert isinstance(outcome, ProtocolError) and outcome.code is code


def test_write_message_then_read_message_across_a_socket(sockets):
    left, right = sockets

    async def main():
        _, writer = await asyncio.open_connection(sock=left)
        await protocol.write_message(writer, {"v": 1, "ok": True})
        writer.close()
        await writer.wait_closed()

    asyncio.run(main())
    assert protocol.recv_message(right) == {"v": 1, "ok": True}


# ----------------------------------------------------------------------------- requests

GOOD_REQUESTS = [
    ({"op": "ping"}, protocol.Ping(id=7)),
    ({"op": "submit", "step": "git.status"}, protocol.Submit(id=7, step="git.status")),
    ({"op": "submit", "step": "s", "params": {"a": [1, {"b": None}]}, "wait": True, "key": "view",
      "limits": {"timeout_s": 2.5, "max_memory_mb": 100}},
     protocol.Submit(id=7, step="s", params={"a": [1, {"b": None}]}, wait=True, key="view",
                     limits=Limits(timeout_s=2.5, max_memory_mb=100))),
    ({"op": "submit", "step": "s", "key": None, "limits": {"timeout_s": None}},
     protocol.Submit(id=7, step="s", limits=Limits())),
    ({"op": "batch", "calls": [{"step": "a"}, {"step": "b", "params": {"x": 1}}]},
     protocol.Batch(id=7, calls=(protocol.StepCall("a"), protocol.StepCall("b", {"x": 1})))),
    ({"op": "batch", "calls": [{"step": "a"}], "key": "view", "order": 2 ** 53},
     protocol.Batch(id=7, calls=(protocol.StepCall("a"),), key="view", order=2 ** 53)),
    ({"op": "workflow", "calls": [{"step": "a", "params": {}}], "wait": True},
     protocol.WorkflowRequest(id=7, calls=(protocol.StepCall("a"),), wait=True)),
    ({"op": "cancel", "task_ids": [1, 2, protocol.MAX_TASK_ID]}, protocol.Cancel(id=7, task_ids=(1, 2, 2 ** 63 - 1))),
    ({"op": "status"}, protocol.Status(id=7)),
    ({"op": "status", "task_id": 3}, protocol.Status(id=7, task_id=3)),
    ({"op": "wait", "task_id": 3}, protocol.Wait(id=7, task_id=3)),
    ({"op": "wait", "task_id": 3, "timeout": 0}, protocol.Wait(id=7, task_id=3, timeout=0)),
    ({"op": "steps"}, protocol.Steps(id=7)),
    ({"op": "workers"}, protocol.Workers(id=7)),
    ({"op": "metrics"}, protocol.Metrics(id=7)),
    ({"op": "metrics", "format": "prometheus"}, protocol.Metrics(id=7, format="prometheus")),
    ({"op": "live"}, protocol.Live(id=7)),
    ({"op": "page"}, protocol.Page(id=7)),
    ({"op": "batch", "calls": [{"step": "a", "limits": {"timeout_s": 2.5}}, {"step": "b", "limits": None}]},
     protocol.Batch(id=7, calls=(protocol.StepCall("a", limits=Limits(timeout_s=2.5)), protocol.StepCall("b")))),
]


@pytest.mark.parametrize("fields, expected", GOOD_REQUESTS, ids=[fields["op"] for fields, _ in GOOD_REQUESTS])
def test_good_requests_parse_and_round_trip(fields, expected):
    request = protocol.parse_request({"v": 1, "id": 7, **fields})
    assert request == expected
    assert request.OP == fields["op"]
    wire = request.to_wire()
    assert protocol.parse_request(json.loads(json.dumps(wire))) == request
    assert protocol.FrameDecoder().feed(protocol.encode(wire)) == [wire]


def test_every_op_has_a_good_example():
    assert {fields["op"] for fields, _ in GOOD_REQUESTS} == set(protocol.REQUEST_TYPES)


@pytest.mark.parametrize("request_id", [0, -5, 2 ** 63 - 1, "", "x" * 64, "a-uuid-4f3c"])
def test_request_ids(request_id):
    assert protocol.parse_request({"v": 1, "id": request_id, "op": "ping"}).id == request_id


BAD_REQUESTS = [
    # (request, code, field, words in the message)
    ({"id": 1, "op": "ping"}, ErrorCode.BAD_VERSION, "v", "version"),
    ({"v": 2, "id": 1, "op": "ping"}, ErrorCode.BAD_VERSION, "v", "version 2"),
    ({"v": True, "id": 1, "op": "ping"}, ErrorCode.BAD_VERSION, "v", "True"),
    ({"v": 1, "op": "ping"}, ErrorCode.BAD_REQUEST, "id", "missing"),
    ({"v": 1, "id": True, "op": "ping"}, ErrorCode.BAD_REQUEST, "id", "boolean"),
    ({"v": 1, "id": 1.0, "op": "ping"}, ErrorCode.BAD_REQUEST, "id", "number"),
    ({"v": 1, "id": "x" * 65, "op": "ping"}, ErrorCode.BAD_REQUEST, "id", "64"),
    ({"v": 1, "id": 2 ** 63, "op": "ping"}, ErrorCode.BAD_REQUEST, "id", "64-bit"),
    ({"v": 1, "id": None, "op": "ping"}, ErrorCode.BAD_REQUEST, "id", "null"),
    ({"v": 1, "id": 1}, ErrorCode.BAD_REQUEST, "op", "one of"),
    ({"v": 1, "id": 1, "op": "launch"}, ErrorCode.BAD_REQUEST, "op", "'launch'"),
    ({"v": 1, "id": 1, "op": ["ping"]}, ErrorCode.BAD_REQUEST, "op", "array"),
    ({"v": 1, "id": 1, "op": "ping", "extra": 1}, ErrorCode.BAD_REQUEST, "extra", "unknown field"),
    ({"v": 1, "id": 1, "op": "submit"}, ErrorCode.BAD_REQUEST, "step", "missing"),
    ({"v": 1, "id": 1, "op": "submit", "step": ""}, ErrorCode.BAD_REQUEST, "step", "1 to 200"),
    ({"v": 1, "id": 1, "op": "submit", "step": "s" * 201}, ErrorCode.BAD_REQUEST, "step", "1 to 200"),
    ({"v": 1, "id": 1, "op": "submit", "step": 5}, ErrorCode.BAD_REQUEST, "step", "number"),
    ({"v": 1, "id": 1, "op": "submit", "step": "\ud800"}, ErrorCode.BAD_REQUEST, "step", "Unicode"),
    ({"v": 1, "id": 1, "op": "submit", "step": "s", "params": []}, ErrorCode.BAD_REQUEST, "params", "object"),
    ({"v": 1, "id": 1, "op": "submit", "step": "s", "params": None}, ErrorCode.BAD_REQUEST, "params", "object"),
    ({"v": 1, "id": 1, "op": "submit", "step": "s", "wait": 1}, ErrorCode.BAD_REQUEST, "wait", "true or false"),
    ({"v": 1, "id": 1, "op": "submit", "step": "s", "key": 3}, ErrorCode.BAD_REQUEST, "key", "string"),
    ({"v": 1, "id": 1, "op": "submit", "step": "s", "key": "k" * 201}, ErrorCode.BAD_REQUEST, "key", "200"),
    ({"v": 1, "id": 1, "op": "submit", "step": "s", "order": -1}, ErrorCode.BAD_REQUEST, "order", "integer"),
    ({"v": 1, "id": 1, "op": "batch", "calls": [{"step": "s"}], "order": 2 ** 53 + 1}, ErrorCode.BAD_REQUEST,
     "order", "integer"),
    ({"v": 1, "id": 1, "op": "submit", "step": "s", "order": 1.5}, ErrorCode.BAD_REQUEST, "order", "integer"),
    ({"v": 1, "id": 1, "op": "submit", "step": "s", "limits": 5}, ErrorCode.BAD_REQUEST, "limits", "timeout_s"),
    ({"v": 1, "id": 1, "op": "submit", "step": "s", "limits": {"timeout_s": 0}},
     ErrorCode.BAD_REQUEST, "limits.timeout_s", "> 0"),
    ({"v": 1, "id": 1, "op": "submit", "step": "s", "limits": {"timeout_s": True}},
     ErrorCode.BAD_REQUEST, "limits.timeout_s", "boolean"),
    ({"v": 1, "id": 1, "op": "submit", "step": "s", "limits": {"max_memory_mb": "1G"}},
     ErrorCode.BAD_REQUEST, "limits.max_memory_mb", "string"),
    ({"v": 1, "id": 1, "op": "submit", "step": "s", "limits": {"cancel_grace_s": 1}},
     ErrorCode.BAD_REQUEST, "limits.cancel_grace_s", "unknown limit"),
    ({"v": 1, "id": 1, "op": "batch"}, ErrorCode.BAD_REQUEST, "calls", "missing"),
    ({"v": 1, "id": 1, "op": "batch", "calls": []}, ErrorCode.BAD_REQUEST, "calls", "1 to 10000"),
    ({"v": 1, "id": 1, "op": "batch", "calls": {"step": "a"}}, ErrorCode.BAD_REQUEST, "calls", "array"),
    ({"v": 1, "id": 1, "op": "batch", "calls": [{"step": "a"}, "b"]}, ErrorCode.BAD_REQUEST, "calls[1]", "object"),
    ({"v": 1, "id": 1, "op": "batch", "calls": [{"step": "a"}, {"step": 2}]},
     ErrorCode.BAD_REQUEST, "calls[1].step", "number"),
    ({"v": 1, "id": 1, "op": "batch", "calls": [{"step": "a", "args": []}]},
     ErrorCode.BAD_REQUEST, "calls[0].args", "unknown field"),
    ({"v": 1, "id": 1, "op": "batch", "calls": [{"params": {}}]}, ErrorCode.BAD_REQUEST, "calls[0].step", "missing"),
    ({"v": 1, "id": 1, "op": "batch", "calls": [{"step": "a"}] * (protocol.MAX_BATCH_CALLS + 1)},
     ErrorCode.BAD_REQUEST, "calls", "1 to 10000"),
    ({"v": 1, "id": 1, "op": "batch", "calls": [{"step": "a"}], "wait": "yes"},
     ErrorCode.BAD_REQUEST, "wait", "true or false"),
    ({"v": 1, "id": 1, "op": "workflow", "calls": [{"step": "a"}] * (protocol.MAX_WORKFLOW_CALLS + 1)},
     ErrorCode.BAD_REQUEST, "calls", "1 to 1000"),
    ({"v": 1, "id": 1, "op": "workflow", "calls": [{"step": "a", "params": {"x": [[[]]]}}, {"step": "b", "params": 1}]},
     ErrorCode.BAD_REQUEST, "calls[1].params", "object"),
    ({"v": 1, "id": 1, "op": "cancel", "task_ids": []}, ErrorCode.BAD_REQUEST, "task_ids", "1 to 10000"),
    ({"v": 1, "id": 1, "op": "cancel", "task_ids": [1, 0]}, ErrorCode.BAD_REQUEST, "task_ids[1]", "task id"),
    ({"v": 1, "id": 1, "op": "cancel", "task_ids": [True]}, ErrorCode.BAD_REQUEST, "task_ids[0]", "boolean"),
    ({"v": 1, "id": 1, "op": "cancel", "task_ids": [1.0]}, ErrorCode.BAD_REQUEST, "task_ids[0]", "number"),
    ({"v": 1, "id": 1, "op": "cancel", "task_ids": [2 ** 63]}, ErrorCode.BAD_REQUEST, "task_ids[0]", "task id"),
    ({"v": 1, "id": 1, "op": "status", "task_id": -1}, ErrorCode.BAD_REQUEST, "task_id", "task id"),
    ({"v": 1, "id": 1, "op": "status", "task_id": "3"}, ErrorCode.BAD_REQUEST, "task_id", "string"),
    ({"v": 1, "id": 1, "op": "wait"}, ErrorCode.BAD_REQUEST, "task_id", "missing"),
    ({"v": 1, "id": 1, "op": "wait", "task_id": None}, ErrorCode.BAD_REQUEST, "task_id", "null"),
    ({"v": 1, "id": 1, "op": "wait", "task_id": 1, "timeout": -1}, ErrorCode.BAD_REQUEST, "timeout", ">= 0"),
    ({"v": 1, "id": 1, "op": "wait", "task_id": 1, "timeout": False}, ErrorCode.BAD_REQUEST, "timeout", "boolean"),
    ({"v": 1, "id": 1, "op": "steps", "verbose": True}, ErrorCode.BAD_REQUEST, "verbose", "unknown field"),
    ({"v": 1, "id": 1, "op": "workers", "all": True}, ErrorCode.BAD_REQUEST, "all", "unknown field"),
    ({"v": 1, "id": 1, "op": "metrics", "format": "xml"}, ErrorCode.BAD_REQUEST, "format", "'prometheus'"),
]


@pytest.mark.parametrize("message, code, field, words", BAD_REQUESTS,
                         ids=[f"{index}-{field}" for index, (_, _, field, _) in enumerate(BAD_REQUESTS)])
def test_bad_requests_are_refused_naming_the_field(message, code, field, words):
    with pytest.raises(ProtocolError) as raised:
        protocol.parse_request(message)
    assert raised.value.code is code
    assert raised.value.field == field
    assert str(raised.value).startswith(f"{field}: ")
    assert words in str(raised.value)


def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def test_params_nest_at_most_32_levels():
    ok = {"v": 1, "id": 1, "op": "submit", "step": "s", "params": nested(protocol.MAX_PARAMS_DEPTH)}
    assert protocol.parse_request(ok).params == ok["params"]
    with pytest.raises(ProtocolError) as raised:
        protocol.parse_request({**ok, "params": nested(protocol.MAX_PARAMS_DEPTH + 1)})
    assert raised.value.field == "params" and "deeper than 32" in str(raised.value)


def test_requests_built_in_python_are_checked_the_same_way():
    with pytest.raises(ProtocolError, match=r"^step: "):
        protocol.Submit(id=1, step="")
    with pytest.raises(ProtocolError, match=r"^calls\[0\]\.params: "):
        protocol.Batch(id=1, calls=[{"step": "a", "params": {"x": {1, 2}}}])
    with pytest.raises(ProtocolError, match=r"^limits\.timeout_s: "):
        protocol.Submit(id=1, step="s", limits=Limits(timeout_s=math.inf))
    with pytest.raises(ProtocolError, match=r"^limits\.memory_hard_cap: unknown limit"):
        protocol.Submit(id=1, step="s", limits=Limits(max_memory_mb=10, memory_hard_cap=True))
    assert protocol.Batch(id=1, calls=[{"step": "a"}]).calls == (protocol.StepCall("a"),)


def test_parse_request_needs_an_object():
    with pytest.raises(ProtocolError):
        protocol.parse_request([1])


@pytest.mark.parametrize("message, expected", [
    ({"v": 1, "id": 5, "op": "nope"}, 5),
    ({"id": "abc"}, "abc"),
    ({"id": True}, None),
    ({"id": "x" * 65}, None),
    ({}, None),
    ([1], None),
])
def test_request_id_of_salvages_a_valid_id(message, expected):
    assert protocol.request_id_of(message) == expected


# ----------------------------------------------------------------------------- replies

def test_ok_reply_and_unwrap():
    reply = protocol.ok_reply(7, task_ids=[1, 2])
    assert reply == {"v": 1, "id": 7, "ok": True, "task_ids": [1, 2]}
    assert protocol.unwrap_reply(reply) is reply


def test_ok_reply_refuses_to_overwrite_the_envelope():
    with pytest.raises(ValueError, match="envelope"):
        protocol.ok_reply(1, ok=False)


def test_error_reply_and_unwrap_raise_the_rebuilt_error():
    reply = protocol.error_reply(None, QueueFull("pool", 10))
    assert reply == {"v": 1, "id": None, "ok": False,
                     "error": {"type": "QueueFull", "message": str(QueueFull("pool", 10)),
                               "fields": {"lane": "pool", "capacity": 10}}}
    with pytest.raises(QueueFull) as raised:
        protocol.unwrap_reply(json.loads(json.dumps(reply)))
    assert raised.value.capacity == 10


@pytest.mark.parametrize("reply", [{}, {"v": 2, "ok": True}, {"v": 1, "ok": 1}, [1]])
def test_unwrap_refuses_what_is_not_a_reply(reply):
    with pytest.raises(ProtocolError) as raised:
        protocol.unwrap_reply(reply)
    assert raised.value.code is ErrorCode.BAD_REPLY


# ----------------------------------------------------------------------------- error codec

ERRORS = [
    (StepFailed("s", 1, "ValueError", "bad value", "Traceback (most recent call last):\n...", ValueError("x")),
     ("step", "task_id", "exc_type", "exc_message", "remote_traceback")),
    (StepTimeout("s", 2, 1.5, 1.5123, 4321), ("step", "task_id", "limit_s", "elapsed_s", "pid")),
    (MemoryLimitExceeded("s", 3, 200, 250.5, 42), ("step", "task_id", "limit_mb", "peak_mb", "pid", "killed")),
    (MemoryLimitExceeded("s", 3, 200, None, 42, killed=False), ("peak_mb", "killed")),
    (StepCancelled("s", 4, "superseded", "by task 9", killed=True), ("step", "task_id", "reason", "detail", "killed")),
    (StepCancelled("s", 4, "explicit"), ("reason", "detail", "killed")),
    (WorkerCrashed("s", 5, 77, None, 11), ("step", "task_id", "pid", "exitcode", "signal")),
    (WorkerCrashed("s", 5, 77, 3, None), ("exitcode", "signal")),
    (StepSkipped("s", 6, "first"), ("step", "task_id", "failed_step")),
    (UnknownStep("ech", ["echo", "etch"]), ("name", "suggestions")),
    (QueueFull("critical", 1000), ("lane", "capacity")),
    (InvalidParameters("bad parameters for step 'echo'(x): missing x"), ()),
    (SupervisorClosed("the supervisor is not running"), ()),
    (WorkerStartFailed("no pool worker could be started"), ()),
    (RegistrationError("echo: not callable"), ()),
    (GovernorError("something"), ()),
    (protocol.ResultNotSerialisable("value cannot be sent as JSON: ..."), ()),
    (ProtocolError("too_large", "over the limit"), ("code", "reason", "field")),
    (ProtocolError(ErrorCode.BAD_REQUEST, "missing", "calls[2].step"), ("code", "reason", "field")),
    (protocol.RemoteError("KeyError", "'x'"), ("type_name", "message")),
]


def through_the_wire(error: BaseException) -> BaseException:
    return protocol.error_from_wire(json.loads(json.dumps(protocol.error_to_wire(error))))


@pytest.mark.parametrize("error, attributes", ERRORS,
                         ids=[f"{type(error).__name__}-{index}" for index, (error, _) in enumerate(ERRORS)])
def test_listed_errors_round_trip(error, attributes):
    rebuilt = through_the_wire(error)
    assert type(rebuilt) is type(error)
    assert str(rebuilt) == str(error)
    for name in attributes:
        assert getattr(rebuilt, name) == getattr(error, name), name
    if isinstance(error, (StepFailed, StepTimeout)):
        assert (rebuilt.step, rebuilt.task_id) == (error.step, error.task_id)


def test_step_failed_loses_only_the_original_exception():
    rebuilt = through_the_wire(ERRORS[0][0])
    assert rebuilt.original is None
    assert rebuilt.__cause__.text == ERRORS[0][0].remote_traceback


def test_workflow_failed_nests_its_step_error():
    error = WorkflowFailed(2, StepTimeout("c", 12, 1.0, 1.02, 99), [{"rows": 3}, (1, 2)], ["d", "e"])
    rebuilt = through_the_wire(error)
    assert type(rebuilt) is WorkflowFailed and str(rebuilt) == str(error)
    assert type(rebuilt.error) is StepTimeout and rebuilt.error.pid == 99
    assert rebuilt.__cause__ is rebuilt.error
    assert (rebuilt.index, rebuilt.results, rebuilt.skipped) == (2, [{"rows": 3}, [1, 2]], ["d", "e"])


def test_workflow_results_that_cannot_be_sent_become_null():
    error = WorkflowFailed(1, StepSkipped("b", 2, "a"), [{1, 2}], ["c"])
    assert through_the_wire(error).results == [None]


def test_notes_cross_the_wire_the_steps_first_and_only_when_there_are_any():
    original = ValueError("bad row")
    original.add_note("row 7 of orders.csv")
    wrapped = StepFailed("load", 3, "ValueError", "bad row", "tb", original)
    wrapped.add_note("step 'load': all 2 attempts failed")
    wire = protocol.error_to_wire(wrapped)
    assert wire["notes"] == ["row 7 of orders.csv", "step 'load': all 2 attempts failed"]
    assert through_the_wire(wrapped).__notes__ == wire["notes"]
    nested = through_the_wire(WorkflowFailed(1, wrapped, ["a"], []))
    assert nested.error.__notes__ == wire["notes"] and not hasattr(nested, "__notes__")
    plain = ValueError("x")
    plain.add_note("why")
    plain.__notes__.append(42)  # not text: not sent
    assert through_the_wire(plain).__notes__ == ["why"]
    assert "notes" not in protocol.error_to_wire(QueueFull("pool", 1))  # what older daemons sent, unchanged


@pytest.mark.parametrize("notes", ["one", [1, None], {"a": 1}])
def test_notes_that_are_not_a_list_of_text_are_dropped(notes):
    wire = {**protocol.error_to_wire(QueueFull("pool", 1)), "notes": notes}
    assert getattr(protocol.error_from_wire(wire), "__notes__", []) == []


def test_other_errors_arrive_as_remote_errors():
    rebuilt = through_the_wire(ValueError("no such chat"))
    assert type(rebuilt) is protocol.RemoteError
    assert (rebuilt.type_name, rebuilt.message) == ("ValueError", "no such chat")
    assert str(rebuilt) == "ValueError: no such chat"


def test_a_subclass_of_a_listed_error_is_not_rebuilt_as_its_base():
    class Special(QueueFull):
        pass

    wire = protocol.error_to_wire(Special("pool", 1))
    assert wire["type"] == "Special" and wire["fields"] == {}
    assert type(protocol.error_from_wire(wire)) is protocol.RemoteError


def test_listed_error_with_unsendable_attributes_is_sent_without_fields():
    wire = protocol.error_to_wire(StepTimeout("s", 1, 1.0, math.nan, 3))
    assert wire["fields"] == {}
    rebuilt = protocol.error_from_wire(wire)
    assert type(rebuilt) is protocol.RemoteError and rebuilt.message == wire["message"]


@pytest.mark.parametrize("wire", [
    {"type": "StepTimeout", "message": "m", "fields": {"step": "s"}},  # fields missing
    {"type": "StepTimeout", "message": "m", "fields": {"step": "s", "task_id": 1, "limit_s": "x",
                                                      "elapsed_s": "y", "pid": 1}},  # str() cannot format
    {"type": "ProtocolError", "message": "m", "fields": {"code": "nope", "reason": "r", "field": None}},
    {"type": "WorkflowFailed", "message": "m", "fields": {"index": 0}},
    {"type": "os.system", "message": "m"},
    {"type": "subprocess.Popen", "message": "m", "fields": {"args": ["rm"]}},
])
def test_misfit_wire_errors_fall_back_to_remote_error(wire):
    rebuilt = protocol.error_from_wire(wire)
    assert type(rebuilt) is protocol.RemoteError
    assert (rebuilt.type_name, rebuilt.message) == (wire["type"], "m")


@pytest.mark.parametrize("wire", [None, "boom", {"type": 1, "message": "m"}, {"type": "X"},
                                  {"type": "X", "message": "m", "fields": []}])
def test_a_malformed_error_object_is_a_bad_reply(wire):
    rebuilt = protocol.error_from_wire(wire)
    assert isinstance(rebuilt, ProtocolError) and rebuilt.code is ErrorCode.BAD_REPLY


def test_protocol_error_pickles_and_nests_field_paths():
    error = ProtocolError("bad_request", "must be a string", "step").inside("[3]").inside("calls")
    assert error.field == "calls[3].step"
    assert str(error) == "calls[3].step: must be a string"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.code, copy.reason, copy.field) == (error.code, error.reason, error.field)


# ----------------------------------------------------------------------------- JSON values

@given(json_values)
def test_json_values_are_returned_unchanged(value):
    assert protocol.to_json_value(value) is value


def test_tuples_and_str_subclasses_are_json():
    value = {"pair": (1, "a"), "lane": ErrorCode.BAD_JSON}
    assert protocol.to_json_value(value) is value


def self_containing() -> list:
    value: list = []
    value.append(value)
    return value


@pytest.mark.parametrize("value, words", [
    (math.nan, "at the top: nan is not a finite number"),
    ({"a": [1, math.inf]}, "at ['a'][1]: inf"),
    ({"rows": [{"tags": {"x"}}]}, "at ['rows'][0]['tags']: set {'x'} is not a JSON value"),
    ({1: "one"}, "key 1 (int) is not a string"),
    ({"when": object()}, "object"),
    (b"bytes", "bytes"),
    (self_containing(), "nested deeper than 200 levels (or it contains itself)"),
    (nested(protocol.MAX_RESULT_DEPTH + 1), "nested deeper than 200"),
    ("x" * 2000, "larger than 1000 bytes"),
    (["é" * 200], "over the 1000-byte limit"),  # 200 chars, 1,204 bytes escaped
    (10 ** 5000, "digits"),
], ids=lambda value: type(value).__name__)
def test_values_that_cannot_be_sent(value, words):
    with pytest.raises(protocol.ResultNotSerialisable) as raised:
        protocol.to_json_value(value, max_bytes=1000 if isinstance(value, (str, list)) else protocol.MAX_MESSAGE_BYTES)
    assert isinstance(raised.value, TypeError) and isinstance(raised.value, GovernorError)
    assert words in str(raised.value)


def test_a_shared_value_that_explodes_is_refused_quickly():
    value: list = ["x" * 100]
    for _ in range(60):  # 2**60 leaves once encoded, a few hundred objects in memory
        value = [value, value]
    with pytest.raises(protocol.ResultNotSerialisable, match="larger than"):
        protocol.to_json_value(value)


def test_nesting_up_to_the_cap_is_fine():
    value = nested(protocol.MAX_RESULT_DEPTH)
    assert protocol.to_json_value(value) is value
