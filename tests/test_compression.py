"""Compressed observations (ws_gym.compression and its frames).

Pure tests first (negotiation, codecs and their bounds, the frames, the auto
rule: no sockets), then real trainers with real worker processes on
127.0.0.1: results equal uncompressed ones for lz4 and zstd, ``"auto"`` stays
off on loopback, a bomb from a hostile worker is a ProtocolError that leaves
the trainer serving, and a missing library is a clear error.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import tracemalloc

import aiohttp
import gymnasium as gym
import numpy as np
import orjson
import pytest

import ws_gym
from ws_gym import codec, compact, compression as Z
from ws_gym import protocol as P
from ws_gym.config import Transport
from ws_gym.errors import ProtocolError
from ws_gym.host import EnvHost
from ws_gym.spaces import space_to_schema

from .conftest import ROOT, assert_same

PIXELS = "ws_gym/CartPolePixels-v0"
CODECS = ["lz4", "zstd"]
MB = 1 << 20


def frames(n=8, seed=0, steps=30):
    """Stacked CartPolePixels observations, as a worker's batch sends them."""
    env = gym.make_vec(PIXELS, num_envs=n, vectorization_mode="sync")
    env.reset(seed=seed)
    env.action_space.seed(seed)
    for _ in range(steps):
        obs, *_ = env.step(env.action_space.sample())
    env.close()
    return obs


def blocked(monkeypatch, *names):
    """Make the named codecs' libraries look not installed."""
    for name in names:
        for mod in {"lz4": ("lz4", "lz4.block"), "zstd": ("zstandard",)}[name]:
            monkeypatch.setitem(sys.modules, mod, None)


# ----------------------------------------------------------------------------- negotiation


def test_the_trainer_chooses_per_connection():
    both = ["zstd", "lz4"]
    assert Z.choose("none", both, local=False) == (None, False)
    assert Z.choose("auto", both, local=False) == ("zstd", True)
    assert Z.choose("auto", ["lz4"], local=False) == ("lz4", True)
    assert Z.choose("auto", both, local=True) == (None, False)  # loopback, Unix socket: never
    assert Z.choose("auto", [], local=False) == (None, False)  # an older worker, or --compression none
    assert Z.choose("auto", ["brotli"], local=False) == (None, False)
    assert Z.choose("lz4", both, local=True) == ("lz4", False)  # explicit: every connection, always
    assert Z.choose("zstd", ["lz4"], local=False) == (None, False)  # not offered: plain frames


def test_workers_offer_what_they_have(monkeypatch):
    assert Z.offer("none") == []
    assert Z.offer("auto") == ["zstd", "lz4"]
    assert Z.offer("lz4") == ["lz4"]
    blocked(monkeypatch, "zstd")
    assert Z.offer("auto") == ["lz4"]
    assert Z.choose("auto", ["zstd", "lz4"], local=False) == ("lz4", True)  # the trainer lacks zstd too
    with pytest.raises(ImportError, match=r"--compression zstd needs .*pip install ws_gym\[compress\]"):
        Z.offer("zstd")
    blocked(monkeypatch, "lz4")
    assert Z.offer("auto") == [] and Z.available() == ()
    assert Z.choose("auto", ["zstd", "lz4"], local=False) == (None, False)  # without a library auto is none
    with pytest.raises(ImportError, match=r"compression='lz4' needs .*ws_gym\[compress\]"):
        Z.require("lz4")


def test_hello_and_welcome_carry_the_choice():
    sent = codec.encode(P.HELLO, 0, P.make_hello("X-v0", 2, "w", None, ["zstd", "lz4"]))
    hello = P.parse_hello(codec.decode(sent).body)
    assert hello.compression == ("zstd", "lz4")
    assert P.parse_hello(P.make_hello("X-v0", 2, "w")).compression == ()  # an older worker: nothing offered
    with pytest.raises(ProtocolError, match="compression"):
        P.parse_hello({**P.make_hello("X-v0", 2, "w"), "compression": ["zstd"] * 9})
    with pytest.raises(ProtocolError, match="compression"):
        P.parse_hello({**P.make_hello("X-v0", 2, "w"), "compression": [1]})
    base = P.Welcome("X-v0", {}, 2, 0, P.MODE_VECTOR, "NextStep", None)
    plain = P.make_welcome(base)
    assert "compression" not in plain and P.parse_welcome(plain).compression is None
    chosen = P.parse_welcome(P.make_welcome(P.Welcome("X-v0", {}, 2, 0, P.MODE_VECTOR, "NextStep", None,
                                                      compression="lz4", compress="auto")))
    assert (chosen.compression, chosen.compress) == ("lz4", "auto")
    with pytest.raises(ProtocolError, match="compress"):
        P.parse_welcome({**plain, "compression": "lz4", "compress": "sometimes"})


# ----------------------------------------------------------------------------- codecs and bounds


@pytest.mark.parametrize("name", CODECS)
def test_round_trip_and_what_stays_plain(name):
    obs = frames()
    pack, unzip = Z.Compressor(name, auto=False), Z.Decompressor(name, 8 * MB)
    packed = pack.pack(memoryview(obs).cast("B"))
    assert packed is not None and len(packed) * 20 < obs.nbytes  # renders compress well
    assert unzip.unpack(packed, obs.nbytes) == obs.tobytes()
    out = np.zeros_like(obs)
    unzip.unpack_into(packed, out.data.cast("B"))
    assert np.array_equal(out, obs)
    if name == "lz4":  # where liblz4's entry point is not reachable: the binding's output, copied
        unzip.codec._into = None
        out[:] = 0
        unzip.unpack_into(packed, out.data.cast("B"))
        assert np.array_equal(out, obs)
        with pytest.raises(ProtocolError):
            unzip.unpack_into(packed, memoryview(bytearray(obs.nbytes - 1)))
    assert pack.pack(memoryview(b"\0" * (Z.MIN_SIZE - 1))) is None  # too small to bother
    noise = np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8)
    assert pack.pack(noise.data) is None  # does not shrink: sent as it is


@pytest.mark.parametrize("name", CODECS)
def test_decompression_bombs_are_protocol_errors_without_the_allocation(name):
    unzip = Z.Decompressor(name, 8 * MB)
    bomb = Z.make_codec(name).compress(b"\0" * (64 * MB))  # 64 MB of zeros: lz4 < 300 kB, zstd a few kB
    assert len(bomb) < MB / 3
    tracemalloc.start()
    try:
        for claimed in (28224, 8 * MB):  # the layout's size, the limit: the bomb holds far more
            with pytest.raises(ProtocolError):
                unzip.unpack(bomb, claimed)
        with pytest.raises(ProtocolError, match="over the limit"):  # claims more than max_msg_size
            unzip.unpack(bomb, 64 * MB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * MB, f"{peak} bytes allocated while refusing bombs"
    for size in (28224, 7):  # into a buffer: nothing written past the part it is given
        out = bytearray(size + 64)
        with pytest.raises(ProtocolError):
            unzip.unpack_into(bomb, memoryview(out)[:size])
        assert not any(out[size:])
    for garbage in (b"", b"\xff" * 64, bomb[: len(bomb) // 2]):
        with pytest.raises(ProtocolError):
            unzip.unpack(garbage, 4096)
        with pytest.raises(ProtocolError):
            unzip.unpack_into(garbage, memoryview(bytearray(4096)))
    if name == "zstd":  # a frame that does not declare its size, or declares another
        import zstandard

        unsized = zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 5000)
        with pytest.raises(ProtocolError, match="declares"):
            unzip.unpack(unsized, 5000)
        with pytest.raises(ProtocolError, match="declares"):
            unzip.unpack(zstandard.ZstdCompressor().compress(b"x" * 5000), 4000)
        with pytest.raises(ProtocolError, match="declares"):
            unzip.unpack_into(unsized, memoryview(bytearray(5000)))
    assert unzip.frames == 0


# ----------------------------------------------------------------------------- general frames


@pytest.mark.parametrize("name", CODECS)
def test_codec_frames_with_compressed_buffers_decode_as_plain_ones(name):
    obs = frames(4)
    body = {"o": obs, "f": [[0, {"small": np.arange(3), "big": np.zeros(5000, np.float32)}]], "x": b"y" * 9000}
    plain = codec.decode(codec.encode(P.OK, 7, body))
    pack = Z.Compressor(name, auto=False)
    frame = codec.encode(P.OK, 7, body, pack=pack)
    assert len(frame) * 10 < len(codec.encode(P.OK, 7, body)) and pack.arrays == 3
    unzip = Z.Decompressor(name, 8 * MB)
    got = codec.decode(frame, unzip=unzip)
    assert (got.kind, got.id) == (P.OK, 7)
    assert_same(got.body, plain.body)
    assert not got.body["o"].flags.writeable
    with pytest.raises(ProtocolError, match="spec must be"):  # a peer that did not negotiate it
        codec.decode(frame)
    # buffers that claim more than max_msg_size in all: refused before decompressing
    with pytest.raises(ProtocolError, match="over the limit"):
        codec.decode(frame, unzip=Z.Decompressor(name, obs.nbytes - 1))


def reheader(frame: bytes, change) -> bytes:
    """``frame`` with its JSON header changed by ``change`` (re-padded), its buffers as they were."""
    hlen = int.from_bytes(frame[:4], "little")
    header = orjson.loads(frame[4 : 4 + hlen])
    change(header)
    raw = orjson.dumps(header)
    raw += b" " * (-(4 + len(raw)) % 8)
    return len(raw).to_bytes(4, "little") + raw + frame[4 + hlen :]


def test_a_compressed_buffer_claiming_a_huge_shape_is_refused_first():
    pack = Z.Compressor("lz4", auto=False)
    frame = codec.encode(P.OK, 1, {"o": np.zeros(1 << 16, np.uint8)}, pack=pack)
    unzip = Z.Decompressor("lz4", 64 * MB)
    assert codec.decode(frame, unzip=unzip).body["o"].shape == (1 << 16,)

    def huge(header):
        header["b"][0][1] = [65536, 65536, 64]

    with pytest.raises(ProtocolError, match="over the limit"):
        codec.decode(reheader(frame, huge), unzip=unzip)
    assert unzip.frames == 1  # nothing decompressed for the forged frame
    # the same buffer twice: each under the limit, not both (the second is refused undecompressed)
    buffers = frame[4 + int.from_bytes(frame[:4], "little") :]
    twice = reheader(frame + buffers, lambda h: h["b"].append(h["b"][0]))
    assert codec.decode(twice, unzip=Z.Decompressor("lz4", 2 << 16)).body["o"].shape == (1 << 16,)
    small = Z.Decompressor("lz4", 100_000)
    with pytest.raises(ProtocolError, match="over the limit"):
        codec.decode(twice, unzip=small)
    assert small.frames == 1


# ----------------------------------------------------------------------------- compact replies


def pixel_layout(count, single=False):
    env = gym.make(PIXELS)
    layout = compact.layout_for(space_to_schema(env.observation_space), space_to_schema(env.action_space),
                                count, single)
    env.close()
    return layout


@pytest.mark.parametrize("name", CODECS)
def test_compressed_step_replies_fill_a_batch_as_plain_ones(name):
    n = 4
    layout = pixel_layout(n)
    obs = frames(n)
    rng = np.random.default_rng(1)
    result = {"o": obs, "r": rng.normal(size=n), "t": rng.integers(0, 2, n).astype(bool),
              "u": rng.integers(0, 2, n).astype(bool), "f": []}
    zframe = layout.encode_reply(9, result, pack=Z.Compressor(name, auto=False))
    assert zframe[:4] == compact.ZREPLY and len(zframe) * 20 < layout.reply_size
    plain = compact.StepCodec(layout)
    zcodec = compact.ZStepCodec(layout, Z.Decompressor(name, 8 * MB))
    rid, kind, body, is_compact = zcodec.decode(zframe)
    assert (rid, kind, is_compact) == (9, P.OK, True)
    expected = plain.reply_body(layout.encode_reply(9, result))
    assert_same(zcodec.reply_body(body), expected)
    # into rows 2..5 of a batch of 8, as the trainer's StepBatch does
    batch = [np.zeros((8, *obs.shape[1:]), np.uint8), np.zeros(8), np.zeros(8, bool), np.zeros(8, bool)]
    zcodec.copy_reply(body, zcodec.byte_views(*batch), 2)
    for got, want in zip(batch, (obs, result["r"], result["t"], result["u"])):
        assert np.array_equal(got[2:6], want) and not got[:2].any() and not got[6:].any()
    # a plain reply on the same connection still reads as before
    assert zcodec.decode(layout.encode_reply(3, result))[0] == 3


@pytest.mark.parametrize("name", CODECS)
def test_compressed_step_replies_decompress_into_the_batch_only(name):
    """The decompressor writes the batch rows itself: no buffer the size of
    the observations is allocated on the way (the lz4 binding, where liblz4's
    entry point is not reachable, makes one)."""
    n = 8
    layout = pixel_layout(n)
    obs = frames(n)
    result = {"o": obs, "r": np.ones(n), "t": np.zeros(n, bool), "u": np.ones(n, bool), "f": []}
    zcodec = compact.ZStepCodec(layout, Z.Decompressor(name, 8 * MB))
    if name == "lz4" and zcodec.unzip.codec._into is None:
        pytest.skip("the lz4 module here does not export LZ4_decompress_safe")
    _, _, frame, _ = zcodec.decode(layout.encode_reply(1, result, pack=Z.Compressor(name, auto=False)))
    batch = [np.zeros((n, *obs.shape[1:]), np.uint8), np.zeros(n), np.zeros(n, bool), np.zeros(n, bool)]
    views = zcodec.byte_views(*batch)
    zcodec.copy_reply(frame, views, 0)  # warm (zstd's context allocates its window once)
    batch[0][:] = 0
    tracemalloc.start()
    try:
        zcodec.copy_reply(frame, views, 0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(batch[0], obs)
    assert peak < obs.nbytes // 8, f"{peak} bytes allocated to decompress {obs.nbytes} into the batch"
    assert zcodec.unzip.frames == 2 and zcodec.unzip.raw_bytes == 2 * obs.nbytes


@pytest.mark.parametrize("name", CODECS)
def test_malformed_compressed_step_replies(name):
    layout = pixel_layout(2)
    zcodec = compact.ZStepCodec(layout, Z.Decompressor(name, 8 * MB))
    head = compact.ZREPLY + layout.tag.to_bytes(4, "little") + (5).to_bytes(8, "little")
    tail = b"\0" * 16 + b"\0\1\0\0"
    c = Z.make_codec(name)
    good = c.compress(b"\0" * layout.obs_bytes)
    bad_head = {
        "short": head + tail[:-1] + good,
        "nothing-compressed": head + tail,
        "bad-flag": head + tail[:-1] + b"\2" + good,
        "other-layout": compact.ZREPLY + b"\0\0\0\0" + head[8:] + tail + good,
    }
    for what, frame in bad_head.items():
        with pytest.raises(ProtocolError):
            zcodec.decode(frame)
            pytest.fail(what)
    # observations are checked as they decompress: into a body, or into a batch's rows
    bad_obs = {
        "bomb": head + tail + c.compress(b"\0" * (64 * MB)),
        "one-byte-less": head + tail + c.compress(b"\0" * (layout.obs_bytes - 1)),
        "one-byte-more": head + tail + c.compress(b"\0" * (layout.obs_bytes + 1)),
        "garbage": head + tail + b"\x07" * 100,
        "truncated": head + tail + good[: len(good) // 2],
    }
    batch = [np.zeros((4, 84, 84, 4), np.uint8), np.zeros(4), np.zeros(4, bool), np.zeros(4, bool)]
    views = zcodec.byte_views(*batch)
    for what, frame in bad_obs.items():
        assert zcodec.decode(frame)[0] == 5
        with pytest.raises(ProtocolError):
            zcodec.reply_body(frame)
            pytest.fail(what)
        with pytest.raises(ProtocolError):
            zcodec.copy_reply(frame, views, 1)
            pytest.fail(what)
        # nothing outside the reply's rows is touched
        assert not batch[0][0].any() and not batch[0][3].any() and not batch[1].any()
    assert zcodec.unzip.frames == 0
    zcodec.copy_reply(head + tail + good, views, 1)
    assert zcodec.reply_body(head + tail + good)["u"].tolist() == [False, False]
    assert zcodec.unzip.frames == 2


def test_single_env_compressed_replies_keep_python_types():
    layout = pixel_layout(1, single=True)
    obs = frames(1)[0]
    result = {"o": obs, "r": 1.0, "t": False, "u": True, "info": {}}
    zcodec = compact.ZStepCodec(layout, Z.Decompressor("zstd", 8 * MB))
    _, _, body, _ = zcodec.decode(layout.encode_reply(4, result, pack=Z.Compressor("zstd", auto=False)))
    got = zcodec.reply_body(body)
    assert type(got["r"]) is float and got["t"] is False and got["u"] is True and got["info"] == {}
    assert np.array_equal(got["o"], obs) and not got["o"].flags.writeable


def test_pixels_env_is_cartpole_drawn():
    env, ref = gym.make(PIXELS), gym.make("CartPole-v1")
    obs, _ = env.reset(seed=5)
    ref.reset(seed=5)
    assert obs.shape == (84, 84, 4) and obs.dtype == np.uint8 and env.observation_space.contains(obs)
    assert (obs == obs[..., :1]).all()  # after a reset the stack holds the first frame 4 times
    first = obs[..., 0].copy()
    for _ in range(8):
        obs, r, t, u, _ = env.step(1)
        assert (r, t, u) == ref.step(1)[1:4]
    assert not t and not np.array_equal(obs[..., 3], first)  # the pole and the cart moved
    assert len(np.unique(obs)) <= 5  # flat areas: background, ground, cart, pole
    env.close()
    ref.close()


# ----------------------------------------------------------------------------- the auto rule


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def run_cycles(rule: Z.AutoRule, clock: Clock, seconds: float, on_cycle: float, off_cycle: float) -> list[bool]:
    """Feed step cycles whose length depends on whether the rule compresses; its choices."""
    seen = []
    end = clock.t + seconds
    while clock.t < end:
        on = rule.on
        seen.append(on)
        clock.t += on_cycle if on else off_cycle
        rule.step_arrived(clock.t)
    return seen


def test_auto_stays_on_where_it_pays_and_probes_rarely():
    clock = Clock()
    rule = Z.AutoRule(clock)
    rule.sampled(28224, 300, 40e-6)
    rule.step_arrived(clock.t)
    seen = run_cycles(rule, clock, 120.0, on_cycle=0.04, off_cycle=0.2)  # a slow link
    assert seen[-1] and rule.switches == 0 and rule.probes >= 3
    assert seen.count(False) <= rule.probes  # each probe of "off" ended after one cycle
    assert rule.probes <= 8  # the period doubled


def test_auto_turns_off_where_it_costs_and_back_on_when_it_pays():
    clock = Clock()
    rule = Z.AutoRule(clock)
    rule.sampled(28224, 300, 40e-6)
    rule.step_arrived(clock.t)
    run_cycles(rule, clock, 5.0, on_cycle=0.0012, off_cycle=0.001)  # a fast link: compressing costs
    assert not rule.arm_on and rule.switches == 1
    seen = run_cycles(rule, clock, 60.0, on_cycle=0.0012, off_cycle=0.001)
    assert seen.count(True) < 0.05 * len(seen)
    run_cycles(rule, clock, 2 * Z.AutoRule.MAX_PERIOD, on_cycle=0.01, off_cycle=0.05)  # the link got slow
    assert rule.arm_on and rule.switches == 2


def test_auto_skips_what_does_not_shrink_enough():
    clock = Clock()
    pack = Z.Compressor("lz4", auto=True, clock=clock)
    noise = np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8).data
    results = [pack.pack(noise) for _ in range(200)]
    assert results == [None] * 200
    rule = pack.rule
    assert rule is not None and not rule.on and rule.samples == 4  # sampled 1 in 64 once it knew
    flat = memoryview(bytes(1 << 16))
    for _ in range(64):
        if pack.pack(flat) is not None:
            break
    assert rule.samples == 5  # the next sample saw the data change
    rule.samples, rule.raw, rule.packed = 1, 1 << 16, 100  # as if only flat frames had been seen
    assert rule.on and pack.pack(flat) is not None


# ----------------------------------------------------------------------------- real sockets


def conns(envs) -> list:
    return list(envs.unwrapped._trainer.table.conns)


def start_workers(cli_workers, envs, n, *extra):
    url, token = envs.unwrapped.url, envs.unwrapped.token
    env = {P.TOKEN_ENV: token} if token else {}
    return [cli_workers.start("--url", url, "--env", PIXELS, "--num-envs", str(envs.num_envs // n),
                              "--retry-timeout", "30", "--quiet", *extra, env=env) for _ in range(n)]


def same_as_sync(envs, steps=60, seed=11):
    """Reset and step ``envs`` and a SyncVectorEnv alike; every output must be equal."""
    ref = gym.make_vec(PIXELS, num_envs=envs.num_envs, vectorization_mode="sync")
    try:
        got, want = envs.reset(seed=seed), ref.reset(seed=seed)
        assert_same(got[0], want[0])
        rng = np.random.default_rng(seed)
        for _ in range(steps):
            actions = rng.integers(0, 2, envs.num_envs)
            got, want = envs.step(actions), ref.step(actions)
            for a, b in zip(got[:4], want[:4]):
                assert_same(a, b)
    finally:
        ref.close()


@pytest.mark.parametrize("name, frames", [("lz4", "compact"), ("zstd", "compact"), ("zstd", "codec only")])
def test_compressed_results_equal_plain_ones(cli_workers, name, frames):
    envs = ws_gym.RemoteVectorEnv(4, env_id=PIXELS, port=0, connect_timeout=60, step_timeout=30,
                                  compression=name, transport=Transport(compact=frames == "compact"))
    try:
        start_workers(cli_workers, envs, 2)
        same_as_sync(envs)
        for c in conns(envs):
            assert (c.compression, c.compress_auto, type(c.codec)) == (name, False, compact.ZStepCodec)
            assert (c.codec.layout is not None) == (frames == "compact")
            assert c.codec.unzip.frames >= 60 and c.codec.unzip.ratio > 20  # reset and steps, compressed
        shown = {(w["compression"], w["compressed_ratio"] > 20) for w in envs.stats()["workers"]}
        assert shown == {(name, True)}  # /status says so too
    finally:
        envs.close()


@pytest.mark.parametrize("where", ["unix socket", "loopback tcp"])
def test_auto_is_off_on_loopback_and_unix_sockets(cli_workers, where):
    local = 2 if where == "unix socket" else 0  # local workers dial the trainer's Unix socket
    envs = ws_gym.RemoteVectorEnv(4, env_id=PIXELS, port=0, connect_timeout=60, step_timeout=30,
                                  local_workers=local)  # compression="auto", the default
    try:
        if not local:
            start_workers(cli_workers, envs, 2)
        same_as_sync(envs, steps=10)
        assert [c.peer for c in conns(envs)] == ["unix socket" if local else "127.0.0.1"] * 2
        for c in conns(envs):
            assert (c.compression, type(c.codec)) == ("none", compact.StepCodec)
    finally:
        envs.close()


def test_a_single_remote_env_compressed_equals_its_local_twin():
    env = gym.make("ws_gym/Remote-v0", env_id=PIXELS, port=0, local_workers=1, connect_timeout=60,
                   step_timeout=30, compression="lz4")  # a local worker: explicit codecs apply everywhere
    ref = gym.make(PIXELS)
    try:
        assert_same(env.reset(seed=4)[0], ref.reset(seed=4)[0])
        for i in range(120):
            got, want = env.step(i % 2), ref.step(i % 2)
            for a, b in zip(got[:4], want[:4]):
                assert type(a) is type(b)
                assert_same(a, b)
            if got[2] or got[3]:
                assert_same(env.reset()[0], ref.reset()[0])
        (c,) = env.unwrapped._trainer.table.conns
        assert c.compression == "lz4" and c.codec.unzip.frames > 100
    finally:
        env.close()
        ref.close()


def test_auto_off_loopback_compresses_while_it_pays(cli_workers, monkeypatch):
    """As if the workers were on other machines (the server's loopback test
    answers no): they negotiate zstd with the auto rule, and results are the same."""
    monkeypatch.setattr("ws_gym.server._on_this_machine", lambda transport: False)
    envs = ws_gym.RemoteVectorEnv(4, env_id=PIXELS, port=0, connect_timeout=60, step_timeout=30)
    try:
        start_workers(cli_workers, envs, 2)
        same_as_sync(envs, steps=100)
        for c in conns(envs):
            assert (c.compression, c.compress_auto) == ("zstd", True)
            assert c.codec.unzip.frames > 0  # it starts compressing: off loopback it nearly always pays
    finally:
        envs.close()


def test_a_worker_that_offers_nothing_gets_plain_frames(cli_workers):
    envs = ws_gym.RemoteVectorEnv(2, env_id=PIXELS, port=0, connect_timeout=60, step_timeout=30,
                                  compression="zstd")
    try:
        start_workers(cli_workers, envs, 1, "--compression", "none")
        same_as_sync(envs, steps=10)
        (c,) = conns(envs)
        assert (c.compression, type(c.codec)) == ("none", compact.StepCodec)
    finally:
        envs.close()


class BombingWorker:
    """A worker written here: honest envs, but it offers zstd and answers the
    requests in ``bombs`` (by order: reset 0, steps 1, 2, ...) with a frame
    whose observations decompress far beyond their size."""

    def __init__(self, url: str, bombs: dict) -> None:
        self.url, self.bombs = url, bombs
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.future = asyncio.run_coroutine_threadsafe(self._run(), self.loop)

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as session, session.ws_connect(self.url) as ws:
            await ws.send_bytes(codec.encode(P.HELLO, 0, P.make_hello(PIXELS, 2, "bomber", None, ["zstd"])))
            welcome = P.parse_welcome(codec.writable(codec.decode((await ws.receive(timeout=20)).data).body))
            assert welcome.compression == "zstd"
            host = EnvHost(welcome)
            pack = Z.Compressor("zstd", auto=False)
            await ws.send_bytes(codec.encode(P.READY, 0, host.ready_body()))
            assert codec.decode((await ws.receive(timeout=20)).data).kind == P.ACCEPT
            n = 0
            while True:
                m = await ws.receive()
                if m.type != aiohttp.WSMsgType.BINARY:
                    return
                if m.data[:4] == compact.REQUEST:
                    rid, actions = host.compact.decode_request(m.data)
                    req = codec.Message(P.STEP, rid, {"a": actions})
                else:
                    req = codec.decode(m.data)
                result = host.handle(req.kind, req.body if req.kind == P.STEP else codec.writable(req.body))
                bomb = self.bombs.get(n)
                if req.kind == P.STEP:
                    frame = host.compact.encode_reply(req.id, result, pack=pack)
                    if bomb is not None:  # the same frame, its observations replaced by a bomb
                        frame = frame[: host.compact.z_at] + bomb
                else:
                    frame = codec.encode(P.OK, req.id, result, pack=pack)
                    if bomb is not None:  # claims a buffer of more than max_msg_size
                        frame = frame.replace(b"[2,84,84,4]", bomb)
                await ws.send_bytes(frame)
                n += 1
                if req.kind == P.CLOSE:
                    host.close()
                    return

    def close(self) -> None:
        if not self.future.done():
            self.loop.call_soon_threadsafe(self.future.cancel)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_a_bomb_is_a_protocol_error_and_the_trainer_serves_on():
    envs = ws_gym.RemoteVectorEnv(2, env_id=PIXELS, port=0, connect_timeout=60, step_timeout=30,
                                  compression="zstd", max_msg_size=4 * MB)
    zstd = Z.make_codec("zstd")
    # reset: its buffer's shape made 100x bigger (over max_msg_size, about nothing on the wire);
    # step 2 (request 3): observations that decompress to 64 MB where the layout has 56 kB
    bomber = BombingWorker(envs.unwrapped.url, {0: b"[200,84,84,4]", 3: zstd.compress(b"\0" * (64 * MB))})
    ref = gym.make_vec(PIXELS, num_envs=2, vectorization_mode="sync")
    try:
        with pytest.raises(ProtocolError, match="malformed reply"):
            envs.reset(seed=1)
        ref.reset(seed=1)
        assert_same(envs.reset(seed=2)[0], ref.reset(seed=2)[0])
        for i in range(1, 6):
            actions = np.array([i % 2, 1])
            want = ref.step(actions)
            if i == 2:
                with pytest.raises(ProtocolError, match="malformed reply"):
                    envs.step(actions)
                continue
            got = envs.step(actions)
            for a, b in zip(got[:4], want[:4]):
                assert_same(a, b)
        (c,) = conns(envs)
        assert c.active and c.codec.unzip.frames >= 4  # the same connection serves on, compressed
    finally:
        envs.close()
        bomber.close()
        ref.close()


def test_a_missing_library_is_a_clear_error(cli_workers, monkeypatch, tmp_path):
    fake = tmp_path / "lz4"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('not installed (test)')\n")
    proc = cli_workers.start("--url", "ws://127.0.0.1:9/ws", "--env", PIXELS, "--compression", "lz4",
                             env={"PYTHONPATH": f"{tmp_path}:{ROOT}"})
    code, out = cli_workers.finish(proc)
    assert code == 1 and "--compression lz4 needs" in out and "pip install ws_gym[compress]" in out, out
    blocked(monkeypatch, "lz4", "zstd")
    with pytest.raises(ImportError, match=r"compression='zstd' needs .*ws_gym\[compress\]"):
        ws_gym.RemoteVectorEnv(2, env_id=PIXELS, port=0, compression="zstd")
    envs = ws_gym.RemoteVectorEnv(2, env_id=PIXELS, port=0, compression="auto")  # auto: plain frames
    envs.close()
