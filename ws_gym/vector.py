"""RemoteVectorEnv: a gymnasium VectorEnv whose envs live in remote workers.

Each call is split into one request per worker (a contiguous run of envs),
sent concurrently, and the replies are joined into one batch. Infos are
rebuilt with gymnasium's own ``_add_info`` from the per-env log each worker
sends, so results equal those of one ``SyncVectorEnv`` over all envs.
"""

from __future__ import annotations

import ast
import itertools
import ssl
import time
import warnings
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.envs.registration import EnvSpec, WrapperSpec
from gymnasium.error import AlreadyPendingCallError, ClosedEnvironmentError, NoAsyncCallError
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from . import protocol as P
from . import codec
from .codec import Unencodable
from .errors import ProtocolError, WorkerLostError
from .calls import LOST
from .slots import env_ranges
from .trainer import Trainer, autoreset_value

__all__ = ["RemoteVectorEnv"]

LOST_KEY = "worker_lost"  # info flag of envs whose worker is lost (on_worker_lost="wait")
_ARRAY_SPACES = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)
_warned_types: set[str] = set()


def _literal_call(node: ast.expr, name: str) -> dict[str, Any]:
    """The keyword arguments of ``name(k=literal, ...)`` parsed from a repr; nothing is evaluated."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name
            and not node.args and all(k.arg is not None for k in node.keywords)):
        raise ValueError(f"not a {name}(...) repr")
    return {k.arg: k.value for k in node.keywords}


def env_spec_from_repr(text: str) -> EnvSpec | None:
    """The ``EnvSpec`` whose (dataclass) repr a worker sent for ``spec``, or None
    when it does not parse back: a field that is not a literal (a callable
    entry point, a numpy value in ``kwargs``) or a repr cut at 1000 characters."""
    try:
        fields = _literal_call(ast.parse(text, mode="eval").body, "EnvSpec")
        wrappers = fields.pop("additional_wrappers", None)
        for derived in ("namespace", "name", "version"):  # recomputed from the id
            fields.pop(derived, None)
        spec = EnvSpec(**{k: ast.literal_eval(v) for k, v in fields.items()})
        if wrappers is not None:
            if not isinstance(wrappers, ast.Tuple):
                return None
            spec.additional_wrappers = tuple(
                WrapperSpec(**{k: ast.literal_eval(v) for k, v in _literal_call(w, "WrapperSpec").items()})
                for w in wrappers.elts
            )
        return spec
    except Exception:  # e.g. gymnasium.error.Error for an id it cannot parse
        return None


def _plain(value: Any) -> Any:
    """A received repr (``Unencodable``) becomes a plain str, with one warning per type;
    an ``EnvSpec``'s repr becomes the ``EnvSpec`` again where it parses back."""
    if type(value) is Unencodable:
        if value.type_name == "EnvSpec" and (spec := env_spec_from_repr(value)) is not None:
            return spec
        if value.type_name not in _warned_types:
            _warned_types.add(value.type_name)
            warnings.warn(
                f"ws_gym: a value of type {value.type_name} has no wire form; "
                f"it arrives as its repr string",
                RuntimeWarning,
                stacklevel=4,
            )
        return str(value)
    return value


def own(value: Any) -> Any:
    """A received value made the user's own: writable arrays, reprs flagged once."""
    return codec.writable(value, _plain)


def join(space: gym.Space, parts: list[Any]) -> Any:
    """Join per-worker batches of ``space`` into one batch (one copy)."""
    if isinstance(space, _ARRAY_SPACES):
        return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)
    if isinstance(space, spaces.Dict):
        return {k: join(sub, [p[k] for p in parts]) for k, sub in space.spaces.items()}
    if isinstance(space, spaces.Tuple):
        return tuple(join(sub, [p[j] for p in parts]) for j, sub in enumerate(space.spaces))
    return tuple(itertools.chain.from_iterable(parts))


def item(space: gym.Space, batch: Any, i: int) -> Any:
    """Element ``i`` of a batch of ``space``, as its own value."""
    if isinstance(space, _ARRAY_SPACES):
        return batch[i].copy()
    if isinstance(space, spaces.Dict):
        return {k: item(sub, batch[k], i) for k, sub in space.spaces.items()}
    if isinstance(space, spaces.Tuple):
        return tuple(item(sub, batch[j], i) for j, sub in enumerate(space.spaces))
    return batch[i]


def cut(space: gym.Space, batch: Any, a: int, b: int) -> Any:
    """Envs ``a:b`` of a batch of ``space`` (actions for one worker)."""
    if isinstance(space, _ARRAY_SPACES):
        return np.asarray(batch)[a:b]
    if isinstance(space, spaces.Dict):
        return {k: cut(sub, batch[k], a, b) for k, sub in space.spaces.items()}
    if isinstance(space, spaces.Tuple):
        return tuple(cut(sub, batch[j], a, b) for j, sub in enumerate(space.spaces))
    return tuple(batch[a:b])


def check_batch(space: gym.Space, value: Any, count: int, what: str) -> None:
    """Raise ProtocolError unless ``value`` is a batch of ``count`` elements of ``space``."""
    if isinstance(space, _ARRAY_SPACES):
        if type(value) is not np.ndarray or value.shape != (count, *space.shape) or value.dtype != space.dtype:
            got = f"{value.dtype} {value.shape}" if type(value) is np.ndarray else type(value).__name__
            raise ProtocolError(f"{what}: expected {space.dtype} {(count, *space.shape)}, got {got}")
    elif isinstance(space, spaces.Dict):
        if type(value) is not dict or value.keys() != space.spaces.keys():
            raise ProtocolError(f"{what}: expected a dict with keys {list(space.spaces)}")
        for k, sub in space.spaces.items():
            check_batch(sub, value[k], count, f"{what}[{k!r}]")
    elif isinstance(space, spaces.Tuple):
        if type(value) is not tuple or len(value) != len(space.spaces):
            raise ProtocolError(f"{what}: expected a tuple of {len(space.spaces)}")
        for j, sub in enumerate(space.spaces):
            check_batch(sub, value[j], count, f"{what}[{j}]")
    elif type(value) is not tuple or len(value) != count or not all(type(x) is str for x in value):
        raise ProtocolError(f"{what}: expected a tuple of {count} strings")


def batch_shape(space: gym.Space, n: int) -> str:
    """What a batch of ``n`` actions of ``space`` looks like, for error messages."""
    if isinstance(space, _ARRAY_SPACES):
        return f"an array of shape {(n, *space.shape)}"
    if isinstance(space, spaces.Dict):
        return "a dict {" + ", ".join(f"{k!r}: {batch_shape(sub, n)}" for k, sub in space.spaces.items()) + "}"
    if isinstance(space, spaces.Tuple):
        return "a tuple (" + ", ".join(batch_shape(sub, n) for sub in space.spaces) + ")"
    return f"a sequence of {n} values"


def check_actions(space: gym.Space, batch: Any, n: int, path: tuple = ()) -> None:
    """Raise as ``SyncVectorEnv.step`` would (gymnasium's ``iterate``) where ``batch``
    cannot be ``n`` actions of ``space``: TypeError for what cannot be iterated or
    indexed, KeyError/IndexError for a missing part, ValueError for a wrong count.

    Called on every step of a Dict/Tuple action space: messages are made only
    when one is raised. ``path``: the keys leading to ``batch``."""
    if isinstance(space, (spaces.Dict, spaces.Tuple)):
        subs = space.spaces.items() if isinstance(space, spaces.Dict) else enumerate(space.spaces)
        for k, sub in subs:
            try:  # indexed as gymnasium's iterate does: the same error for what has no [k]
                part = batch[k]
            except (TypeError, KeyError, IndexError) as exc:
                raise type(exc)(f"{_expected(space, n, path)}, got {type(batch).__name__} without [{k!r}]") from None
            check_actions(sub, part, n, (*path, k))
    else:
        try:
            count = len(batch)
        except TypeError:  # a scalar, a 0-d array, None
            raise TypeError(f"{_expected(space, n, path)}, got {type(batch).__name__} {batch!r:.80}") from None
        if count != n:
            raise ValueError(f"{_expected(space, n, path)}, got {count}")


def _expected(space: gym.Space, n: int, path: tuple) -> str:
    what = "actions" + "".join(f"[{k!r}]" for k in path)
    return f"{what}: expected a batch of {n} actions ({batch_shape(space, n)})"


def check_reply(reply: Any, count: int, space: gym.Space, origin: str, *, step: bool) -> None:
    """Validate a worker's reset/step reply before anything of it is used."""
    if type(reply) is not dict:
        raise ProtocolError(f"{origin} sent a reply that is not an object")
    check_batch(space, reply.get("o"), count, f"{origin}: observations")
    if step:
        for key, dtype in (("r", np.float64), ("t", np.bool_), ("u", np.bool_)):
            arr = reply.get(key)
            if type(arr) is not np.ndarray or arr.shape != (count,) or arr.dtype != dtype:
                raise ProtocolError(f"{origin}: {key!r} must be a {np.dtype(dtype)} array of {count}")
    log = reply.get("f")
    if type(log) is not list:
        raise ProtocolError(f"{origin}: the info log must be a list")
    for entry in log:
        if not (type(entry) is list and len(entry) == 2 and type(entry[0]) is int
                and 0 <= entry[0] < count and type(entry[1]) is dict):
            raise ProtocolError(f"{origin}: bad info log entry")


def check_list(reply: Any, count: int, origin: str) -> list:
    if type(reply) is not list or len(reply) != count:
        raise ProtocolError(f"{origin}: expected a list of {count} results")
    return reply


class RemoteVectorEnv(VectorEnv):
    """A ``VectorEnv`` of ``num_envs`` envs hosted by workers that dial in.

    Workers connect to :attr:`url` (``python -m ws_gym.worker --url ...``), or
    the trainer starts ``local_workers`` of them itself on loopback. The first
    :meth:`reset` waits until workers cover every env.
    """

    def __init__(
        self,
        num_envs: int = 1,
        env_id: str | None = None,
        env_kwargs: dict | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 8765,
        token: str | None = None,
        local_workers: int = 0,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        connect_timeout: float = 120.0,
        step_timeout: float | None = 60.0,
        max_episode_steps: int | None = None,
        render_mode: str | None = None,
        max_msg_size: int = 256 * 1024 * 1024,
        record_episode_statistics: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        max_pending_handshakes: int = 64,
        handshake_timeout: float = 10.0,
        worker_vectorization: str = "sync",
        heartbeat: float | None = 10.0,
        on_worker_lost: str = "raise",
        busy_poll: bool | None = None,
        public_url: str | None = None,
    ) -> None:
        if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        self.num_envs = int(num_envs)
        self.autoreset_mode = autoreset_value(autoreset_mode)
        env_kwargs = dict(env_kwargs or {})
        if render_mode is not None:
            env_kwargs["render_mode"] = render_mode
        self.metadata = {"autoreset_mode": self.autoreset_mode}
        self._trainer = Trainer(
            num_envs=self.num_envs, mode=P.MODE_VECTOR, env_id=env_id, env_kwargs=env_kwargs,
            host=host, port=port, token=token, local_workers=local_workers,
            autoreset_mode=self.autoreset_mode, connect_timeout=connect_timeout,
            step_timeout=step_timeout, max_episode_steps=max_episode_steps,
            max_msg_size=max_msg_size, record_episode_statistics=record_episode_statistics,
            ssl_context=ssl_context, certfile=certfile, keyfile=keyfile,
            max_pending_handshakes=max_pending_handshakes, handshake_timeout=handshake_timeout,
            worker_vectorization=worker_vectorization, heartbeat=heartbeat, on_worker_lost=on_worker_lost,
            busy_poll=busy_poll, public_url=public_url,
        )
        self.url: str = self._trainer.url
        self.token: str | None = self._trainer.token  # what workers must present (maybe generated)
        self._last: list[tuple[int, int, Any]] = []  # (start, stop, obs batch): the latest observations
        self._raw_infos: list[tuple[int, list]] = []  # (first env, info log): the latest, unmerged
        self._ended: np.ndarray | None = None  # wait mode: which envs' last result ended their episode
        self._pending: tuple[Any, Any, Any, Any] | None = None  # a step_async awaiting step_wait
        self._reset_tried = False  # reset() was called: envs a new worker brings are lost ones
        self._single_obs = self._single_act = self._obs = self._act = None
        self._batched_obs = False
        self._render_mode = render_mode
        self.closed = False
        if self._trainer.pool.expect.ready is not None or local_workers:
            try:
                self._load_spaces()
            except BaseException:
                self._trainer.close()
                raise

    # -- spaces: known at once when the env is registered here, else from the first worker

    def _load_spaces(self) -> None:
        obs, act, ready = self._trainer.spaces()
        self._single_obs, self._single_act = obs, act
        self._batched_obs = isinstance(obs, _ARRAY_SPACES)  # steps fill a _StepBatch
        self._obs = batch_space(obs, self.num_envs)
        self._act = batch_space(act, self.num_envs)
        self.metadata = {**ready.metadata, "autoreset_mode": self.autoreset_mode}
        self._render_mode = ready.render_mode

    def _space(self, which: str) -> gym.Space:
        if self._single_obs is None:
            self._check_open()
            self._load_spaces()
        return getattr(self, which)

    single_observation_space = property(lambda self: self._space("_single_obs"))
    single_action_space = property(lambda self: self._space("_single_act"))
    observation_space = property(lambda self: self._space("_obs"))
    action_space = property(lambda self: self._space("_act"))

    @property
    def render_mode(self) -> str | None:  # type: ignore[override]
        return self._render_mode

    @property
    def np_random_seed(self) -> tuple[int, ...]:  # type: ignore[override]
        """The envs' ``np_random_seed``, one per env, as ``SyncVectorEnv``'s: ``(42, 43, ...)``
        after ``reset(seed=42)``; each env's own random seed where it was never seeded."""
        return self.get_attr("np_random_seed")

    # -- the VectorEnv API ---------------------------------------------------

    def reset(
        self,
        *,
        seed: int | Sequence[int | None] | None = None,
        options: dict[str, Any] | None = None,
    ) -> tuple[Any, dict[str, Any]]:
        """Reset the envs (waiting for workers first); ``seed + i`` seeds env i."""
        self._check_idle()
        trainer = self._trainer
        around_holes = trainer.wait_mode and bool(self._last)  # wait mode: only the first reset waits
        if not around_holes:
            trainer.wait_workers()
        if self._single_obs is None:
            self._load_spaces()
        n = self.num_envs
        if seed is None:
            seeds: list = [None] * n
        elif isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
            seeds = [int(seed) + i for i in range(n)]
        else:
            seeds = [None if s is None else int(s) for s in seed]
        if len(seeds) != n:
            raise ValueError(
                f"If seeds are passed as a list the length must match num_envs={n} but got length={len(seeds)}."
            )
        options = dict(options) if options is not None else None
        mask = None
        if options is not None and "reset_mask" in options:
            mask = options.pop("reset_mask")
            _check_mask(mask, n)
        if around_holes:
            return self._reset_around_holes(seeds, options, mask)
        self._reset_tried = True
        deadline = time.monotonic() + trainer.connect_timeout
        while True:
            try:
                workers = trainer.pool.serving()
            except WorkerLostError:  # lost after wait_workers() returned
                if not trainer.wait_mode or time.monotonic() > deadline:
                    raise
                trainer.wait_workers()
                continue
            items, asked = [], []
            for w in workers:
                body: dict[str, Any] = {"seeds": seeds[w.start : w.stop], "options": options}
                if mask is not None and not w.fresh:
                    part = mask[w.start : w.stop]
                    if not part.any():
                        continue
                    body["mask"] = part.tolist()
                items.append((w, P.RESET, body))
                asked.append(w)
            if not trainer.wait_mode:
                replies = trainer.request(items)
                break
            # wait mode, first reset: there is no last observation to hold for a lost
            # env, so a worker lost now is waited for, and the reset done again
            replies = trainer.wait(trainer.submit(items, tolerant=True))
            if not any(r is LOST for r in replies):
                break
            if time.monotonic() > deadline:
                raise WorkerLostError(f"workers kept being lost during the first reset() for "
                                      f"{trainer.connect_timeout:g} s (connect_timeout)")
            trainer.wait_workers()
        infos: dict[str, Any] = {}
        for w, reply in zip(asked, replies):
            check_reply(reply, w.count, self._single_obs, w.origin, step=False)
        fresh = dict(zip(asked, replies))
        for w, reply in fresh.items():
            w.fresh = False
            for i, info in reply["f"]:
                infos = self._merge(infos, own(info), w.start + i, w.origin)
        self._last = [(w.start, w.stop, fresh[w]["o"] if w in fresh else self._held(w.start, w.stop))
                      for w in workers]
        self._raw_infos = [(w.start, r["f"]) for w, r in fresh.items()]
        return join(self._single_obs, [part for _, _, part in self._last]), infos

    def _reset_around_holes(self, seeds: list, options: dict | None, mask: np.ndarray | None) -> tuple[Any, dict]:
        """Wait mode: reset the envs that have a worker; envs without one keep
        their last observation and say so in ``infos["worker_lost"]``."""
        plan, items = [], []
        for a, b, w in self._trainer.pool.layout():
            if w is not None and w.fresh and mask is not None and not mask[a:b].all():
                # A new worker resets all its envs, but some were not asked to: reset()
                # leaves those alone, so the worker takes them over at a later step.
                w = None
            if w is not None:
                body: dict[str, Any] = {"seeds": seeds[a:b], "options": options}
                if mask is not None and not w.fresh:
                    part = mask[a:b]
                    if not part.any():
                        plan.append((a, b, None, "keep"))
                        continue
                    body["mask"] = part.tolist()
                items.append((w, P.RESET, body))
            plan.append((a, b, w, "reset" if w is not None else "lost"))
        replies = iter(self._trainer.wait(self._trainer.submit(items, tolerant=True)))
        infos: dict[str, Any] = {}
        last, raw = [], []
        # reset envs (and lost ones asked to reset) have not ended; the others keep their state
        prev_ended = self._ended
        if mask is None or prev_ended is None:
            ended = np.zeros(self.num_envs, dtype=np.bool_)
        else:
            ended = prev_ended & ~mask
        for a, b, w, what in plan:
            reply = next(replies) if w is not None else LOST
            if what == "keep":
                last.append((a, b, self._held(a, b)))
                continue
            if reply is not LOST and w.fresh:  # a new worker resets all its envs
                ended[a:b] = False
            if reply is LOST:
                held = self._held(a, b)
                for i in range(a, b):
                    if mask is None or mask[i]:
                        infos = self._add_info(infos, {LOST_KEY: True}, i)
                        raw.append((i, [[0, {LOST_KEY: True}]]))
                last.append((a, b, held))
                continue
            check_reply(reply, b - a, self._single_obs, w.origin, step=False)
            w.fresh = False
            for i, info in reply["f"]:
                infos = self._merge(infos, own(info), a + i, w.origin)
            raw.append((a, reply["f"]))
            last.append((a, b, reply["o"]))
        self._last = last
        self._raw_infos = raw
        self._ended = ended
        return join(self._single_obs, [part for _, _, part in last]), infos

    def _merge(self, infos: dict, info: dict, i: int, origin: str) -> dict:
        """gymnasium's ``_add_info``; a worker's info it cannot merge is a ProtocolError."""
        try:
            return self._add_info(infos, info, i)
        except Exception as exc:  # e.g. a key that is a number for one env, a dict for another
            raise ProtocolError(
                f"{origin}: the info of env {i} cannot be merged with the others "
                f"({type(exc).__name__}: {str(exc)[:200]})"
            ) from None

    def _held(self, a: int, b: int) -> Any:
        """The last observations of envs ``a:b`` (a batch), from the previous results."""
        space = self._single_obs
        pieces = [cut(space, part, max(a, s) - s, min(b, e) - s) for s, e, part in self._last if s < b and a < e]
        return pieces[0] if len(pieces) == 1 else join(space, pieces)

    def step(self, actions: Any) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Step every env; one request per worker, sent concurrently."""
        self.step_async(actions)
        return self.step_wait()

    def step_async(self, actions: Any) -> None:
        """Send the actions and return at once; :meth:`step_wait` collects the results.

        The trainer can do its own work in between while the envs step.
        """
        self._check_idle()
        trainer = self._trainer
        array_actions = isinstance(self._single_act, _ARRAY_SPACES)
        if array_actions:
            actions = np.asarray(actions)
            if actions.shape[:1] != (self.num_envs,):  # as SyncVectorEnv: TypeError for a scalar
                raise (TypeError if actions.ndim == 0 else ValueError)(
                    f"expected a batch of {self.num_envs} actions "
                    f"({batch_shape(self._single_act, self.num_envs)}), got an array of shape {actions.shape}"
                )
        elif self._single_act is not None:
            check_actions(self._single_act, actions, self.num_envs)
        if trainer.wait_mode:
            self._pending = self._step_around_holes(actions)
            return
        workers = trainer.pool.serving()
        if self._reset_tried and any(w.fresh for w in workers):
            self._refuse_fresh(workers)
        if len(workers) == 1:
            items = [(workers[0], P.STEP, {"a": actions})]
        elif array_actions:  # as cut() slices an array space's batch
            items = [(w, P.STEP, {"a": actions[w.start:w.stop]}) for w in workers]
        else:
            space = self._single_act
            items = [(w, P.STEP, {"a": cut(space, actions, w.start, w.stop)}) for w in workers]
        batch = _StepBatch(self._single_obs, self.num_envs, workers) if self._batched_obs else None
        call = trainer.submit(items, sink=batch.fill if batch is not None else None)
        self._pending = (call, workers, None, batch)

    def _refuse_fresh(self, workers: list) -> None:
        """Raise mode: envs that a new (or returning) worker took over since the
        last reset have new episodes, not reset yet: they were lost, as the
        caller would have been told had the loss been seen before the return."""
        fresh = [w for w in workers if w.fresh]
        envs = env_ranges([i for w in fresh for i in range(w.start, w.stop)])
        raise WorkerLostError(
            f"envs {envs} lost their worker since the last reset(); "
            f"{', '.join(w.origin for w in fresh)} serves them now with new envs: call reset()"
        )

    def _step_around_holes(self, actions: Any) -> tuple[Any, None, list]:
        """Wait mode: step the envs that have a worker. A worker that joined since
        the last step takes over its envs with a reset instead."""
        self._trainer.check_local()  # restart crashed local workers now, not at the next reset
        plan, items = [], []
        space = self._single_act
        # Which envs' last step ended their episode: only those may be taken over by a
        # reset at once. Without SAME_STEP's final_obs an episode not ended yet (its
        # worker was lost between two steps) must first end as truncated (worker_lost),
        # else its last obs and the new worker's first obs would look like one transition.
        ended = self._ended
        wait_end = self.autoreset_mode is not AutoresetMode.SAME_STEP
        for a, b, w in self._trainer.pool.layout():
            if w is None or (w.fresh and wait_end and (ended is None or not ended[a:b].all())):
                plan.append((a, b, None, "lost"))
            elif w.fresh:
                items.append((w, P.RESET, {"seeds": [None] * (b - a), "options": None}))
                plan.append((a, b, w, "reset"))
            else:
                items.append((w, P.STEP, {"a": cut(space, actions, a, b)}))
                plan.append((a, b, w, "step"))
        return self._trainer.submit(items, tolerant=True), None, plan, None

    def step_wait(
        self, timeout: float | None = None
    ) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """The results of the last :meth:`step_async`; waits at most ``timeout``
        seconds (default: the env's ``step_timeout``)."""
        if self._pending is None:
            self._check_open()
            raise NoAsyncCallError("calling `step_wait` without any prior call to `step_async`.", "step")
        call, workers, plan, batch = self._pending
        self._pending = None
        replies = self._trainer.wait(call, -1 if timeout is None else timeout)
        if plan is not None:
            return self._join_around_holes(plan, replies)
        infos: dict[str, Any] = {}
        space = self._single_obs
        if batch is None:
            for w, reply in zip(workers, replies):
                check_reply(reply, w.count, space, w.origin, step=True)
        for w, reply in zip(workers, replies):
            if reply["f"]:
                for i, info in reply["f"]:
                    infos = self._merge(infos, own(info), w.start + i, w.origin)
        self._raw_infos = [(w.start, r["f"]) for w, r in zip(workers, replies)]
        if batch is not None:  # filled as the replies came in, checked by its sink
            self._last = [(0, self.num_envs, batch.obs)]
            return batch.obs, batch.r, batch.t, batch.u, infos
        self._last = [(w.start, w.stop, r["o"]) for w, r in zip(workers, replies)]
        if len(replies) == 1:
            r = replies[0]
            return join(space, [r["o"]]), r["r"].copy(), r["t"].copy(), r["u"].copy(), infos
        return (
            join(space, [r["o"] for r in replies]),
            np.concatenate([r["r"] for r in replies]),
            np.concatenate([r["t"] for r in replies]),
            np.concatenate([r["u"] for r in replies]),
            infos,
        )

    def _join_around_holes(self, plan: list, replies: list) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict]:
        """Wait mode: one full batch. Envs without a worker end (again) as truncated
        with their last observation, reward 0 and ``infos["worker_lost"]``."""
        space = self._single_obs
        same_step = self.autoreset_mode is AutoresetMode.SAME_STEP
        replies = iter(replies)
        infos: dict[str, Any] = {}
        obs, rew, term, trunc, last, raw = [], [], [], [], [], []
        for a, b, w, what in plan:
            n = b - a
            reply = next(replies) if w is not None else LOST
            if reply is not LOST:
                check_reply(reply, n, space, w.origin, step=what == "step")
            if what == "step" and reply is not LOST:
                o, r, t, u = reply["o"], reply["r"], reply["t"], reply["u"]
                for i, info in reply["f"]:
                    infos = self._merge(infos, own(info), a + i, w.origin)
                raw.append((a, reply["f"]))
            else:
                held = self._held(a, b)
                r, t = np.zeros(n), np.zeros(n, dtype=np.bool_)
                if reply is LOST:  # out of service: the episode ends here, again
                    o, u = held, np.ones(n, dtype=np.bool_)
                    for i in range(n):
                        info = {LOST_KEY: True}
                        if same_step:
                            info.update(final_obs=item(space, held, i), final_info={LOST_KEY: True})
                        infos = self._add_info(infos, info, a + i)
                        raw.append((a + i, [[0, info]]))
                else:  # a new worker took these envs over: their first observation
                    w.fresh = False
                    o, u = reply["o"], np.full(n, same_step)
                    reset_infos = dict(reply["f"])
                    for i in range(n):
                        info = own(reset_infos.get(i, {}))
                        if same_step:  # the step that ends the lost episode brings the reset
                            info.update(final_obs=item(space, held, i), final_info={LOST_KEY: True})
                        if info:
                            infos = self._merge(infos, info, a + i, w.origin)
                            raw.append((a + i, [[0, info]]))
            obs.append(o)
            rew.append(r)
            term.append(t)
            trunc.append(u)
            last.append((a, b, o))
        self._last = last
        self._raw_infos = raw
        term, trunc = np.concatenate(term), np.concatenate(trunc)
        self._ended = term | trunc
        return join(space, obs), np.concatenate(rew), term, trunc, infos

    def _workers(self) -> list:
        """The workers for render/call/get_attr/set_attr; before the first reset
        they are waited for, so these answer at once as gymnasium's vector envs do."""
        self._check_idle()
        if not self._last:
            self._trainer.wait_workers()
        return self._trainer.pool.serving()

    def render(self) -> tuple[Any, ...] | None:
        """A tuple with one frame per env, as ``SyncVectorEnv.render``."""
        workers = self._workers()
        replies = self._trainer.request([(w, P.RENDER, {}) for w in workers])
        return tuple(own(x) for w, r in zip(workers, replies) for x in check_list(r, w.count, w.origin))

    def call(self, name: str, /, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Call (or read) ``name`` on every env; a tuple of results in env order."""
        workers = self._workers()
        body = {"name": name, "args": list(args), "kwargs": kwargs}
        replies = self._trainer.request([(w, P.CALL, body) for w in workers])
        return tuple(own(x) for w, r in zip(workers, replies) for x in check_list(r, w.count, w.origin))

    def call_at(self, indices: Sequence[int], name: str, /, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Call (or read) ``name`` on the envs ``indices`` only; results in that order.

        For callers that address single envs (SB3's ``env_method(indices=...)``).
        """
        groups = self._group(indices)
        items = [(w, P.CALL, {"name": name, "args": list(args), "kwargs": kwargs,
                              "indices": [i - w.start for i in idx]}) for w, idx in groups]
        replies = self._trainer.request(items)
        found = {}
        for (w, idx), r in zip(groups, replies):
            found.update(zip(idx, check_list(r, len(idx), w.origin)))
        return tuple(own(found[i]) for i in indices)

    def set_attr_at(self, indices: Sequence[int], name: str, values: Sequence[Any]) -> None:
        """Set ``name`` on the envs ``indices`` only, one value each."""
        self._check_idle()
        if len(values) != len(indices):
            raise ValueError(f"expected {len(indices)} values, got {len(values)}")
        value_of = dict(zip(indices, values))
        groups = self._group(indices)
        self._trainer.request([(w, P.SET_ATTR, {"name": name, "values": [value_of[i] for i in idx],
                                                "indices": [i - w.start for i in idx]}) for w, idx in groups])

    def _group(self, indices: Sequence[int]) -> list[tuple[Any, list[int]]]:
        """``indices`` grouped by the worker that hosts them (each index once)."""
        self._check_idle()
        wanted = sorted({int(i) for i in indices})
        if wanted and not 0 <= wanted[0] <= wanted[-1] < self.num_envs:
            raise IndexError(f"env indices must be in 0..{self.num_envs - 1}, got {list(indices)}")
        return [(w, [i for i in wanted if w.start <= i < w.stop]) for w in self._workers()
                if any(w.start <= i < w.stop for i in wanted)]

    def env_infos(self) -> list[dict[str, Any]]:
        """The last reset's or step's infos, one dict per env as each env returned
        it (before gymnasium batches them, which may change a value's type)."""
        out: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        for start, log in self._raw_infos:
            for i, info in log:  # SAME_STEP logs an ended env twice: final_obs/final_info, then the reset's
                out[start + i].update(own(info))
        return out

    def get_attr(self, name: str) -> tuple[Any, ...]:
        """The attribute ``name`` of every env."""
        return self.call(name)

    def set_attr(self, name: str, values: list[Any] | tuple[Any, ...] | Any) -> None:
        """Set ``name`` on every env: one value for all, or one value per env."""
        self._check_idle()
        if not isinstance(values, (list, tuple)):
            values = [values for _ in range(self.num_envs)]
        if len(values) != self.num_envs:
            raise ValueError(
                "Values must be a list or tuple with length equal to the number of environments. "
                f"Got `{len(values)}` values for {self.num_envs} environments."
            )
        workers = self._workers()
        self._trainer.request(
            [(w, P.SET_ATTR, {"name": name, "values": list(values[w.start : w.stop])}) for w in workers]
        )

    def close_extras(self, **kwargs: Any) -> None:
        """Tell the workers to close their envs, stop the server, end local workers."""
        self._pending = None  # its replies arrive before the workers' close replies
        self._trainer.close()

    def _check_open(self) -> None:
        """Every call on a closed env raises at once, as in gymnasium's AsyncVectorEnv."""
        if self.closed:
            raise ClosedEnvironmentError(f"Trying to operate on `{type(self).__name__}`, after a call to `close()`.")

    def _check_idle(self) -> None:
        """No call may start while a ``step_async`` awaits its ``step_wait``."""
        self._check_open()
        if self._pending is not None:
            raise AlreadyPendingCallError(
                "calling a method while waiting for a pending call to `step_wait`", "step"
            )

    def __repr__(self) -> str:
        return f"RemoteVectorEnv(num_envs={self.num_envs}, url={self.url!r})"

    def __del__(self) -> None:
        if not getattr(self, "closed", True) and hasattr(self, "_trainer"):
            try:
                self.close()
            except Exception:
                pass


class _StepBatch:
    """The arrays one step returns, filled by each worker's reply as it is read
    (on the loop's thread, while the other workers still step): the caller then
    joins nothing. For array observation spaces."""

    __slots__ = ("obs", "r", "t", "u", "workers", "space", "_views")

    def __init__(self, space: gym.Space, n: int, workers: list) -> None:
        self.space, self.workers = space, workers
        self.obs = np.empty((n, *space.shape), space.dtype)
        self.r = np.empty(n)
        self.t = np.empty(n, np.bool_)
        self.u = np.empty(n, np.bool_)
        self._views: tuple | None = None  # their bytes, for compact replies (made at the first)

    def fill(self, idx: int, reply: Any, compact: bool) -> None:
        w = self.workers[idx]
        a, b = w.start, w.stop
        if compact:  # a whole compact frame, checked against its layout as it was read
            views = self._views
            if views is None:  # two threads may both make them: the same views either way
                views = self._views = w.compact.byte_views(self.obs, self.r, self.t, self.u)
            w.compact.copy_reply(reply, views, a)
            return
        check_reply(reply, w.count, self.space, w.origin, step=True)
        self.obs[a:b] = reply["o"]
        self.r[a:b] = reply["r"]
        self.t[a:b] = reply["t"]
        self.u[a:b] = reply["u"]


def _check_mask(mask: Any, n: int) -> None:
    """The same checks, errors and messages as ``SyncVectorEnv.reset``."""
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"`options['reset_mask']` must be a numpy array, got {type(mask)}")
    if mask.shape != (n,):
        raise ValueError(f"`options['reset_mask']` must have shape `({n},)`, got {mask.shape}")
    if mask.dtype != np.bool_:
        raise TypeError(f"`options['reset_mask']` must have `dtype=np.bool_`, got {mask.dtype}")
    if not np.any(mask):
        raise ValueError(
            f"`options['reset_mask']` must contain a boolean array with at least one True value, got reset_mask={mask}"
        )
