"""sd_notify: tell systemd READY=1, WATCHDOG=1, STOPPING=1 over the NOTIFY_SOCKET datagram protocol.

The protocol is one datagram of `KEY=VALUE` lines to the unix socket named by
NOTIFY_SOCKET (a leading '@' names the abstract namespace). Without NOTIFY_SOCKET
(not under systemd) every call is a no-op. The daemon reads the environment once, at
start-up, and hands the result here.
"""

from __future__ import annotations

import socket


class Notifier:
    def __init__(self, notify_socket: str | None) -> None:
        self._addr = None
        if notify_socket:
            self._addr = "\0" + notify_socket[1:] if notify_socket.startswith("@") else notify_socket

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def notify(self, state: str) -> None:
        if self._addr is None:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(self._addr)
            s.sendall(state.encode())

    def ready(self, status: str = "") -> None:
        self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self.notify("STOPPING=1")
