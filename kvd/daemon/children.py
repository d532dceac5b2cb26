"""ChildProcess: one spawned child of the daemon (the worker or the cache messenger), restartable.

Children are spawned with multiprocessing's spawn context (a fresh interpreter: no forked
torch or ZeroMQ state) and named by the dotted path of their entry function, imported in
the child, so the daemon itself never imports torch. Their exit is awaited on the process
sentinel, never polled: a kill -9 is seen at once.
"""

from __future__ import annotations

import asyncio
import importlib
import multiprocessing
import os
import signal
import time

_spawn = multiprocessing.get_context("spawn")


class ChildDied(Exception):
    """A child ended (or never became Ready); the message names it and why."""


def _enter(target: str, *args) -> None:
    """In the child: import `module:function` and run it."""
    module, _, function = target.partition(":")
    getattr(importlib.import_module(module), function)(*args)


class ChildProcess:
    """One spawned child, restartable: its process, a future for its exit code and one for
    the reason its Dead report gives (each start makes new ones)."""

    def __init__(self, name: str, target: str, args: tuple) -> None:
        self.name = name
        self._target = target
        self._args = args
        self.proc: multiprocessing.process.BaseProcess | None = None
        self.exited: asyncio.Future[int] | None = None
        self.dead: asyncio.Future[str] | None = None
        self.ready = False
        self.handled = True  # the loss of the last start was handled (nothing to watch before a start)
        self.started_at = 0.0  # time.monotonic() of the last start

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.ready = False
        self.handled = False
        self.started_at = time.monotonic()
        self.proc = _spawn.Process(target=_enter, args=(self._target, self.name, *self._args), name=self.name)
        self.proc.start()
        self.exited = loop.create_future()
        self.dead = loop.create_future()
        sentinel = self.proc.sentinel
        proc, fut = self.proc, self.exited

        def reap(tries: int) -> None:
            # The sentinel closes as the process ends; the kernel may take a moment to have
            # its exit status: look again shortly rather than report a code it does not have.
            proc.join(0)
            if proc.exitcode is None and tries:
                loop.call_later(0.005, reap, tries - 1)
            elif not fut.done():
                fut.set_result(proc.exitcode if proc.exitcode is not None else -1)

        def on_exit() -> None:
            loop.remove_reader(sentinel)
            reap(200)

        loop.add_reader(sentinel, on_exit)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.exited is not None and not self.exited.done()

    def said_dead(self, reason: str) -> None:
        if self.dead is not None and not self.dead.done():
            self.dead.set_result(reason)

    async def stop(self, timeout: float) -> None:
        """Wait for a clean exit (after Shutdown was sent, or after Dead), then SIGKILL."""
        if not self.alive:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        except TimeoutError:
            os.kill(self.proc.pid, signal.SIGKILL)
            await self.exited
