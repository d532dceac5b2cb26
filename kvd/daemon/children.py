"""ChildProcess: a spawned worker or messenger, and a future that resolves when it exits.

Children are started with multiprocessing's spawn context (a fresh interpreter: no
forked torch or ZeroMQ state). Their exit is awaited, never polled: the process
sentinel is a file descriptor the event loop watches, so a kill -9 is noticed at once.
A child's entry function is named by its dotted path and imported in the child: the
daemon itself never imports torch (about 3 s of start-up on the critical path).
"""

from __future__ import annotations

import asyncio
import importlib
import multiprocessing
import os
import signal
import time

_spawn = multiprocessing.get_context("spawn")


def _enter(target: str, *args) -> None:
    """In the child: import `module:function` and run it."""
    module, _, function = target.partition(":")
    getattr(importlib.import_module(module), function)(*args)


class ChildProcess:
    def __init__(self, name: str, target: str, args: tuple) -> None:
        self.name = name
        self._target = target
        self._args = args
        self.proc: multiprocessing.process.BaseProcess | None = None
        self.exited: asyncio.Future[int] | None = None
        self.ready = False
        self.starts = 0
        self.started_at = 0.0  # time.monotonic() of the last start

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.ready = False
        self.starts += 1
        self.started_at = time.monotonic()
        self.proc = _spawn.Process(target=_enter, args=(self._target, self.name, *self._args), name=self.name)
        self.proc.start()
        self.exited = loop.create_future()
        sentinel = self.proc.sentinel
        proc, fut = self.proc, self.exited

        def on_exit() -> None:
            loop.remove_reader(sentinel)
            proc.join(0)
            if not fut.done():
                fut.set_result(proc.exitcode if proc.exitcode is not None else -1)

        loop.add_reader(sentinel, on_exit)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.exited is not None and not self.exited.done()

    async def stop(self, timeout: float) -> None:
        """Wait for a clean exit (after Shutdown was sent), then SIGKILL."""
        if not self.alive:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        except TimeoutError:
            os.kill(self.proc.pid, signal.SIGKILL)
            await self.exited
