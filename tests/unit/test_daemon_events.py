"""Events whose POST fails are posted again in the background (spotguard.daemon.Daemon._execute).

The Daemon runs with a stand-in for the Kubernetes adapter whose Event POSTs fail a given number of
times; everything else is the real code path from `_execute` to `Kube.record_event`."""

from __future__ import annotations

import argparse
import asyncio

import pytest
from spotguard_sim.support import metric_value

from spotguard import daemon as daemon_module
from spotguard import lifecycle as lc
from spotguard.config import add_arguments, load
from spotguard.kube import KubeError
from spotguard.observability import Metrics


class FlakyEvents:
    """Stands in for spotguard.kube.Kube: record_event fails `failures` times, then works."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts: list[str] = []
        self.posted: list[str] = []

    def record_event(self, report: lc.Report, *, node_uid: str | None) -> None:
        self.attempts.append(report.reason)
        if len(self.attempts) <= self.failures:
            raise KubeError(503, "the API server is busy")
        self.posted.append(report.reason)


def make_daemon(kube: FlakyEvents) -> daemon_module.Daemon:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = load(parser.parse_args(["--node-name", "node-a", "--provider", "gce"]), environ={})
    return daemon_module.Daemon(config=config, provider=None, kube=kube,  # type: ignore[arg-type]
                                metrics=Metrics(provider="gce"), timing=lc.Timing())


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon_module, "EVENT_RETRY_BASE_SECONDS", 0.01)


def events_counted(daemon: daemon_module.Daemon, result: str) -> float:
    from prometheus_client import generate_latest

    return metric_value(generate_latest(daemon.metrics.registry).decode(), "spotguard_actions_total",
                        action="event", result=result)


async def wait_for_retries(daemon: daemon_module.Daemon) -> None:
    while daemon._event_retries:
        await asyncio.gather(*daemon._event_retries, return_exceptions=True)


async def test_an_event_that_fails_twice_is_posted_on_the_third_try() -> None:
    kube = FlakyEvents(failures=2)
    daemon = make_daemon(kube)
    await daemon._execute((lc.Report("TerminationNotice", "preemption", warning=True),), first_reaction=False)
    await wait_for_retries(daemon)
    assert kube.attempts == ["TerminationNotice"] * 3
    assert kube.posted == ["TerminationNotice"]
    assert events_counted(daemon, "error") == 2 and events_counted(daemon, "ok") == 1
    assert daemon.failed_actions == 0   # Events never slow down the decide loop's own retries


async def test_an_event_that_keeps_failing_is_dropped_after_its_retries() -> None:
    kube = FlakyEvents(failures=100)
    daemon = make_daemon(kube)
    await daemon._execute((lc.Report("Drained", "no requests in flight"),), first_reaction=False)
    await wait_for_retries(daemon)
    assert len(kube.attempts) == 1 + daemon_module.EVENT_RETRIES
    assert kube.posted == []
    assert events_counted(daemon, "error") == 1 + daemon_module.EVENT_RETRIES


async def test_an_event_posted_at_once_is_not_posted_again() -> None:
    kube = FlakyEvents(failures=0)
    daemon = make_daemon(kube)
    await daemon._execute((lc.Report("NodeDrained", "every evictable pod is evicted"),), first_reaction=False)
    assert not daemon._event_retries
    assert kube.posted == ["NodeDrained"]
