"""A ``/status`` snapshot in Prometheus' text exposition format (version 0.0.4), no I/O.

Written by hand, so the trainer needs no ``prometheus_client``; the tests
parse it with ``prometheus_client.parser``. Per worker, the series carry the
labels ``worker`` (the name it gave, escaped: it is the worker's text) and
``conn`` (the trainer's connection number, unique per connection).
"""

from __future__ import annotations

from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (name, type, help, the run's field)
RUN = (
    ("ws_gym_steps_total", "counter", "step() calls of the vector env.", "steps"),
    ("ws_gym_env_steps_total", "counter", "Env results step() returned (steps x num_envs).", "env_steps"),
    ("ws_gym_resets_total", "counter", "reset() calls.", "resets"),
    ("ws_gym_episodes_total", "counter", "Episodes that ended (terminated or truncated).", "episodes"),
    ("ws_gym_lost_env_steps_total", "counter", "Env results of envs without a worker (worker_lost).",
     "lost_env_steps"),
    ("ws_gym_workers_lost_total", "counter", "Active workers whose connection ended.", "workers_lost"),
    ("ws_gym_worker_reconnects_total", "counter", "Workers that dialed in again.", "reconnects"),
    ("ws_gym_env_steps_per_second", "gauge", "Env-steps per second over the last second.", "env_steps_per_s"),
    ("ws_gym_episode_return_mean", "gauge", "Mean return of the last episode_window episodes.",
     "episode_return_mean"),
    ("ws_gym_episode_length_mean", "gauge", "Mean length of the last episode_window episodes.",
     "episode_length_mean"),
    ("ws_gym_num_envs", "gauge", "Envs of the vector env.", "num_envs"),
    ("ws_gym_envs_served", "gauge", "Envs an active worker serves.", "envs_served"),
    ("ws_gym_workers_connected", "gauge", "Active workers.", "workers_connected"),
    ("ws_gym_uptime_seconds", "gauge", "Seconds since the trainer started.", "uptime_s"),
)
# (name, type, help, the worker's field, scale)
WORKER = (
    ("ws_gym_worker_env_steps_total", "counter", "Env-steps asked of the worker (step requests x its envs).",
     "env_steps", 1.0),
    ("ws_gym_worker_replies_total", "counter", "Replies read from the worker.", "replies", 1.0),
    ("ws_gym_worker_env_steps_per_second", "gauge", "The worker's env-steps per second over the last second.",
     "env_steps_per_s", 1.0),
    ("ws_gym_worker_rtt_seconds", "gauge", "Mean time from a request to its reply over the last second.",
     "rtt_ms", 0.001),
    ("ws_gym_worker_envs", "gauge", "Envs the worker serves.", "num_envs", 1.0),
    ("ws_gym_worker_connected_seconds", "gauge", "Seconds since the worker began to serve.", "connected_s", 1.0),
)


def label(value: Any) -> str:
    """A label value, escaped as the format says (backslash, double quote, line feed)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def number(value: Any) -> str:
    if value is None:
        return "NaN"
    if isinstance(value, bool):
        return "1" if value else "0"
    return repr(float(value)) if isinstance(value, float) else str(value)


def render(snapshot: dict[str, Any]) -> str:
    """The snapshot's run and active workers as Prometheus text."""
    run = snapshot["run"]
    lines = ["# HELP ws_gym_info What the trainer runs (the value is always 1).", "# TYPE ws_gym_info gauge",
             f'ws_gym_info{{env_id="{label(run.get("env_id") or "")}",'
             f'autoreset_mode="{label(run.get("autoreset_mode") or "")}",'
             f'schema="{snapshot["schema"]}"}} 1']
    for name, kind, text, field in RUN:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {number(run.get(field))}"]
    workers = [w for w in snapshot["workers"] if w["state"] == "active"]
    for name, kind, text, field, scale in WORKER:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        for w in workers:
            value = w.get(field)
            value = None if value is None else value * scale if scale != 1.0 else value
            lines.append(f'{name}{{worker="{label(w["name"])}",conn="{w["id"]}"}} {number(value)}')
    return "\n".join(lines) + "\n"
