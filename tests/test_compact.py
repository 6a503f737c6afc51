"""Compact step frames (ws_gym.compact): pure tests, no I/O, plus one check over
real sockets that the trainer and its local workers do use them."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

from ws_gym.config import Transport
import ws_gym
from ws_gym import codec, compact
from ws_gym import protocol as P
from ws_gym.errors import ProtocolError
from ws_gym.spaces import space_to_schema

from .conftest import assert_same


def layout(obs_space, act_space, count=4, single=False):
    return compact.layout_for(space_to_schema(obs_space), space_to_schema(act_space), count, single)


CARTPOLE_OBS = spaces.Box(-np.inf, np.inf, (4,), np.float32)
IMAGE = spaces.Box(0, 255, (84, 84, 4), np.uint8)


def vector_result(n=4, seed=0, obs_space=CARTPOLE_OBS):
    rng = np.random.default_rng(seed)
    obs = np.stack([obs_space.sample() for _ in range(n)])
    return {"o": obs, "r": rng.normal(size=n), "t": rng.integers(0, 2, n).astype(bool),
            "u": rng.integers(0, 2, n).astype(bool), "f": []}


def generic(rid, body):
    """What the general codec gives for the same reply: the compact path must equal it."""
    msg = codec.decode(codec.encode(P.OK, rid, body))
    return msg.id, msg.body


def assert_same_typed(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same_typed(a[k], b[k])
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert not a.flags.writeable and not b.flags.writeable
        assert_same(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("obs_space, act_space", [
    (CARTPOLE_OBS, spaces.Discrete(2)),
    (IMAGE, spaces.Box(-1, 1, (3,), np.float32)),
    (spaces.Discrete(7), spaces.MultiDiscrete([3, 4])),
    (spaces.MultiBinary(5), spaces.MultiBinary([2, 3])),
    (spaces.Box(0, 1, (3,), np.float16), spaces.Discrete(3, start=-1)),
])
@pytest.mark.parametrize("count", [1, 3])
def test_vector_frames_round_trip_as_the_codec_would(obs_space, act_space, count):
    lay = layout(obs_space, act_space, count)
    assert lay is not None
    batch_act = gym.vector.utils.batch_space(act_space, count)
    actions = batch_act.sample()
    frame = lay.encode_request(2**64 - 1, actions)
    assert frame[:4] == compact.REQUEST and len(frame) == lay.request_size
    rid, got = lay.decode_request(frame)
    assert rid == 2**64 - 1
    assert_same_typed(got, generic(0, {"a": actions})[1]["a"])

    body = vector_result(count, obs_space=obs_space)
    reply = lay.encode_reply(9, body)
    assert reply is not None and reply[:4] == compact.REPLY and len(reply) == lay.reply_size
    rid, got = lay.decode_reply(reply)
    assert rid == 9
    assert_same_typed(got, generic(9, body)[1])
    # any buffer the frame layer hands over gives the same, read-only, views
    for buf in (bytearray(reply), memoryview(bytearray(reply)), memoryview(reply)):
        assert_same_typed(lay.decode_reply(buf)[1], got)


def test_single_env_frames_keep_python_and_numpy_types():
    lay = layout(CARTPOLE_OBS, spaces.Discrete(2), 1, single=True)
    frame = lay.encode_request(3, np.int64(1))
    rid, action = lay.decode_request(frame)
    assert rid == 3 and type(action) is np.int64 and action == 1
    assert_same_typed(action, generic(0, {"a": np.int64(1)})[1]["a"])

    env = gym.make("CartPole-v1")
    env.reset(seed=0)
    obs, r, t, u, info = env.step(1)
    body = {"o": obs, "r": r, "t": t, "u": u, "info": info}
    rid, got = lay.decode_reply(lay.encode_reply(4, body))
    assert rid == 4
    assert_same_typed(got, generic(4, body)[1])
    assert type(got["r"]) is float and type(got["t"]) is bool

    box = layout(CARTPOLE_OBS, spaces.Box(-1, 1, (2,), np.float32), 1, single=True)
    act = np.array([0.5, -0.25], np.float32)
    assert_same_typed(box.decode_request(box.encode_request(1, act))[1], generic(0, {"a": act})[1]["a"])


def test_what_does_not_fit_exactly_goes_by_the_codec():
    lay = layout(CARTPOLE_OBS, spaces.Discrete(2), 4)
    good = vector_result()
    for actions in (np.array([0, 1, 0, 1], np.int32), np.array([0, 1, 0]), [0, 1, 0, 1],
                    np.array([[0, 1, 0, 1]]), np.int64(1)):
        assert lay.encode_request(1, actions) is None, actions
    misfits = {
        "an info": dict(good, f=[[0, {"x": 1}]]),
        "float32 obs": dict(good, o=good["o"].astype(np.float64)),
        "3 envs' obs": dict(good, o=good["o"][:3]),
        "float32 rewards": dict(good, r=good["r"].astype(np.float32)),
        "int8 flags": dict(good, t=good["t"].astype(np.int8)),
        "list rewards": dict(good, r=good["r"].tolist()),
        "an extra key": dict(good, zzz=1),
        "no infos log": {k: v for k, v in good.items() if k != "f"},
        "not a dict": [good],
    }
    for what, body in misfits.items():
        assert lay.encode_reply(1, body) is None, what
    # strided arrays are fine: copied into the frame
    strided = dict(good, o=np.asfortranarray(good["o"]), r=np.repeat(good["r"], 2)[::2])
    assert_same_typed(lay.decode_reply(lay.encode_reply(1, strided))[1], generic(1, strided)[1])

    single = layout(CARTPOLE_OBS, spaces.Discrete(2), 1, single=True)
    obs = np.zeros(4, np.float32)
    ok = {"o": obs, "r": 1.0, "t": False, "u": False, "info": {}}
    assert single.encode_reply(1, ok) is not None
    for what, body in {
        "np.float64 reward": dict(ok, r=np.float64(1.0)),
        "int reward": dict(ok, r=1),
        "np.bool_ flag": dict(ok, t=np.bool_(False)),
        "an info": dict(ok, info={"x": 1}),
        "an array info": dict(ok, info=np.zeros(2)),
    }.items():
        assert single.encode_reply(1, body) is None, what
    assert single.encode_request(1, np.array(1)) is None  # a 0-d array stays a 0-d array, by the codec
    assert single.encode_request(1, 1) is None  # a Python int stays an int


def test_spaces_without_a_compact_form():
    assert layout(spaces.Dict({"a": CARTPOLE_OBS}), spaces.Discrete(2)) is None
    assert layout(CARTPOLE_OBS, spaces.Tuple((spaces.Discrete(2), spaces.Discrete(3)))) is None
    assert layout(spaces.Text(5), spaces.Discrete(2)) is None
    assert compact.layout_for({"type": "Nonsense"}, {}, 2, False) is None


def test_malformed_frames_raise_protocol_error_only():
    lay = layout(CARTPOLE_OBS, spaces.Discrete(2), 4)
    req = lay.encode_request(5, np.array([0, 1, 1, 0]))
    rep = lay.encode_reply(5, vector_result())
    other = layout(CARTPOLE_OBS, spaces.Box(-1, 1, (1,), np.float64), 4)  # same sizes, other layout
    assert other.request_size == lay.request_size and other.tag != lay.tag
    bad = {
        "request truncated": (lay.decode_request, req[:-1]),
        "request too long": (lay.decode_request, req + bytes(8)),
        "request of another layout": (other.decode_request, req),
        "reply as request": (lay.decode_request, rep),
        "reply truncated": (lay.decode_reply, rep[:-1]),
        "reply too long": (lay.decode_reply, rep + b"\0"),
        "request as reply": (lay.decode_reply, req + bytes(len(rep) - len(req))),
        "flag byte 2": (lay.decode_reply, rep[:-1] + b"\x02"),
        "flag byte 255": (lay.decode_reply, rep[:-5] + b"\xff" + rep[-4:]),
        "magic only": (lay.decode_reply, compact.REPLY),
        "empty": (lay.decode_reply, b""),
    }
    for what, (fn, frame) in bad.items():
        with pytest.raises(ProtocolError):
            fn(frame)
    tagged = rep[:4] + (lay.tag ^ 0xFFFF).to_bytes(4, "little") + rep[8:]
    with pytest.raises(ProtocolError, match="another layout"):
        lay.decode_reply(tagged)
    rng = np.random.default_rng(0)
    for n in range(300):  # random bytes behind the magic: an error, never a wrong value
        tail = rng.bytes(int(rng.integers(0, 2 * lay.reply_size)))
        for magic, fn in ((compact.REQUEST, lay.decode_request), (compact.REPLY, lay.decode_reply)):
            with pytest.raises(ProtocolError):
                fn(magic + tail)


def test_the_codec_never_mistakes_a_compact_frame_for_its_own():
    lay = layout(CARTPOLE_OBS, spaces.Discrete(2), 4)
    for frame in (lay.encode_request(1, np.array([0, 1, 1, 0])), lay.encode_reply(1, vector_result())):
        with pytest.raises(ProtocolError, match="header length"):
            codec.decode(frame)


@pytest.mark.parametrize("switch", ["1", "0"])
def test_trainer_and_local_workers_step_by_compact_frames(monkeypatch, switch):
    """Over real sockets: 6 envs in 2 local workers use compact frames (or not, with
    a Transport with compact=False), episode ends with infos go by the codec, and every
    result equals SyncVectorEnv's."""
    kw = dict(max_episode_steps=15, record_episode_statistics=True, transport=Transport(compact=switch == "1"))
    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=6, env_id="CartPole-v1", port=0, local_workers=2, **kw)
    ref = gym.make_vec("CartPole-v1", 6, vectorization_mode="sync",
                       wrappers=[gym.wrappers.RecordEpisodeStatistics], max_episode_steps=15)
    try:
        assert_same(envs.reset(seed=5), ref.reset(seed=5))
        conns = envs.unwrapped._trainer.serving()
        assert len(conns) == 2
        used = {"compact": 0, "codec": 0}
        for conn in conns:
            if switch == "0":
                assert conn.codec.layout is None
                continue
            assert conn.codec.layout is not None and conn.codec.layout.count == conn.count
            real = conn.codec.layout.reply_id  # every compact reply is checked by it, copied or decoded

            def counting(frame, real=real):
                used["compact"] += 1
                return real(frame)

            conn.codec.layout.reply_id = counting
        real_decode = codec.decode

        def counting_decode(frame, **kw):
            used["codec"] += 1
            return real_decode(frame, **kw)

        monkeypatch.setattr(codec, "decode", counting_decode)
        rng = np.random.default_rng(1)
        ended = 0
        for _ in range(60):
            actions = rng.integers(0, 2, 6)
            got, want = envs.step(actions), ref.step(actions)
            for infos in (got[4], want[4]):
                if "episode" in infos:  # its "t" is wall-clock time; dtype and mask still compared
                    infos["episode"]["t"] = infos["episode"]["t"].astype(np.float64) * 0
            assert_same(got, want)
            ended += int(np.sum(want[2] | want[3]))
        assert ended > 0  # episode ends (with "episode" infos) were part of it
        if switch == "1":
            assert used["compact"] > 0 and used["codec"] > 0  # infos at episode ends: by the codec
            assert used["compact"] + used["codec"] == 2 * 60
        else:
            assert used["codec"] == 2 * 60
    finally:
        envs.close()
        ref.close()


def test_single_remote_env_steps_by_compact_frames(monkeypatch):
    env = gym.make("ws_gym/Remote-v0", env_id="CartPole-v1", port=0, local_workers=1,
                   transport=Transport())  # whatever the caller's environment says
    ref = gym.make("CartPole-v1")
    try:
        assert_same(env.reset(seed=3), ref.reset(seed=3))
        (conn,) = env.unwrapped._trainer.serving()
        assert conn.codec.layout is not None and conn.codec.layout.single
        real, used = conn.codec.layout.reply_body, []  # what a compact reply without a sink is decoded by
        conn.codec.layout.reply_body = lambda frame: used.append(1) or real(frame)
        for i in range(400):
            # np.int64 (Discrete.sample()'s type): compact; a Python int: by the codec, as an int
            action = np.int64(i % 3 // 2) if i % 2 else i % 3 // 2
            got, want = env.step(action), ref.step(action)
            assert_same(got, want)
            assert type(got[1]) is type(want[1]) and type(got[2]) is type(want[2])
            if want[2] or want[3]:
                assert_same(env.reset(seed=i), ref.reset(seed=i))
        assert len(used) == 200  # the np.int64 steps; the int ones go by the codec both ways
    finally:
        env.close()
        ref.close()


@pytest.mark.parametrize("obs_space", [CARTPOLE_OBS, IMAGE, spaces.Discrete(7), spaces.MultiBinary(5),
                                       spaces.Box(0, 1, (3,), np.float16)])
def test_copy_reply_puts_a_reply_in_its_rows_as_decoding_would(obs_space):
    lay = layout(obs_space, spaces.Discrete(2), count=3)
    body = vector_result(3, seed=4, obs_space=obs_space)
    body["o"] = body["o"].astype(lay.obs_dtype)
    frame = lay.encode_reply(11, body)
    assert b"".join(lay.encode_reply(11, body, parts=True)) == frame  # the same bytes, in pieces
    assert lay.reply_id(frame) == 11
    n = 7  # a batch of 7 envs; this worker's 3 are rows 2..4
    obs = np.full((n, *lay.obs_shape[1:]), 9, lay.obs_dtype)
    r, t, u = np.full(n, -1.0), np.ones(n, bool), np.zeros(n, bool)
    lay.copy_reply(memoryview(frame), lay.byte_views(obs, r, t, u), 2)
    _, want = lay.decode_reply(frame)
    assert_same(obs[2:5], want["o"]) and assert_same(r[2:5], want["r"])
    assert_same(t[2:5], want["t"]) and assert_same(u[2:5], want["u"])
    others = np.r_[0:2, 5:7]  # nothing else was touched
    assert (obs[others] == 9).all() and (r[others] == -1).all() and t[others].all() and not u[others].any()
    with pytest.raises(ValueError):  # another dtype is never filled byte for byte
        lay.byte_views(obs.astype(np.float64 if lay.obs_dtype != np.float64 else np.float32), r, t, u)
    with pytest.raises(ValueError):
        lay.byte_views(obs, r.astype(np.float32), t, u)
    with pytest.raises(ValueError):  # nor a strided view
        lay.byte_views(np.zeros((2 * n, *lay.obs_shape[1:]), lay.obs_dtype)[::2], r, t, u)
    with pytest.raises(ValueError):  # nor rows past the end
        lay.copy_reply(frame, lay.byte_views(obs, r, t, u), 5)
