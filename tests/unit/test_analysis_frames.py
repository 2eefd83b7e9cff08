"""fileserver.analysis_child's framing: requests and replies survive the pipe unchanged,
and the decoders refuse anything else with :class:`FrameError` (never another exception),
whatever bytes they are given."""

from __future__ import annotations

import contextlib
import io
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fileserver.analysis import Analysis, AnalysisConfig
from fileserver.analysis_child import (
    MAX_HEADER_BYTES,
    PREFIX,
    FrameError,
    Reply,
    Request,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    frame,
    read_request,
    split_frame,
)

floats = st.floats(allow_nan=False)
configs = st.builds(
    AnalysisConfig,
    vad_mode=st.integers(0, 3),
    min_dbfs=floats,
    snr_db=floats,
    min_speech_ms=st.integers(0, 10**6),
    clip_dbfs=floats,
    max_seconds=floats,
)
analyses = st.builds(
    Analysis,
    peak_dbfs=floats,
    rms_dbfs=floats,
    speech_ratio=floats,
    leading_silence_ms=st.integers(),
    trailing_silence_ms=st.integers(),
    clipped_ratio=floats,
    empty=st.booleans(),
    decoded_ms=st.integers(),
)
contents = st.one_of(
    st.binary(max_size=2048),
    st.text(min_size=1).filter(lambda t: "\x00" not in t).map(Path),
)
requests = st.builds(
    Request,
    id=st.integers(0, 2**63),
    config=configs,
    content=contents,
    expected_ms=st.none() | st.integers(0, 10**9),
)
replies = st.one_of(
    st.builds(Reply, id=st.integers(0, 2**63), analysis=analyses, cpu_s=floats),
    st.builds(Reply, id=st.integers(0, 2**63), error=st.text(min_size=1), cpu_s=floats),
)


def _decode_both(header: bytes, body: bytes) -> None:
    """Both decoders on ``header`` and ``body``: a value or :class:`FrameError`, only."""
    for decode in (decode_request, decode_reply):
        with contextlib.suppress(FrameError):
            decode(header, body)


def _split(data: bytes) -> tuple[bytes, bytes]:
    parts = split_frame(data)
    assert parts is not None and parts[2] == b""
    return parts[0], parts[1]


@given(requests)
def test_a_request_survives_the_pipe(request: Request) -> None:
    data = b"".join(encode_request(request))
    assert decode_request(*_split(data)) == request
    assert read_request(io.BytesIO(data)) == request


@given(replies)
def test_a_reply_survives_the_pipe(reply: Reply) -> None:
    assert decode_reply(*_split(encode_reply(reply))) == reply


def test_every_field_of_the_config_and_the_analysis_is_carried() -> None:
    """A field added to AnalysisConfig or Analysis must reach the child and come back
    (the codec reads them from the dataclasses; their types must be int, float, bool)."""
    config = AnalysisConfig(vad_mode=1, min_dbfs=-40.5, snr_db=6, min_speech_ms=500)
    request = Request(7, config, Path("/spool/x.mp3"), expected_ms=3000)
    assert decode_request(*_split(b"".join(encode_request(request)))) == request
    analysis = Analysis(-1.5, -20.25, 0.5, 10, 20, 0.001, False, 3096)
    reply = Reply(7, analysis=analysis, cpu_s=0.0015)
    assert decode_reply(*_split(encode_reply(reply))) == reply


@settings(max_examples=500)
@given(st.binary(max_size=512), st.binary(max_size=64))
def test_the_decoders_refuse_any_bytes_with_frame_error_only(header: bytes, body: bytes) -> None:
    _decode_both(header, body)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | floats | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@settings(max_examples=500)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "id": json_values,
            "config": json_values,
            "expected_ms": json_values,
            "path": json_values,
            "analysis": json_values,
            "error": json_values,
            "cpu_s": json_values,
        },
    ),
    st.binary(max_size=16),
)
def test_json_headers_of_the_wrong_shape_are_frame_errors(
    header: dict[str, object], body: bytes
) -> None:
    _decode_both(json.dumps(header).encode(), body)


@settings(max_examples=500)
@given(st.binary(max_size=256))
def test_a_stream_of_any_bytes_is_requests_or_a_frame_error(data: bytes) -> None:
    stream = io.BytesIO(data)
    try:
        while read_request(stream) is not None:
            pass
    except FrameError:
        pass
    try:
        rest = data
        while (parts := split_frame(rest)) is not None:
            rest = parts[2]
    except FrameError:
        pass


def test_the_decoders_refuse_what_is_not_the_protocol() -> None:
    config = {
        "vad_mode": 3,
        "min_dbfs": -50.0,
        "snr_db": 9.0,
        "min_speech_ms": 300,
        "clip_dbfs": -0.5,
        "max_seconds": 600.0,
    }
    good = {"id": 1, "config": config, "expected_ms": None}
    assert decode_request(json.dumps(good).encode(), b"x").content == b"x"
    bad = [
        {**good, "id": True},  # a bool is no number
        {**good, "id": "1"},
        {**good, "config": {**config, "vad_mode": 1.5}},
        {**good, "config": {**config, "extra": 1}},
        {k: v for k, v in good.items() if k != "config"},
        {**good, "path": ""},
        {**good, "path": 3},
    ]
    for header in bad:
        with pytest.raises(FrameError):
            decode_request(json.dumps(header).encode(), b"")
    with pytest.raises(FrameError):  # a path and a body
        decode_request(json.dumps({**good, "path": "/x"}).encode(), b"x")
    with pytest.raises(FrameError):  # neither analysis nor error
        decode_reply(b'{"id": 1, "cpu_s": 0.1}')
    with pytest.raises(FrameError):
        decode_reply(b'{"id": 1, "cpu_s": 0.1, "error": "x"}', b"body")
    with pytest.raises(FrameError):
        decode_reply(b"[1]")
    with pytest.raises(FrameError):  # JSON's integers are unbounded, floats are not
        decode_reply(b'{"id": 1, "error": "x", "cpu_s": 1' + b"0" * 400 + b"}")
    with pytest.raises(FrameError):  # over the header limit
        split_frame(PREFIX.pack(MAX_HEADER_BYTES + 1, 0))
    with pytest.raises(FrameError):  # cut inside the frame
        read_request(io.BytesIO(b"".join(frame(good, b"body"))[:-3]))
    with pytest.raises(FrameError):  # cut inside the prefix
        read_request(io.BytesIO(struct.pack("!I", 5)))
    assert split_frame(frame(good)[0][:-1]) is None
    assert read_request(io.BytesIO(b"")) is None
