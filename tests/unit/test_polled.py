"""spotguard.providers.polled: a notice is yielded (and logged) when it really changes."""

from __future__ import annotations

from typing import Any

from spotguard.notice import Notice, NoticeKind
from spotguard.providers.aws import AwsProvider
from spotguard.providers.azure import AzureProvider
from spotguard.providers.polled import PolledProvider


class Scripted(PolledProvider[Any]):
    """Reads the next value of a script; `judge` passes it through."""

    name = "scripted"

    def __init__(self, script: list[Notice | None]) -> None:
        super().__init__(root_url="http://127.0.0.1:9", poll_seconds=0.001)
        self.script = script

    async def probe(self) -> None:
        pass

    async def read(self, http: Any) -> Notice | None:
        if not self.script:
            raise StopAsyncIteration_()
        return self.script.pop(0)

    def judge(self, value: Notice | None) -> Notice | None:
        return value


class StopAsyncIteration_(Exception):
    pass


def preempted(deadline: float) -> Notice:
    return Notice(NoticeKind.PREEMPTION, deadline=deadline, source="aws:spot/instance-action", detail="terminate")


async def seen(script: list[Notice | None]) -> list[Notice | None]:
    got: list[Notice | None] = []
    try:
        async for notice in Scripted(script).watch():
            got.append(notice)
    except StopAsyncIteration_:
        pass
    return got


async def test_a_deadline_that_only_moves_later_is_not_news_an_earlier_one_is():
    # AWS's metadata mock, with its defaults, answers "terminate in 2 min" from each request's time.
    script = [None, preempted(120.0), preempted(121.0), preempted(122.0), preempted(90.0), preempted(95.0), None]
    assert await seen(script) == [None, preempted(120.0), preempted(90.0), None]


def test_each_cloud_polls_at_its_own_default_unless_told():
    assert AwsProvider(root_url="http://127.0.0.1:9")._poll_seconds == 0.25
    assert AzureProvider(root_url="http://127.0.0.1:9")._poll_seconds == 1.0
    assert AwsProvider(root_url="http://127.0.0.1:9", poll_seconds=0.5)._poll_seconds == 0.5
