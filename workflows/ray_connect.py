"""Connecting a `bubogpt` command to Ray without hanging, and keeping Ray's own noise off the demo's
terminal.

`ray.init` retries an unreachable GCS for ever (a warning every 30 s). That happens with a wrong
`--address`, and with no address at all when `ray start` left `$RAY_TMPDIR/ray/ray_current_cluster`
behind for a cluster that has since stopped: `ray.init()` follows that file. `connect` checks first
that something listens at the address it will use, and gives up after `CONNECT_TIMEOUT_S` with a
one-line error naming the address and what to do. `forget_cluster` removes the address file the way
`ray stop` does.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# How long a command waits for a Ray cluster that accepts connections but does not answer.
CONNECT_TIMEOUT_S = float(os.environ.get("BUBOGPT_RAY_CONNECT_TIMEOUT_S", "90"))
PROBE_TIMEOUT_S = 5.0  # a TCP connect to the GCS port


class RayConnectError(RuntimeError):
    """No Ray cluster answers at the address a command would use (a user-facing, one-line error)."""


def address_file() -> Path:
    """Where `ray start` records the current cluster (respects RAY_TMPDIR)."""
    from ray._common.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


def same_address(a: str, b: str) -> bool:
    """Do two GCS addresses name the same cluster? `ray start --node-ip-address 127.0.0.1` records
    the node's IP instead of 127.0.0.1: compare them the way Ray resolves them."""
    from ray._private.services import canonicalize_bootstrap_address

    def canonical(address: str) -> str:
        try:
            return canonicalize_bootstrap_address(address) or address
        except Exception:  # not an address Ray can parse: compare the text
            return address

    return a == b or canonical(a) == canonical(b)


def forget_cluster(address: str | None = None) -> bool:
    """What `ray stop` does to the address file: remove it (only if it names `address`, when given),
    so a later plain `ray.init()` starts a local Ray instead of following a dead address."""
    from ray._common.utils import reset_ray_address

    path = address_file()
    if not path.is_file() or (address is not None and not same_address(path.read_text().strip(), address)):
        return False
    reset_ray_address(None)
    return True


def resolve_address(address: str | None) -> tuple[str | None, str]:
    """(the GCS address `ray.init(address)` will connect to, or None for a new local Ray; where it
    comes from) -- Ray's own order: the argument, RAY_ADDRESS, then the address file."""
    if address in (None, "", "auto") and os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    if address in (None, "", "auto"):
        path = address_file()
        recorded = path.read_text().strip() if path.is_file() else ""
        if recorded:
            return recorded, f"recorded in {path} by an earlier `ray start`"
        return None, "a new local Ray"
    if address == "local":
        return None, "a new local Ray"
    return address, "--address"


def _host_port(address: str) -> tuple[str, int] | None:
    match = re.fullmatch(r"(?:[a-z]+://)?\[?([^\]/]+?)\]?:(\d+)/?", address)
    return (match.group(1), int(match.group(2))) if match else None


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def unreachable_message(address: str, source: str) -> str:
    advice = ("run `ray stop` (it removes that file) or pass --address" if "recorded in" in source
              else "start the cluster, or pass the address of a running one (--address / RAY_ADDRESS)")  # fmt: skip
    return f"no Ray cluster answers at {address} ({source}): {advice}"


@contextmanager
def _watchdog(seconds: float, message: str) -> Iterator[None]:
    """`ray.init` cannot be interrupted while it retries inside Ray's C++ client: past `seconds`,
    print `message` and end the process (exit code 2)."""

    def give_up() -> None:
        print(message, file=sys.stderr, flush=True)
        os._exit(2)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def check_reachable(address: str | None = None) -> tuple[str | None, str]:
    """Raise `RayConnectError` at once when nothing listens at the address `ray.init(address)` would
    connect to; returns that address (None: a new local Ray) and where it comes from."""
    target, source = resolve_address(address)
    if target is not None:
        where = _host_port(target)
        if where is not None and not _listening(*where):
            raise RayConnectError(unreachable_message(target, source))
    return target, source


def connect(address: str | None = None, **init_kwargs: Any) -> None:
    """`ray.init(address, **init_kwargs)` unless Ray is already initialised, bounded in time:
    `check_reachable` first, and a cluster that listens but does not answer ends the process after
    `CONNECT_TIMEOUT_S` with a one-line message."""
    import ray

    if ray.is_initialized():
        return
    target, source = check_reachable(address)
    message = (f"gave up connecting to Ray at {target} ({source}) after {CONNECT_TIMEOUT_S:.0f} s: "
               "check that the cluster is up and the address is right")  # fmt: skip
    with _watchdog(CONNECT_TIMEOUT_S, message):
        ray.init(address=address, **init_kwargs)


# -- the demo's terminal -----------------------------------------------------------------------------

# Ray's own warnings that flood an interactive run and tell the user nothing they can act on. Only
# the terminal copy is dropped: the session's log files (`$RAY_TMPDIR/ray/session_*/logs`) keep them.
NOISY_ACTORS = ("PlacementGroupCleaner",)  # warns every few seconds when the dashboard is off
NOISY_LINES = re.compile(
    r"RayDeprecationWarning|^\s+self\.exclude_resources = exclude_resources$"
    r"|\] core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"
)


def is_ray_noise(batch: dict[str, Any], line: str) -> bool:
    return batch.get("actor_name") in NOISY_ACTORS or bool(NOISY_LINES.search(line))


def quiet_ray_noise() -> None:
    """Filter `is_ray_noise` out of the worker output this driver prints (after `ray.init` with
    `log_to_driver=True`)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    with dispatcher._lock:
        for index, (name, handler) in enumerate(dispatcher.handlers):
            if name == "ray_print_logs" and not getattr(handler, "quiet", False):

                def quiet(batch: dict[str, Any], _print=handler) -> None:
                    lines = [line for line in batch.get("lines", []) if not is_ray_noise(batch, line)]
                    if lines:
                        _print({**batch, "lines": lines})

                quiet.quiet = True
                dispatcher.handlers[index] = (name, quiet)
