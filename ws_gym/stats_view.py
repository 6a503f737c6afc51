"""What the remote envs show of their run: ``stats()``, ``dashboard_url`` and,
in Jupyter, a compact table of the workers (``_repr_html_``).

The numbers are :mod:`ws_gym.stats`' snapshot, the one ``GET /status``
serves, which the trainer makes on its loop thread.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

from gymnasium.error import ClosedEnvironmentError


def _num(value: Any, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def html_table(name: str, snapshot: dict[str, Any]) -> str:
    """A snapshot as a small HTML table of workers under one line about the run."""
    run = snapshot["run"]
    esc = html.escape
    head = (f"<b>{esc(name)}</b>: {run['num_envs']} envs of {esc(str(run.get('env_id') or '?'))}, "
            f"{_num(run['env_steps_per_s'])} env-steps/s, {_num(run['env_steps'])} env-steps, "
            f"{run['episodes']:,} episodes")
    if run.get("episode_return_mean") is not None:
        head += f" (mean return {_num(run['episode_return_mean'], 2)} over the last {run['episode_window']})"
    if run.get("dashboard_url"):
        url = esc(run["dashboard_url"])
        head += f'; <a href="{url}" target="_blank" rel="noopener">dashboard</a>'
    rows = "".join(
        f"<tr><td>{esc(w['name'])}</td><td>{esc(w['address'])}</td><td>{esc(w['envs'])}</td>"
        f"<td>{esc(w['state'])}{' (slow)' if w['slow'] else ''}</td><td>{_num(w['rtt_ms'], 2)}</td>"
        f"<td>{_num(w['env_steps_per_s'])}</td><td>{esc(w['last_error'] or '')}</td></tr>"
        for w in snapshot["workers"] + snapshot["departed"])
    return (f"<div>{head}<table><thead><tr><th>worker</th><th>address</th><th>envs</th><th>state</th>"
            f"<th>RTT ms</th><th>env-steps/s</th><th>last error</th></tr></thead>"
            f"<tbody>{rows or '<tr><td colspan=7>no worker yet</td></tr>'}</tbody></table></div>")


class StatsView:
    """``stats()``, ``dashboard_url`` and ``_repr_html_`` of a remote env."""

    _trainer: Any

    if TYPE_CHECKING:
        def _check_open(self) -> None: ...  # the env's own: raises once it is closed

    @property
    def dashboard_url(self) -> str:
        """The dashboard's URL (``GET /`` for the page, ``/status``, ``/metrics``).

        On the trainer's own port; with ``relay=`` on a port of its own on
        127.0.0.1. Off loopback it needs the token once: ``?token=...``.
        """
        return self._trainer.dashboard_url

    def stats(self) -> dict[str, Any]:
        """What the run is doing now: the snapshot ``GET /status`` serves.

        Returns:
            A dict of plain JSON values: ``schema``, ``time``, ``run`` (env id,
            steps, env-steps, rates, episodes, mean return and length, workers
            connected and lost, ...), ``workers`` (one dict per active worker:
            name, address, envs, state, round trip, env-steps/s, last error),
            ``departed`` (workers lost lately) and ``history`` (a point a
            second for the charts). The fields are listed in the README.

        Raises:
            ClosedEnvironmentError: the env was closed.
        """
        self._check_open()
        return self._trainer.stats()

    def _repr_html_(self) -> str:
        """Jupyter: the run in one line and a table of its workers."""
        name = type(self).__name__
        try:
            return html_table(name, self.stats())
        except Exception as exc:  # noqa: BLE001 - a repr must not raise
            why = "closed" if isinstance(exc, ClosedEnvironmentError) else str(exc)[:200] or type(exc).__name__
            return f"<div><b>{html.escape(name)}</b>: {html.escape(why)}</div>"
