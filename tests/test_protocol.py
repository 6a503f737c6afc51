"""Unit tests of ws_gym.protocol: handshake records, their checks, error replies."""

from __future__ import annotations

import dataclasses

import pytest
from gymnasium.vector import AutoresetMode

from ws_gym import codec
from ws_gym import protocol as P
from ws_gym.errors import ProtocolError, RemoteEnvError


def wire(body):
    """A body as the peer receives it: through the codec (strict, as the trainer sends)."""
    return codec.decode(codec.encode("x", 1, body, strict=True)).body


def test_constants():
    assert P.PROTOCOL_VERSION == 1
    assert set(P.AUTORESET_MODES) == {m.value for m in AutoresetMode}
    assert P.REQUESTS == {P.RESET, P.STEP, P.RENDER, P.CALL, P.SET_ATTR, P.CLOSE}
    kinds = [P.HELLO, P.WELCOME, P.REFUSE, P.READY, P.ACCEPT, *P.REQUESTS, P.OK, P.ERROR]
    assert len(set(kinds)) == len(kinds)


# --------------------------------------------------------------------- hello


@pytest.mark.parametrize("env_id", ["CartPole-v1", None, "ns/Env-v0", "x" * P.MAX_NAME])
@pytest.mark.parametrize("num_envs", [1, 8, P.MAX_ENVS_PER_WORKER])
def test_parse_hello_accepts_a_valid_hello(env_id, num_envs):
    body = P.make_hello(env_id, num_envs, "worker-1")
    hello = P.parse_hello(wire(body))
    assert hello == P.Hello(P.PROTOCOL_VERSION, env_id, num_envs, "worker-1")


def test_parse_hello_name_is_optional_and_capped():
    base = {"protocol": P.PROTOCOL_VERSION, "env_id": None, "num_envs": 2}
    assert P.parse_hello(base).name == "?"
    assert P.parse_hello({**base, "name": None}).name == "?"
    assert P.parse_hello({**base, "name": ""}).name == "?"
    assert P.parse_hello({**base, "name": "n" * 1000}).name == "n" * P.MAX_NAME
    assert P.parse_hello({**base, "extra": [1, 2]}).num_envs == 2  # unknown fields are ignored


@pytest.mark.parametrize("version", [0, 2, 99, -1, 2**64 - 1])
def test_parse_hello_refuses_a_version_mismatch_naming_both(version):
    body = {**P.make_hello("CartPole-v1", 1, "w"), "protocol": version}
    with pytest.raises(ProtocolError) as info:
        P.parse_hello(body)
    text = str(info.value)
    assert "version mismatch" in text
    assert f"version {P.PROTOCOL_VERSION}" in text and f"version {version}" in text


def test_version_is_checked_before_other_fields():
    # a future hello with fields we do not know still gets the clear answer
    for body in [{"protocol": 2}, {"protocol": 2, "num_envs": "many", "env_id": 5}]:
        with pytest.raises(ProtocolError, match="version mismatch"):
            P.parse_hello(body)


_HELLO = {"protocol": 1, "env_id": "CartPole-v1", "num_envs": 2, "name": "w"}


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "hello",
        1,
        {},
        {k: v for k, v in _HELLO.items() if k != "protocol"},
        {k: v for k, v in _HELLO.items() if k != "num_envs"},
        {**_HELLO, "protocol": "1"},
        {**_HELLO, "protocol": 1.0},
        {**_HELLO, "protocol": True},
        {**_HELLO, "protocol": None},
        {**_HELLO, "env_id": ""},
        {**_HELLO, "env_id": 5},
        {**_HELLO, "env_id": ["CartPole-v1"]},
        {**_HELLO, "env_id": "x" * (P.MAX_NAME + 1)},
        {**_HELLO, "num_envs": 0},
        {**_HELLO, "num_envs": -3},
        {**_HELLO, "num_envs": P.MAX_ENVS_PER_WORKER + 1},
        {**_HELLO, "num_envs": "2"},
        {**_HELLO, "num_envs": 2.0},
        {**_HELLO, "num_envs": True},
        {**_HELLO, "num_envs": None},
        {**_HELLO, "name": 5},
        {**_HELLO, "name": ["w"]},
        {**_HELLO, "worker_id": ""},
        {**_HELLO, "worker_id": 7},
        {**_HELLO, "worker_id": "a" * (P.MAX_WORKER_ID + 1)},
        {**_HELLO, "worker_id": "ab-cd"},
        {**_HELLO, "worker_id": "\u00e9t\u00e9"},
    ],
    ids=repr,
)
def test_parse_hello_refuses_bad_fields(body):
    with pytest.raises(ProtocolError, match="hello"):
        P.parse_hello(body)


def test_a_returning_worker_presents_its_id():
    assert P.parse_hello(wire(P.make_hello("CartPole-v1", 2, "w"))).worker_id is None
    assert "worker_id" not in P.make_hello("CartPole-v1", 2, "w")
    hello = P.parse_hello(wire(P.make_hello("CartPole-v1", 2, "w", "0f3a" * 8)))
    assert hello.worker_id == "0f3a" * 8


# ------------------------------------------------------------------- welcome

_W = P.Welcome(
    env_id="CartPole-v1",
    env_kwargs={"render_mode": None, "sutton_barto_reward": True},
    num_envs=3,
    first_index=5,
    mode=P.MODE_VECTOR,
    autoreset_mode="SameStep",
    max_episode_steps=200,
)


@pytest.mark.parametrize(
    "welcome",
    [
        _W,
        dataclasses.replace(_W, env_kwargs={}, max_episode_steps=None),
        dataclasses.replace(_W, heartbeat=2.5, worker_id="9" * P.MAX_WORKER_ID),
        dataclasses.replace(_W, mode=P.MODE_SINGLE, num_envs=1, first_index=0),
        *[dataclasses.replace(_W, autoreset_mode=m) for m in P.AUTORESET_MODES],
        dataclasses.replace(_W, env_kwargs={"nested": {"a": [1, 2.5, None]}, "t": (1, 2)}),
    ],
)
def test_welcome_round_trip(welcome):
    assert P.parse_welcome(wire(P.make_welcome(welcome))) == welcome


_WB = P.make_welcome(_W)


def _wb(**kw):
    return {**_WB, **kw}


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {},
        *[{k: v for k, v in _WB.items() if k != missing}
          for missing in _WB
          if missing not in ("max_episode_steps", "record_episode_statistics", "heartbeat", "worker_id")],
        _wb(worker_id=""),
        _wb(worker_id=1),
        _wb(worker_id="x" * (P.MAX_WORKER_ID + 1)),
        _wb(worker_id="a b"),
        _wb(record_episode_statistics=1),
        _wb(heartbeat=0),
        _wb(heartbeat=-1.0),
        _wb(heartbeat="10"),
        _wb(heartbeat=1e9),
        _wb(env_id=None),
        _wb(env_id=""),
        _wb(env_id=3),
        _wb(env_id="e" * (P.MAX_NAME + 1)),
        _wb(env_kwargs=None),
        _wb(env_kwargs=[["a", 1]]),
        _wb(env_kwargs={1: "a"}),
        _wb(env_kwargs={("a",): 1}),
        _wb(num_envs=0),
        _wb(num_envs=P.MAX_ENVS_PER_WORKER + 1),
        _wb(num_envs="3"),
        _wb(num_envs=True),
        _wb(first_index=-1),
        _wb(first_index=1.0),
        _wb(first_index=None),
        _wb(mode="multi"),
        _wb(mode=None),
        _wb(mode=1),
        _wb(autoreset_mode="nextstep"),
        _wb(autoreset_mode="NEXT_STEP"),
        _wb(autoreset_mode=None),
        _wb(mode=P.MODE_SINGLE, num_envs=2),
        _wb(max_episode_steps="100"),
        _wb(max_episode_steps=1.5),
        _wb(max_episode_steps=[100]),
    ],
    ids=repr,
)
def test_parse_welcome_refuses_bad_fields(body):
    with pytest.raises(ProtocolError, match="welcome"):
        P.parse_welcome(body)


def test_parse_welcome_max_episode_steps_is_optional():
    body = {k: v for k, v in _WB.items() if k != "max_episode_steps"}
    assert P.parse_welcome(body).max_episode_steps is None
    assert P.parse_welcome(_wb(max_episode_steps=None)).max_episode_steps is None


# --------------------------------------------------------------------- ready

_READY = {
    "observation_space": {"type": "Box", "dtype": "<f4", "shape": [4], "low": "-inf", "high": "inf"},
    "action_space": {"type": "Discrete", "n": 2, "start": 0, "dtype": "<i8"},
    "render_mode": "rgb_array",
    "metadata": {"render_modes": ["human", "rgb_array"], "render_fps": 50},
}


def test_parse_ready():
    ready = P.parse_ready(wire(_READY))
    assert ready == P.Ready(_READY["observation_space"], _READY["action_space"], "rgb_array", _READY["metadata"])
    minimal = {"observation_space": _READY["observation_space"], "action_space": _READY["action_space"]}
    ready = P.parse_ready(minimal)
    assert ready.render_mode is None and ready.metadata == {}
    ready = P.parse_ready({**minimal, "render_mode": None, "metadata": None})
    assert ready.render_mode is None and ready.metadata == {}


@pytest.mark.parametrize(
    "body",
    [
        None,
        "ready",
        {},
        {"action_space": _READY["action_space"]},
        {"observation_space": _READY["observation_space"]},
        {**_READY, "observation_space": None},
        {**_READY, "observation_space": "Box"},
        {**_READY, "action_space": [1]},
        {**_READY, "render_mode": 5},
        {**_READY, "render_mode": ["human"]},
        {**_READY, "metadata": []},
        {**_READY, "metadata": "x"},
    ],
    ids=repr,
)
def test_parse_ready_refuses_bad_fields(body):
    with pytest.raises(ProtocolError, match="ready"):
        P.parse_ready(body)


# -------------------------------------------------------------------- refuse


def test_parse_reason():
    assert P.parse_reason({"reason": "bad token"}) == "bad token"
    assert P.parse_reason(wire({"reason": "r" * 5000})) == "r" * 2000
    for body in [None, {}, {"reason": 5}, {"reason": None}, ["reason"], "reason"]:
        assert P.parse_reason(body) == "no reason given"


# --------------------------------------------------------------------- errors


class EnvFailure(RuntimeError):
    class Inner(Exception):
        pass


def _raise_in_env(exc):
    def step_the_env():
        raise exc

    try:
        step_the_env()
    except BaseException as caught:
        return caught


def test_error_body_carries_type_message_and_traceback():
    exc = _raise_in_env(ValueError("the pole fell over"))
    body = P.error_body(exc)
    assert set(body) == {"type", "message", "traceback"}
    assert body["type"] == "ValueError"
    assert body["message"] == "the pole fell over"
    tb = body["traceback"]
    assert tb.startswith("Traceback (most recent call last):")
    assert "step_the_env" in tb and "ValueError: the pole fell over" in tb
    assert wire(body) == body


def test_error_body_uses_the_qualified_name_and_chained_causes():
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise EnvFailure.Inner("outer") from inner
    except EnvFailure.Inner as exc:
        body = P.error_body(exc)
    assert body["type"] == "EnvFailure.Inner"
    assert body["message"] == "outer"
    assert "KeyError: 'inner'" in body["traceback"] and "direct cause" in body["traceback"]


def test_error_body_limits_sizes():
    exc = _raise_in_env(RuntimeError("m" * 30_000))
    body = P.error_body(exc)
    assert body["message"] == "m" * 4000
    assert len(body["traceback"]) == 20_000
    assert body["traceback"].endswith("m" * 100 + "\n")  # the end is what matters


def test_error_body_of_an_exception_never_raised():
    body = P.error_body(TimeoutError("late"))
    assert body == {"type": "TimeoutError", "message": "late", "traceback": "TimeoutError: late\n"}


def test_error_body_survives_a_broken_str():
    class Broken(Exception):
        def __str__(self):
            raise RuntimeError("str failed")

    body = P.error_body(_raise_in_env(Broken()))
    assert body["type"] == "test_error_body_survives_a_broken_str.<locals>.Broken"
    assert body["message"] == "<exception str() failed>"
    assert "Broken" in body["traceback"] and "_raise_in_env" in body["traceback"]
    assert wire(body) == body


def test_parse_error_round_trip():
    exc = _raise_in_env(ValueError("the pole fell over"))
    err = P.parse_error(wire(P.error_body(exc)), "worker w1 (envs 0-3)")
    assert isinstance(err, RemoteEnvError)
    assert err.remote_type == "ValueError"
    assert err.remote_message == "the pole fell over"
    assert "step_the_env" in err.remote_traceback
    assert err.origin == "worker w1 (envs 0-3)"
    text = str(err)
    assert text.startswith("ValueError in worker w1 (envs 0-3): the pole fell over")
    assert "--- remote traceback ---" in text and "step_the_env" in text


@pytest.mark.parametrize(
    "body,expected",
    [
        (None, ("ProtocolError", "malformed error reply", "")),
        ("boom", ("ProtocolError", "malformed error reply", "")),
        ([1, 2], ("ProtocolError", "malformed error reply", "")),
        ({}, ("Exception", "", "")),
        ({"type": 5, "message": None, "traceback": [1]}, ("Exception", "", "")),
        ({"type": "", "message": "m"}, ("Exception", "m", "")),
        ({"type": "KeyError", "message": "'k'", "traceback": "tb"}, ("KeyError", "'k'", "tb")),
    ],
    ids=repr,
)
def test_parse_error_never_raises(body, expected):
    err = P.parse_error(body, "w")
    assert isinstance(err, RemoteEnvError)
    assert (err.remote_type, err.remote_message, err.remote_traceback) == expected
    assert err.origin == "w"
    str(err)


def test_remote_env_error_without_traceback_or_origin():
    err = RemoteEnvError("KeyError", "'k'")
    assert str(err) == "KeyError: 'k'"
