"""Webhooks: tell people's channels what spotguard does (--webhook-url, SPOTGUARD_WEBHOOK_URLS).

The moments an on-call engineer wants in a channel, each a lifecycle `Report` the daemon already
makes: a notice (TerminationNotice, SurgeStarted), a pod evicted, an eviction blocked by a
PodDisruptionBudget (named), the node drained, a surge given up, a notice withdrawn, a missed
deadline. Each becomes one JSON POST per URL:

- Slack incoming webhooks (`https://hooks.slack.com/...`) get `{"text": ...}`, all Slack accepts;
- any other URL gets the generic body: `text` (the same one line, so Mattermost, Rocket.Chat and
  other Slack-compatible receivers show it too) plus the fields a program needs: `event`, `node`,
  `notice_kind`, `deadline` (RFC 3339) and `seconds_to_deadline`, `pod` and `pdb` when there is one,
  `message`, `warning`, `sent_at`.

`--webhook-header 'Name: value'` adds a header to every POST (an Authorization token, a routing
key), never logged. `--webhook-template` replaces the one-line `text` with the operator's own, Python `str.format`
style over those fields (`{node}`, `{pod}`, `{pdb}`, `{notice_kind}`, `{deadline}`,
`{seconds_to_deadline}`, `{event}`, `{message}`, ...); only plain field names are allowed, checked
at start (`check_template`), so a template can neither fail at the notice nor reach into objects.

Delivery never delays a drain: `Notifier.send` only queues (a bounded queue per URL; when one is
full its oldest message is dropped and counted), one background task per URL POSTs with a timeout
per attempt and retries with backoff, so a dead receiver delays neither the drain nor the others, and every outcome is counted (spotguard_webhook_deliveries_total) for the
SpotguardWebhookFailing alert. A proxy comes from HTTPS_PROXY / HTTP_PROXY / NO_PROXY.
"""

from __future__ import annotations

import asyncio
import json
import re
import string
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import urlsplit

import aiohttp
import structlog

from spotguard import lifecycle as lc
from spotguard.backoff import backoff_delay

log = structlog.get_logger("spotguard.webhooks")

# What is worth a message in a channel (not every pod's NotServing: the notice says how many).
REASONS = frozenset({
    lc.Reason.TERMINATION_NOTICE, lc.Reason.CORDONED, lc.Reason.SURGE_STARTED, lc.Reason.EVICTED, lc.Reason.EVICTION_BLOCKED,
    lc.Reason.NODE_DRAINED, lc.Reason.SURGE_GIVEN_UP, lc.Reason.NOTICE_CANCELLED, lc.Reason.DEADLINE_MISSED,
})
QUEUE_LIMIT = 200
ATTEMPTS = 4
TIMEOUT_SECONDS = 5.0
_PDB = re.compile(r"PodDisruptionBudget (\S+) allows no disruption")
# What a --webhook-template may name: the generic body's fields and `text`, the default line.
TEMPLATE_FIELDS = ("event", "node", "message", "warning", "dry_run", "notice_kind", "deadline",
                   "seconds_to_deadline", "pod", "pdb", "sent_at", "text")


def check_template(template: str) -> str:
    """The template, if every replacement field is one of TEMPLATE_FIELDS with no attribute,
    index, conversion or format spec (a spec could fail on a field that is empty); ValueError
    naming the first bad one otherwise."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as error:
        raise ValueError(f"not a valid template ({error})") from None
    for name, spec, conversion in fields:
        if name not in TEMPLATE_FIELDS or spec or conversion is not None:
            raise ValueError(f"each field must be one of {{{'}, {'.join(TEMPLATE_FIELDS)}}}, plainly; "
                             f"{{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}} is not")
    return template


@dataclass(frozen=True)
class Message:
    reason: lc.Reason
    node: str
    text: str
    fields: dict[str, Any]


def message(report: lc.Report, *, node: str, progress: lc.Progress | None, now: float,
            dry_run: bool = False, template: str | None = None) -> Message:
    """The message for one report: a one-line `text` (or the operator's `template`, checked by
    `check_template`, over the fields) and the structured fields. Pure."""
    where = f"{report.pod.key} on node {node}" if report.pod else f"node {node}"
    left = f" ({progress.deadline - now:.0f}s to the {progress.notice_kind} deadline)" if progress else ""
    text = (f"{'[dry run] ' if dry_run else ''}{'⚠️ ' if report.warning else ''}spotguard {report.reason}: "
            f"{where}: {report.message}{left}")
    fields: dict[str, Any] = {
        "event": str(report.reason), "node": node, "message": report.message, "warning": report.warning,
        "dry_run": dry_run,
        "notice_kind": progress.notice_kind if progress else None,
        "deadline": _rfc3339(progress.deadline) if progress else None,
        "seconds_to_deadline": round(progress.deadline - now, 1) if progress else None,
        "pod": report.pod.key if report.pod else None,
        "pdb": _pdb(report), "sent_at": _rfc3339(now),
    }
    if template is not None:
        text = template.format_map({**{k: "" if v is None else v for k, v in fields.items()}, "text": text})
    return Message(reason=report.reason, node=node, text=text, fields=fields)


def body_for(url: str, msg: Message) -> dict[str, Any]:
    if (urlsplit(url).hostname or "").lower() == "hooks.slack.com":
        return {"text": msg.text}
    return {"text": msg.text, **msg.fields}


def _pdb(report: lc.Report) -> str | None:
    if report.reason is not lc.Reason.EVICTION_BLOCKED:
        return None
    found = _PDB.search(report.message)
    return found.group(1) if found else None


def _rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Notifier:
    """Queues messages and POSTs them in the background; see the module docstring."""

    def __init__(self, urls: tuple[str, ...], *, count: Callable[[str], None], dry_run: bool = False,
                 template: str | None = None, headers: tuple[tuple[str, str], ...] = (), timeout_seconds: float = TIMEOUT_SECONDS, attempts: int = ATTEMPTS,
                 retry_base_seconds: float = 1.0) -> None:
        self.urls = urls
        self.dry_run = dry_run
        self.template = template
        self.headers = {**dict(headers), "Content-Type": "application/json"}
        self.count = count  # count(result): "ok", "error" (attempts spent), "dropped" (queue full)
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self.attempts = attempts
        self.retry_base_seconds = retry_base_seconds
        self._queues: dict[str, asyncio.Queue[Message]] = {url: asyncio.Queue(maxsize=QUEUE_LIMIT) for url in urls}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._deliver_forever(url), name=f"webhook-{index}")
                           for index, url in enumerate(self.urls)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def send(self, report: lc.Report, *, node: str, progress: lc.Progress | None) -> None:
        """Queue the report for every URL if it is worth a message; never waits."""
        if not self.urls or report.reason not in REASONS:
            return
        msg = message(report, node=node, progress=progress, now=time.time(), dry_run=self.dry_run,
                      template=self.template)
        for url, queue in self._queues.items():
            if queue.full():
                queue.get_nowait()
                self.count("dropped")
                log.warning("webhook queue full; oldest message dropped", url=_redacted(url), limit=QUEUE_LIMIT)
            queue.put_nowait(msg)

    async def _deliver_forever(self, url: str) -> None:
        # trust_env: HTTPS_PROXY / HTTP_PROXY / NO_PROXY, as operators expect from any HTTP client.
        async with aiohttp.ClientSession(timeout=self.timeout, trust_env=True) as session:
            while True:
                msg = await self._queues[url].get()
                try:
                    await self._deliver(session, url, msg)
                except Exception:  # noqa: BLE001 - one bad message must not end every later one
                    self.count("error")
                    log.exception("webhook delivery failed", url=_redacted(url), reason=str(msg.reason))

    async def _deliver(self, session: aiohttp.ClientSession, url: str, msg: Message) -> None:
        target = _redacted(url)
        data = json.dumps(body_for(url, msg))
        for attempt in range(self.attempts):
            try:
                async with session.post(url, data=data, headers=self.headers) as response:
                    if response.status < 300:
                        self.count("ok")
                        return
                    problem = f"HTTP {response.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
                problem = type(error).__name__ if isinstance(error, asyncio.TimeoutError) else str(error)[:200]
            if attempt + 1 < self.attempts:
                await asyncio.sleep(backoff_delay(attempt + 1, base=self.retry_base_seconds, cap=30.0))
        self.count("error")
        log.warning("webhook not delivered", url=target, reason=str(msg.reason), attempts=self.attempts,
                    error=problem)


def _redacted(url: str) -> str:
    """Where a message went, for logs: scheme and host only (Slack's path is its secret)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}/..."
