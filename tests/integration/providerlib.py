"""What the provider tests share: a recorder of on_error/on_ok calls, a watch() runner and a Config
built the way the daemon builds it (waiting and free ports come from spotguard_sim.support)."""

from __future__ import annotations

import argparse
import asyncio
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from spotguard_sim.support import eventually, free_port  # noqa: F401 - re-exported for the provider tests

from spotguard.config import Config, add_arguments, load
from spotguard.notice import Notice


@dataclass
class Calls:
    errors: list[str] = field(default_factory=list)
    oks: int = 0

    def on_error(self, reason: str) -> None:
        self.errors.append(reason)

    def on_ok(self) -> None:
        self.oks += 1


class Watcher:
    """Runs provider.watch() in a task and queues what it yields."""

    def __init__(self, provider: Any) -> None:
        self.provider = provider
        self.items: asyncio.Queue[Notice | None] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with aclosing(self.provider.watch()) as notices:
            async for notice in notices:
                await self.items.put(notice)

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def next(self, timeout: float = 3.0) -> Notice | None:
        """The next item; re-raises at once if watch() itself failed, rather than timing out."""
        assert self.task is not None
        getter = asyncio.ensure_future(self.items.get())
        try:
            done, _ = await asyncio.wait([getter, self.task], timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
        if getter in done:
            return getter.result()
        if self.task in done:
            self.task.result()
            raise AssertionError("watch() ended without an error")
        raise TimeoutError(f"nothing yielded within {timeout} s")


def config(*flags: str) -> Config:
    """A Config built the way the daemon builds it (flags, no environment), so new settings with
    defaults don't break these tests."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return load(parser.parse_args(["--node-name", "node-a", *flags]), environ={})


# Fault modes every emulator has, and the reason each must be counted under.
FAULTS = [("http_500", "http_5xx"), ("http_503", "http_5xx"), ("http_429", "http_429"), ("hang", "timeout"),
          ("slow", "timeout"), ("garbage", "bad_body"), ("refuse", "connection")]


async def assert_fault_is_retried_and_the_notice_arrives_after(emulator: Any, watcher: Watcher, calls: Calls,
                                                               mode: str, reason: str) -> None:
    """With a watch running and no notice: the fault is counted under `reason`; a preemption made
    while the server is broken is not taken from what it says; after recovery the notice arrives."""
    from spotguard.notice import NoticeKind

    watcher.start()
    assert await watcher.next() is None
    emulator.set_fault(mode, seconds=2.0)
    await eventually(lambda: reason in calls.errors, what=f"an error with reason {reason}")
    emulator.preempt()
    await asyncio.sleep(0.3)
    assert watcher.items.empty()
    assert watcher.task is not None and not watcher.task.done()
    oks_before = calls.oks
    emulator.set_fault("none")
    notice = await watcher.next(timeout=4.0)
    assert notice is not None and notice.kind is NoticeKind.PREEMPTION
    assert calls.oks > oks_before and set(calls.errors) == {reason}
