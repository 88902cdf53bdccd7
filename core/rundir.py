"""An output directory belongs to one run.

:func:`claim` runs before a step writes anything. A directory that holds
another run (its ``molting_run.json`` or its checkpoints) is refused unless
the user says what to do with it: ``--overwrite`` replaces it, ``--resume``
continues it when the recorded settings are this run's. A retry of the same
run that did not complete (it failed or was killed) may write over its own
leftovers, as a pipeline rerun does, and any run may reuse the directory of
one that failed before writing a checkpoint. A path that is a file, or lies below
one, is a one-line error rather than a ``FileExistsError``. While a run writes
a directory it holds :func:`lock`, so a second process cannot write it too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator, Mapping

from molting.errors import ConfigError

#: Settings that may change between a run and its resumption (or its retry) without making it another run.
VOLATILE = ("resume", "overwrite", "force", "max_steps", "epochs", "logging_steps", "save_steps", "save_total_limit",
            "report_to", "eval", "max_skipped_steps", "num_proc")


def claim(output_dir: Path, record: Mapping[str, Any], resume: bool, overwrite: bool) -> None:
    """Make ``output_dir`` this run's, or refuse with what to do (see the module docstring)."""
    check_directory(output_dir)
    previous = _previous_record(output_dir)
    checkpoints = sorted(p.name for p in output_dir.glob("checkpoint-*")) if output_dir.is_dir() else []
    if previous is None and not checkpoints:
        return
    if overwrite:
        shutil.rmtree(output_dir)
        return
    differing = differing_settings(previous or {}, record)
    if resume:
        if previous is not None and differing:
            raise ConfigError(f"--resume: {output_dir} holds a run with other settings ({_listed(differing, previous, record)}); "
                              "resume with the same settings, or start anew with --overwrite")
        return
    if previous is not None and not differing and previous.get("status") != "completed":
        return  # the same run again, after it failed or was killed: its leftovers are its own
    if previous is not None and previous.get("status") in ("failed", "interrupted") and not checkpoints:
        return  # a run that stopped before it saved anything: nothing there to lose
    held = "a completed run" if previous is not None and previous.get("status") == "completed" else "another run"
    what = f"{held} ({'checkpoints ' + ', '.join(checkpoints[-2:]) if checkpoints else 'molting_run.json'})"
    raise ConfigError(f"--output-dir {output_dir} holds {what}: continue it with --resume auto, replace it with "
                      "--overwrite, or give another --output-dir")


def clear_staging(output_dir: Path) -> None:
    """Remove the ``.staging-*`` folders a killed run left half-written (a checkpoint's, the final model's): the
    directory is this run's now, and they are never read."""
    for leftover in output_dir.glob(".staging-*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def differing_settings(previous: Mapping[str, Any], record: Mapping[str, Any]) -> list[str]:
    """The settings (run config keys, plus plugin, model and data) in which ``record`` is not ``previous``."""
    now = json.loads(json.dumps(record, default=str))
    before, after = dict(previous.get("config", {})), dict(now.get("config", {}))
    keys = sorted(k for k in set(before) | set(after) if k not in VOLATILE and before.get(k) != after.get(k))
    return [k for k in ("plugin", "model", "data") if previous.get(k) != now.get(k)] + keys


def _listed(keys: list[str], previous: Mapping[str, Any], record: Mapping[str, Any]) -> str:
    def value(source: Mapping[str, Any], key: str) -> Any:
        return source.get(key) if key in ("plugin", "model", "data") else source.get("config", {}).get(key)

    now = json.loads(json.dumps(record, default=str))
    shown = [f"{k}: {value(previous, k)!r} then, {value(now, k)!r} now" for k in keys[:4]]
    return "; ".join(shown) + (f"; and {len(keys) - 4} more" if len(keys) > 4 else "")


def _previous_record(output_dir: Path) -> dict[str, Any] | None:
    path = output_dir / "molting_run.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # unreadable: another run's all the same


def check_directory(output_dir: Path) -> None:
    """A one-line :class:`ConfigError` when ``output_dir`` is a file or lies below one."""
    for path in (output_dir, *output_dir.parents):
        if path.exists() and not path.is_dir():
            where = "is a file" if path == output_dir else f"lies below {path}, which is a file"
            raise ConfigError(f"--output-dir {output_dir} {where}: give a directory")


LOCK = ".molting.lock"


@contextlib.contextmanager
def lock(output_dir: Path) -> Iterator[None]:
    """Hold ``output_dir`` for this process: a lock file naming ``PID@HOST``, removed on the way out.

    A second process is refused with the holder's name; a lock left by a
    process of this host that is gone (a ``kill -9``) is taken over.
    """
    path = output_dir / LOCK
    me = f"{os.getpid()}@{socket.gethostname()}"
    for attempt in (1, 2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = _read(path)
            if attempt == 1 and _gone(holder):
                path.unlink(missing_ok=True)
                continue
            raise ConfigError(f"--output-dir {output_dir} is being written by process {holder or 'unknown'} (lock "
                              f"{path}): wait for it to finish, or remove the lock if that process is gone") from None
    with os.fdopen(descriptor, "w") as handle:
        handle.write(me)
    try:
        yield
    finally:
        if _read(path) == me:
            path.unlink(missing_ok=True)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _gone(holder: str) -> bool:
    """Whether the ``PID@HOST`` that wrote a lock is a process of this host that no longer runs."""
    pid, _, host = holder.partition("@")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
