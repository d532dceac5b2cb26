"""sd_notify: tell systemd READY=1, WATCHDOG=1, STOPPING=1 over the NOTIFY_SOCKET datagram protocol.

The protocol is one datagram of `KEY=VALUE` lines to the unix socket named by
NOTIFY_SOCKET (a leading '@' names the abstract namespace). Without NOTIFY_SOCKET
(not under systemd) every call is a no-op. The daemon reads the environment once, at
start-up, and hands the result here (`watchdog_interval` reads WATCHDOG_USEC the same way).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("kvd.notify")


class Notifier:
    """The sd_notify socket named at start-up (or none: every call is a no-op)."""

    def __init__(self, notify_socket: str | None) -> None:
        self._warned = False
        self._addr = None
        if notify_socket:
            self._addr = "\0" + notify_socket[1:] if notify_socket.startswith("@") else notify_socket

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def notify(self, state: str, block: bool = True) -> None:
        """Send one state; `block=False` drops it when the listener's queue is full. A
        listener that is gone is logged once, never raised: the daemon serves on."""
        if self._addr is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self._addr)
                s.send(state.encode(), 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("sd_notify_failed", state=state.split("\n", 1)[0], error=str(e))

    def ready(self, status: str = "") -> None:
        self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1", block=False)  # every tick: never stall the event loop on it

    def stopping(self) -> None:
        self.notify("STOPPING=1")


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of WATCHDOG_USEC, as systemd advises; None when
    systemd watches no process here or another one (WATCHDOG_PID), as sd_watchdog_enabled()."""
    usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6
