"""Ray RLlib's EnvRunners with their envs in ws_gym workers.

RLlib builds one vector env per EnvRunner, inside that EnvRunner's process.
:func:`remote_envs` turns an ``AlgorithmConfig`` into one whose EnvRunners
each start a trainer (a :class:`~ws_gym.RemoteVectorEnv`) on a port of their
own, ``port + worker_index``, or with ``relay=`` a room of their own::

    config = PPOConfig().environment("CartPole-v1").env_runners(num_env_runners=2, num_envs_per_env_runner=4)
    config = ws_gym.rllib.remote_envs(config, port=0, local_workers=1)
    algo = config.build_algo()

Evaluation EnvRunners listen after the training ones (:func:`runner_port`).
One URL serves the PCs of a whole run: :class:`RunURL`, on ``port`` itself,
sends each worker that dials it on to an EnvRunner that still needs envs, so
every PC runs the same command, and a worker whose EnvRunner died (RLlib
restarts it on the same port) comes back through it. Lost workers are waited
for, not turned into a stream of empty episodes (:class:`PauseForLostEnvs`).

It needs the ``rllib`` extra (``pip install ws_gym[rllib]``); ``import ws_gym``
does not import this module.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hashlib
import hmac
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

try:
    from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
    from ray.tune.registry import register_env
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError("ws_gym.rllib needs Ray RLlib: pip install 'ws_gym[rllib]'") from exc

import aiohttp
from aiohttp import web

from .addresses import format_url, is_loopback
from .config import RemoteConfig
from .protocol import TOKEN_ENV
from .vector import LOST_KEY, RemoteVectorEnv

__all__ = ["remote_envs", "runner_port", "runner_urls", "envrunner_urls", "RemoteEnvRunner", "PauseForLostEnvs",
           "RunURL", "make_env"]

log = logging.getLogger("ws_gym")

KEY = "ws_gym"  # the entry of env_config that holds ws_gym's settings
ENV_NAME = "ws_gym/Remote"  # the env creator's name in RLlib's registry
DEFAULT_PORT = 8765


@dataclass(frozen=True)
class _Runner:
    """Which EnvRunner is making its env (set by :class:`RemoteEnvRunner`)."""

    worker_index: int
    evaluation: bool


_RUNNER: contextvars.ContextVar[_Runner | None] = contextvars.ContextVar("ws_gym_rllib_runner", default=None)


def runner_port(port: int, worker_index: int, *, evaluation: bool = False, num_env_runners: int = 0) -> int:
    """The port EnvRunner ``worker_index`` listens on.

    Training EnvRunners on ``port + worker_index`` (the local one, index 0,
    makes envs only when there are no remote ones); evaluation EnvRunners
    after them, on ``port + num_env_runners + 1 + worker_index``. ``port`` 0
    stays 0: every EnvRunner takes a free port (fine for local workers and
    the relay, whose URLs do not depend on it).
    """
    if port == 0:
        return 0
    return port + worker_index + (num_env_runners + 1 if evaluation else 0)


def remote_envs(config: AlgorithmConfig, *, port: int = DEFAULT_PORT, host: str = "127.0.0.1",
                token: str | None = None, on_worker_lost: str = "wait", lost_timeout: float = 120.0,
                **options: Any) -> AlgorithmConfig:
    """A copy of ``config`` whose EnvRunners host their envs in ws_gym workers.

    Call it once the config names its env (``.environment("CartPole-v1",
    env_config={...})``: the id and keyword arguments the workers'
    ``gym.make`` gets) and its EnvRunners (``num_env_runners``,
    ``num_envs_per_env_runner``, evaluation): the ports follow from them.

    Args:
        config: an RLlib ``AlgorithmConfig`` on the new API stack, with a
            gymnasium id as env and the default EnvRunner class.
        port: the run's port: EnvRunner ``i`` listens on ``port + i`` (see
            :func:`runner_port`), :class:`RunURL` on ``port`` itself; ``0``:
            free ports (local workers or a relay only).
        host: where the EnvRunners listen (``"0.0.0.0"`` for other PCs).
        token: the workers' token, one for the whole run; ``None``: generated
            here when other PCs can dial in (``host`` off loopback, a relay).
        on_worker_lost: ``"wait"`` (default): a lost worker's envs end their
            episodes as truncated and the EnvRunner waits up to
            ``lost_timeout`` seconds for a worker to take them over;
            ``"raise"``: ``WorkerLostError`` reaches RLlib, whose
            ``fault_tolerance`` settings decide (rebuilding the env closes
            its trainer, which sends its other workers home: for local
            workers only).
        lost_timeout: seconds an EnvRunner waits for lost envs' new worker
            before it steps on without them (their steps then truncate).
        **options: other options of :class:`~ws_gym.RemoteVectorEnv`
            (``local_workers``, ``relay``, ``relay_token``, ``connect_timeout``,
            ``step_timeout``, ``heartbeat``, ...).

    Returns:
        The new config (``config`` itself is left as it was).

    Raises:
        TypeError, ValueError: the config or an option cannot be served.
    """
    if config.env == ENV_NAME:
        raise ValueError("this config was made by remote_envs already: pass the config it started from")
    if not isinstance(config.env, str):
        raise TypeError(f"remote_envs needs the env as a gymnasium id string (the workers make it), "
                        f"got {config.env!r}")
    if config.env_runner_cls not in (None, SingleAgentEnvRunner, RemoteEnvRunner):
        raise ValueError(f"remote_envs replaces the EnvRunner class; this config has its own: {config.env_runner_cls}")
    if lost_timeout < 0:
        raise ValueError(f"lost_timeout must be >= 0, got {lost_timeout!r}")
    generated = token is None and (not is_loopback(host) or options.get("relay") is not None)
    if generated:
        token = secrets.token_urlsafe(24)  # one token for the run: one worker command for every EnvRunner
    run_options: dict[str, Any] = {"host": host, "token": token, "on_worker_lost": on_worker_lost, **options}
    # checked here, in the driver, not first in every EnvRunner
    checked = RemoteConfig.from_options({**run_options, "env_id": config.env, "port": port}, "remote_envs")
    if checked.relay is not None:  # maybe read from the driver's environment, which EnvRunners may not share
        run_options["relay_token"] = checked.relay_token
    settings: dict[str, Any] = {
        # derives each EnvRunner's relay room, the same after a restart (relay_room)
        "room_secret": secrets.token_urlsafe(32) if checked.relay is not None else None,
        "env_id": config.env,
        "env_kwargs": dict(config.env_config),
        "port": port,
        "num_env_runners": int(config.num_env_runners or 0),
        "lost_timeout": float(lost_timeout),
        "token_generated": generated,  # shown in full in RunURL's command (else as a placeholder)
        "options": run_options,
    }
    register_env(ENV_NAME, make_env)  # by name: RLlib takes a creator function only from its registry
    new = config.copy(copy_frozen=False)
    new.environment(env=ENV_NAME, env_config={KEY: settings})
    new.env_runners(env_runner_cls=RemoteEnvRunner, gym_env_vectorize_mode="vector_entry_point")
    return new


def settings_of(config: AlgorithmConfig) -> dict[str, Any]:
    """ws_gym's settings in a config made by :func:`remote_envs`."""
    try:
        return config.env_config[KEY]
    except (KeyError, TypeError):
        raise ValueError("this config was not made by ws_gym.rllib.remote_envs") from None


def runner_urls(config: AlgorithmConfig, public_host: str | None = None) -> dict[str, str]:
    """The URL each EnvRunner's workers dial, by name (``"env_runner 1"``,
    ``"evaluation 1"``, ...), for a run without a relay and with a fixed port.

    ``public_host``: the name PCs reach this machine by (default: ``host``).
    """
    settings = settings_of(config)
    port, n = settings["port"], settings["num_env_runners"]
    if port == 0 or settings["options"].get("relay") is not None:
        raise ValueError("with port=0 or a relay the EnvRunners' URLs are known once they start: they print them")
    host = _shown_host(public_host or settings["options"]["host"])
    urls = {f"env_runner {i}": format_url(host, runner_port(port, i, num_env_runners=n))
            for i in range(1 if n else 0, n + 1)}
    evaluators = int(config.evaluation_num_env_runners or 0)
    if config.evaluation_interval:
        for i in range(1 if evaluators else 0, evaluators + 1):
            urls[f"evaluation {i}"] = format_url(host, runner_port(port, i, evaluation=True, num_env_runners=n))
    return urls


def _shown_host(host: str) -> str:
    """The host PCs dial: this machine's name for a trainer listening everywhere (as the trainer says)."""
    return socket.gethostname() if host in ("0.0.0.0", "::", "") else host


def envrunner_urls(algo: Any) -> dict[str, str]:
    """The URL each running EnvRunner's workers dial (a relay's room URL with
    ``relay=``), by name as in :func:`runner_urls`, asked of the EnvRunners
    themselves: for runs whose URLs are known only once they start."""
    def url(runner: Any) -> tuple[int, str | None]:
        env = getattr(runner.env, "unwrapped", None)
        return int(runner.worker_index or 0), env.url if isinstance(env, RemoteVectorEnv) else None

    urls = {}
    for group, name in ((algo.env_runner_group, "env_runner"), (getattr(algo, "eval_env_runner_group", None),
                                                                 "evaluation")):
        if group is not None:
            for index, address in group.foreach_env_runner(url):
                if address is not None:
                    urls[f"{name} {index}"] = address
    return urls


def relay_room(secret: str, worker_index: int, evaluation: bool) -> tuple[str, str]:
    """The relay room id and key of an EnvRunner: the same at each of its
    restarts, and unguessable without the run's ``secret``."""
    label = f"{'evaluation' if evaluation else 'env_runner'} {worker_index}"

    def derive(what: str) -> str:
        digest = hmac.new(secret.encode(), f"{what} {label}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:24]).decode()  # 32 of A-Z a-z 0-9 - _

    return derive("room"), derive("key")


class RemoteEnvRunner(SingleAgentEnvRunner):
    """RLlib's ``SingleAgentEnvRunner``, telling :func:`make_env` which EnvRunner
    it builds for (RLlib hands a vector env creator a plain dict, without the
    ``worker_index`` of its ``EnvContext``)."""

    def make_env(self) -> None:
        token = _RUNNER.set(_Runner(int(self.worker_index or 0), bool(self.config.in_evaluation)))
        try:
            super().make_env()
        finally:
            _RUNNER.reset(token)


def make_env(env_config: dict[str, Any]) -> gym.vector.VectorEnv:
    """The vector env of the EnvRunner being built: ``env_config["num_envs"]``
    envs in ws_gym workers, the trainer on this EnvRunner's port (or room)."""
    runner = _RUNNER.get()
    if runner is None:
        raise RuntimeError("ws_gym.rllib.make_env runs inside ws_gym.rllib.RemoteEnvRunner: make the config "
                           "with ws_gym.rllib.remote_envs")
    settings = env_config[KEY]
    options = dict(settings["options"])
    if options.get("relay") is not None:  # the same room at each restart: its workers' URL stays valid
        options["relay_room"] = relay_room(settings["room_secret"], runner.worker_index, runner.evaluation)
    if options.get("relay") is None:
        options["port"] = runner_port(settings["port"], runner.worker_index, evaluation=runner.evaluation,
                                      num_env_runners=settings["num_env_runners"])
    envs = RemoteVectorEnv(num_envs=int(env_config.get("num_envs", 1)), env_id=settings["env_id"],
                           env_kwargs=settings["env_kwargs"], **options)
    what = "evaluation EnvRunner" if runner.evaluation else "EnvRunner"
    log.info("ws_gym: %s %d serves its envs at %s", what, runner.worker_index, envs.url)
    if options.get("on_worker_lost") == "wait":
        return PauseForLostEnvs(envs, settings["lost_timeout"])
    return envs


class PauseForLostEnvs(gym.vector.VectorWrapper):
    """After a step that ended lost envs' episodes, wait for their new worker.

    In ``on_worker_lost="wait"`` mode every step of an env without a worker
    is a truncation; RLlib would record each as a one-step episode of return
    0. So the step after the one that ended them first waits (up to
    ``timeout`` seconds) until every env has a worker again; the new worker's
    first observation then starts the next episode, as after any truncation.
    """

    def __init__(self, env: RemoteVectorEnv, timeout: float) -> None:
        super().__init__(env)
        self.timeout = timeout
        self._lost = False  # the last step ended lost envs' episodes
        self._gave_up = False  # waited in vain: step on until every env has a worker again

    def step(self, actions: Any) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
        if self._lost and not self._gave_up:
            self._gave_up = not self._await_workers()
        obs, rewards, terminated, truncated, infos = self.env.step(actions)
        self._lost = bool(np.any(infos.get("_" + LOST_KEY, False)))
        self._gave_up = self._gave_up and self._lost
        return obs, rewards, terminated, truncated, infos

    def _await_workers(self) -> bool:
        """Whether every env has a worker again within ``timeout`` (checked every 50 ms)."""
        remote = self.env.unwrapped
        assert isinstance(remote, RemoteVectorEnv)
        deadline = time.monotonic() + self.timeout
        while not _all_served(remote):
            if time.monotonic() > deadline:
                log.warning("ws_gym: envs still without a worker after %g s; stepping on without them "
                            "(each of their steps is a truncation) until workers come", self.timeout)
                return False
            time.sleep(0.05)
        return True


def _all_served(remote: RemoteVectorEnv) -> bool:
    run = remote.stats()["run"]
    return bool(run["envs_served"] >= run["num_envs"])


class RunURL:
    """One URL for the PCs of a whole run, on the run's ``port``.

    A worker that dials it is redirected (HTTP 307, which the worker follows
    with its token) to the EnvRunner that lacks the most envs, read from each
    EnvRunner's ``/status``; while none lacks any, it is told to come back
    later (HTTP 503, retried). It runs in the driver, on its own thread, and
    needs the EnvRunners on this machine (one Ray node); on a cluster give
    each PC its EnvRunner's URL (:func:`runner_urls`).
    """

    RESERVE = 10.0  # seconds a redirect counts against its EnvRunner until its worker shows up

    def __init__(self, config: AlgorithmConfig, public_host: str | None = None) -> None:
        settings = settings_of(config)
        options = settings["options"]
        if settings["port"] == 0 or options.get("relay") is not None:
            raise ValueError("RunURL needs a fixed port= and no relay")
        if settings["num_env_runners"] == 0:
            raise ValueError("with num_env_runners=0 the one EnvRunner listens on port itself: PCs dial it directly")
        if any(options.get(k) is not None for k in ("certfile", "ssl_context", "public_url")):
            raise ValueError("RunURL serves plain ws:// on the EnvRunners' own ports: with TLS or a reverse proxy "
                             "give each PC its EnvRunner's URL (runner_urls)")
        self.host = options["host"]
        self.port = int(settings["port"])
        self.token: str | None = options.get("token")
        self._token_shown = self.token if settings.get("token_generated") else "<your token>"
        self._runners = sorted({int(u.rsplit(":", 1)[1].split("/")[0]) for u in runner_urls(config).values()})
        self.url = format_url(_shown_host(public_host or self.host), self.port)
        self._reserved: dict[int, list[tuple[float, int]]] = {}  # port: (until, envs served then)
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ws_gym RunURL", daemon=True)
        self._thread.start()
        if not self._started.wait(30):
            raise TimeoutError(f"RunURL did not start listening on port {self.port} within 30 s")
        if self._error is not None:
            raise self._error

    def worker_command(self, env_id: str | None = None, num_envs: int = 1) -> str:
        """The command for every PC of the run."""
        token = f"{TOKEN_ENV}={self._token_shown} " if self.token else ""
        env = f" --env {env_id}" if env_id else ""
        return f"{token}python -m ws_gym.worker --url {self.url}{env} --num-envs {num_envs}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as exc:  # noqa: BLE001 - raised again in __init__
            self._error = exc
            self._loop.close()
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.run_until_complete(self._session.close())
        self._loop.close()

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0))
        app = web.Application()
        app.router.add_get("/ws", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None)
        try:
            await self._runner.setup()
            await web.TCPSite(self._runner, self.host, self.port).start()
        except BaseException:  # e.g. the port is taken
            await self._runner.cleanup()
            await self._session.close()
            raise

    async def _lacking(self, port: int) -> tuple[int, int] | None:
        """(envs without a worker, envs served) of the EnvRunner on ``port``; None if it is not up."""
        params = {"token": self.token} if self.token else None
        try:
            async with self._session.get(f"http://127.0.0.1:{port}/status", params=params) as resp:
                if resp.status != 200:
                    return None
                run = (await resp.json())["run"]
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError):
            return None
        return int(run["num_envs"]) - int(run["envs_served"]), int(run["envs_served"])

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        now = time.monotonic()
        states = await asyncio.gather(*(self._lacking(p) for p in self._runners))
        best, best_need, best_served = None, 0, 0
        for port, state in zip(self._runners, states):
            if state is None:
                continue
            lacking, served = state
            # a redirect is pending until the EnvRunner's count of served envs changes (its worker
            # came, or one was lost) or RESERVE passes
            pending = [r for r in self._reserved.get(port, []) if r[0] > now and r[1] == served]
            self._reserved[port] = pending
            if lacking > 0 and not pending and lacking > best_need:
                best, best_need, best_served = port, lacking, served
        if best is None:
            return web.Response(status=503, text="ws_gym: no EnvRunner of this run needs envs now; retry\n")
        self._reserved.setdefault(best, []).append((now + self.RESERVE, best_served))
        host = request.url.host or self.host
        # http://, not ws://: aiohttp follows redirects to http(s) URLs only (the upgrade goes on)
        location = f"http://{'[' + host + ']' if ':' in host else host}:{best}/ws"
        log.info("ws_gym: RunURL sends %s to %s (%d envs lacking)", request.remote, location, best_need)
        raise web.HTTPTemporaryRedirect(location)

    def close(self) -> None:
        """Stop serving (the EnvRunners and their workers are not touched)."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> RunURL:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
