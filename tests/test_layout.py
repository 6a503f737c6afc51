"""The package's layout rules, checked on its source (no I/O): each module has
one job and stays small, the fast-path switches are read in one place, the
remote envs speak to their workers through the trainer only, and the two sides
share only their pure layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ws_gym
from ws_gym.config import SWITCHES

PACKAGE = Path(ws_gym.__file__).parent
MODULES = sorted(PACKAGE.glob("*.py"))
MAX_LINES = 500

# The trainer's side and the worker's side: neither imports the other's modules.
TRAINER_SIDE = {"trainer", "server", "admission", "calls", "connection", "slots", "polling", "vector", "partial",
                "env", "batching", "wait_mode", "local", "sb3", "relay_link", "stats", "stats_view", "metrics",
                "dashboard", "rllib"}
WORKER_SIDE = {"worker", "client", "worker_links", "host", "host_async", "worker_status", "replies"}
RELAY_SIDE = {"relay", "rooms"}
# What the remote envs may not touch: the trainer's insides.
TRAINER_INSIDES = {"server", "calls", "table", "pool", "admission"}


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def imported_modules(module: ast.Module) -> set[str]:
    """The ws_gym modules a module imports (``from .x import``, ``from . import x``)."""
    names = set()
    for node in ast.walk(module):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                names.add(node.module.split(".")[0])
            else:
                names.update(alias.name for alias in node.names)
    return names


def test_there_are_modules_to_check():
    assert {"trainer", "server", "calls", "vector", "worker", "config"} <= {p.stem for p in MODULES}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_module_is_long(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines: split it by job"


def test_the_switches_are_read_in_config_only():
    """``WS_GYM_*`` switch names (outside docstrings and comments) and reads of
    the environment appear in config.py only; local.py copies the environment for
    its child processes, and the worker and relay CLIs read their tokens (and
    the worker's, its proxy variables)."""
    found = []
    for path in MODULES:
        module = tree(path)
        docstrings = {id(node.value) for node in ast.walk(module)
                      if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
        for node in ast.walk(module):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                    and any(name in node.value for name in SWITCHES) and path.stem != "config"):
                found.append(f"{path.name}:{node.lineno} names {node.value!r}")
            if (isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv")
                    and isinstance(node.value, ast.Name) and node.value.id == "os"
                    and path.stem not in ("config", "local", "worker", "relay")):
                found.append(f"{path.name}:{node.lineno} reads os.{node.attr}")
    assert found == []


@pytest.mark.parametrize("name", ["vector", "env", "wait_mode", "batching", "partial"])
def test_the_remote_envs_reach_workers_through_the_trainer_only(name):
    module = tree(PACKAGE / f"{name}.py")
    touched = sorted({f"{node.attr} (line {node.lineno})" for node in ast.walk(module)
                      if isinstance(node, ast.Attribute) and node.attr in TRAINER_INSIDES})
    assert touched == []
    assert not imported_modules(module) & {"server", "admission"}  # calls: its LOST sentinel only


def test_the_two_sides_do_not_import_each_other():
    crossing = []
    for path in MODULES:
        imports = imported_modules(tree(path))
        if path.stem in TRAINER_SIDE and imports & WORKER_SIDE:
            crossing.append(f"{path.name} imports {sorted(imports & WORKER_SIDE)}")
        if path.stem in WORKER_SIDE and imports & TRAINER_SIDE:
            crossing.append(f"{path.name} imports {sorted(imports & TRAINER_SIDE)}")
        if path.stem in RELAY_SIDE and imports & (TRAINER_SIDE | WORKER_SIDE):
            crossing.append(f"{path.name} imports {sorted(imports & (TRAINER_SIDE | WORKER_SIDE))}")
    assert crossing == []


def test_compact_frames_are_known_to_the_step_codec_only_on_the_trainer():
    """On the trainer's side only admission (which picks a connection's layout)
    and connection (which holds its codec) import ws_gym.compact."""
    users = {p.stem for p in MODULES if p.stem in TRAINER_SIDE and "compact" in imported_modules(tree(p))}
    assert users <= {"admission", "connection"}, users
