"""The sans-I/O WebSocket framing (ws_gym/frames.py): no sockets here."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ws_gym import frames as F


def xor_reference(data: bytes, key: bytes) -> bytes:
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


def wire(op: int, payload: bytes, masked: bool, fin: bool = True) -> bytes:
    head, body = F.frame(op, payload, masked=masked)
    if not fin:
        head = bytes([head[0] & 0x7F]) + head[1:]
    return head + bytes(body)


def feed_in_chunks(parser: F.FrameParser, data: bytes, sizes: list[int]) -> list:
    out, pos, i = [], 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)] if sizes else len(data)
        out += [(op, bytes(p)) for op, p in parser.feed(data[pos : pos + n])]
        pos += n
        i += 1
    return out


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 7, 8, 9, 2047, 2048, 2049, 4099, 100_003])
def test_mask_matches_the_rfc_definition(n):
    rng = random.Random(n)
    data = bytes(rng.getrandbits(8) for _ in range(n))
    key = bytes(rng.getrandbits(8) for _ in range(4))
    want = xor_reference(data, key)
    assert bytes(F.mask(data, key)) == want
    assert bytes(F.mask(memoryview(data), key)) == want
    buf = bytearray(data)
    assert F.mask(buf, key, inplace=True) is buf or n == 0
    assert bytes(buf) == want
    assert bytes(F.mask(want, key)) == data  # its own inverse


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 200_001])
@pytest.mark.parametrize("masked", [False, True])
def test_frames_round_trip_whole_and_in_pieces(size, masked):
    payload = bytes(random.Random(size).getrandbits(8) for _ in range(min(size, 4096))) * (size // 4096 + 1)
    payload = payload[:size]
    data = wire(F.OP_BINARY, payload, masked)
    # header length as RFC 6455 says: 7-bit, 16-bit or 64-bit length
    extra = 0 if size < 126 else 2 if size < 65536 else 8
    assert len(data) == 2 + extra + (4 if masked else 0) + size
    assert bool(data[1] & 0x80) == masked
    for sizes in ([], [1], [2, 3], [7, 1000, 1], [65536]):
        parser = F.FrameParser(max_size=1 << 20, masked=masked)
        assert feed_in_chunks(parser, data * 2, sizes) == [(F.OP_BINARY, payload)] * 2


def test_a_mask_is_fresh_for_every_frame():
    keys = {F.frame(F.OP_BINARY, b"x" * 10, masked=True)[0][2:6] for _ in range(50)}
    assert len(keys) > 40


@pytest.mark.parametrize("size", [0, 5, 2048, 70_000])
def test_the_zero_key_frames_parse_everywhere_and_cost_no_xor(size, monkeypatch):
    payload = bytes(random.Random(size).getrandbits(8) for _ in range(size))
    head, body = F.frame(F.OP_BINARY, payload, masked=True, key=F.ZERO_KEY)
    assert body is payload  # no copy, no XOR
    assert head[1] & 0x80 and head[-4:] == F.ZERO_KEY
    # an RFC 6455 frame like any other: a generic unmask gives the payload back
    assert xor_reference(bytes(body), head[-4:]) == payload
    called = []
    real = F.mask
    monkeypatch.setattr(F, "mask", lambda *a, **k: called.append(1) or real(*a, **k))
    for sizes in ([], [1], [3, 1000]):
        parser = F.FrameParser(max_size=1 << 20, masked=True)
        assert feed_in_chunks(parser, (head + payload) * 2, sizes) == [(F.OP_BINARY, payload)] * 2
    assert called == []  # the parser skips the XOR with zeros
    random_key = b"".join(F.frame(F.OP_BINARY, payload, masked=True))
    assert feed_in_chunks(F.FrameParser(max_size=1 << 20, masked=True), random_key, []) == [(F.OP_BINARY, payload)]
    assert called  # and unmasks any other key


@settings(max_examples=200, derandomize=True, deadline=None)
@given(
    messages=st.lists(st.tuples(st.sampled_from([F.OP_BINARY, F.OP_TEXT, F.OP_PING, F.OP_PONG]),
                                st.binary(max_size=300)), max_size=8),
    chunk=st.integers(min_value=1, max_value=97),
    masked=st.booleans(),
)
def test_any_stream_of_frames_parses_back(messages, chunk, masked):
    messages = [(op, p[:125] if op in (F.OP_PING, F.OP_PONG) else p) for op, p in messages]
    data = b"".join(wire(op, p, masked) for op, p in messages)
    parser = F.FrameParser(max_size=1000, masked=masked)
    assert feed_in_chunks(parser, data, [chunk]) == messages


def test_fragments_are_joined_and_control_frames_may_come_between():
    masked = True
    data = (wire(F.OP_BINARY, b"abc", masked, fin=False)
            + wire(F.OP_PING, b"p", masked)
            + wire(F.OP_CONT, b"def", masked, fin=False)
            + wire(F.OP_CONT, b"g" * 70_000, masked))
    parser = F.FrameParser(max_size=1 << 20, masked=masked)
    assert feed_in_chunks(parser, data, [5]) == [(F.OP_PING, b"p"), (F.OP_BINARY, b"abcdef" + b"g" * 70_000)]


def test_close_payload():
    assert F.parse_close(F.close_payload(1009, "too big")) == (1009, "too big")
    assert F.parse_close(b"") == (1005, "")
    assert len(F.close_payload(1000, "x" * 500)) == 125  # a control frame's limit
    # cut between characters, never inside one (a 2-byte character straddles byte 123)
    cut = F.close_payload(1000, "xx" + "\u00e9" * 100)
    assert len(cut) == 2 + 122 and F.parse_close(cut) == (1000, "xx" + "\u00e9" * 60)


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535])
def test_a_close_code_no_frame_may_carry_is_a_protocol_error(code):
    assert not F.valid_close_code(code)
    with pytest.raises(F.FrameError) as info:
        F.parse_close(code.to_bytes(2, "big") + b"bye")
    assert info.value.code == F.CLOSE_PROTOCOL_ERROR


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
                                  3000, 4000, 4999])
def test_close_codes_a_frame_may_carry(code):
    assert F.valid_close_code(code)
    assert F.parse_close(F.close_payload(code, "r")) == (code, "r")


def test_a_one_byte_close_payload_and_a_reason_not_utf8_are_errors():
    with pytest.raises(F.FrameError) as info:
        F.parse_close(b"\x03")
    assert info.value.code == F.CLOSE_PROTOCOL_ERROR
    with pytest.raises(F.FrameError) as info:
        F.parse_close(b"\x03\xe8\xc3(")  # 1000, then an invalid UTF-8 sequence
    assert info.value.code == F.CLOSE_INVALID_DATA


def raw_frame(b0: int, payload: bytes, mask_key: bytes | None, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    mbit = 0x80 if mask_key is not None else 0
    if n < 126:
        head = bytes([b0, mbit | n])
    elif n < 65536:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if mask_key is None:
        return head + payload
    return head + mask_key + F.mask(payload, mask_key)


KEY = b"\x01\x02\x03\x04"
BAD = [
    ("reserved bit", raw_frame(0x80 | 0x40 | F.OP_BINARY, b"x", KEY), 1002),
    ("unmasked client frame", raw_frame(0x80 | F.OP_BINARY, b"x", None), 1002),
    ("unknown opcode", raw_frame(0x80 | 0x3, b"x", KEY), 1002),
    ("fragmented control frame", raw_frame(F.OP_PING, b"x", KEY), 1002),
    ("long control frame", raw_frame(0x80 | F.OP_PING, b"x" * 126, KEY), 1002),
    ("continuation of nothing", raw_frame(0x80 | F.OP_CONT, b"x", KEY), 1002),
    ("new message inside a fragmented one",
     raw_frame(F.OP_BINARY, b"x", KEY) + raw_frame(0x80 | F.OP_BINARY, b"y", KEY), 1002),
    ("too big, said by the header alone", raw_frame(0x80 | F.OP_BINARY, b"", KEY, length=2**62)[:14], 1009),
    ("too big in fragments", raw_frame(F.OP_BINARY, b"x" * 600, KEY) + raw_frame(0x80 | F.OP_CONT, b"y" * 600, KEY), 1009),
]


@pytest.mark.parametrize("what, data, code", BAD, ids=[b[0] for b in BAD])
def test_broken_framing_is_refused_with_its_close_code(what, data, code):
    parser = F.FrameParser(max_size=1000, masked=True)
    with pytest.raises(F.FrameError) as info:
        feed_in_chunks(parser, data, [])
    assert info.value.code == code
    assert isinstance(info.value, F.ProtocolError)
    # a broken stream yields nothing more, even good frames
    assert parser.feed(wire(F.OP_BINARY, b"ok", True)) == []


def test_a_masked_server_frame_is_refused():
    parser = F.FrameParser(max_size=1000, masked=False)
    with pytest.raises(F.FrameError):
        parser.feed(wire(F.OP_BINARY, b"x", masked=True))


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70_000])
@pytest.mark.parametrize("masked, key", [(False, None), (True, F.ZERO_KEY), (True, None)])
@pytest.mark.parametrize("op", [F.OP_BINARY, F.OP_TEXT])
def test_a_read_of_one_whole_frame_parses_as_the_general_loop_does(size, masked, key, op):
    payload = bytes(random.Random(size).getrandbits(8) for _ in range(size))
    data = b"".join(bytes(p) for p in F.frame(op, payload, masked=masked, key=key))
    fast = F.FrameParser(max_size=1 << 20, masked=masked).feed(data)
    general = F.FrameParser(max_size=1 << 20, masked=masked)._feed_general(data)
    assert [(o, bytes(p)) for o, p in fast] == [(o, bytes(p)) for o, p in general] == [(op, payload)]
    # one byte more or less is not one whole frame: the general loop takes it, as before
    parser = F.FrameParser(max_size=1 << 20, masked=masked)
    assert [(o, bytes(p)) for o, p in parser.feed(data + data[:1])] == [(op, payload)]
    assert [(o, bytes(p)) for o, p in parser.feed(data[1:])] == [(op, payload)]
    with pytest.raises(F.FrameError) as err:  # and the size limit holds on the fast path too
        F.FrameParser(max_size=size - 1, masked=masked).feed(data) if size else F.FrameParser(
            max_size=0, masked=not masked).feed(data)
    assert err.value.code in (F.CLOSE_TOO_BIG, F.CLOSE_PROTOCOL_ERROR)


@pytest.mark.parametrize("sizes", [(), (0,), (3, 0, 5), (100, 70_000, 7)])
@pytest.mark.parametrize("masked", [False, True])
def test_a_frame_in_pieces_is_the_frame_of_the_joined_payload(sizes, masked):
    rng = random.Random(len(sizes))
    pieces = tuple(bytes(rng.getrandbits(8) for _ in range(n)) for n in sizes)
    key = F.ZERO_KEY if masked else None
    sent = F.frame_pieces(F.OP_BINARY, pieces, masked=masked, key=key)
    assert sent[1:] == pieces  # written as they are, no copy
    joined = b"".join(pieces)
    assert b"".join(sent) == b"".join(bytes(p) for p in F.frame(F.OP_BINARY, joined, masked=masked, key=key))
    parser = F.FrameParser(max_size=1 << 20, masked=masked)
    assert [(o, bytes(p)) for o, p in parser.feed(b"".join(sent))] == [(F.OP_BINARY, joined)]
    if masked:
        with pytest.raises(ValueError):  # a real key must XOR (copy) the payload anyway
            F.frame_pieces(F.OP_BINARY, pieces, masked=True, key=b"\1\2\3\4")
