"""spotguard.webhooks: what a channel receives (pure; delivery is tested in tests/integration)."""

from __future__ import annotations

from spotguard import lifecycle as lc
from spotguard import webhooks

T0 = 1_800_000_000.0
POD = lc.PodFacts(namespace="ml", name="vllm-0", uid="uid-0", serving=True, serving_condition=False,
                  not_evictable=None, terminating=False)
PROGRESS = lc.Progress(phase=lc.Phase.EVICTING, notice_kind="preemption", deadline=T0 + 30, noticed_at=T0,
                       phase_since=T0, cordoned_by_us=True, tainted_by_us=True)


def test_a_blocked_eviction_names_node_pod_pdb_and_deadline():
    report = lc.Report(lc.Reason.EVICTION_BLOCKED, "PodDisruptionBudget vllm-pdb allows no disruption; retrying "
                                                   "until the deadline", pod=POD, warning=True)
    msg = webhooks.message(report, node="gpu-1", progress=PROGRESS, now=T0 + 12)
    assert msg.text == ("⚠️ spotguard EvictionBlocked: ml/vllm-0 on node gpu-1: PodDisruptionBudget vllm-pdb allows "
                        "no disruption; retrying until the deadline (18s to the preemption deadline)")
    body = webhooks.body_for("https://alerts.example/hook", msg)
    assert body == {"text": msg.text, "event": "EvictionBlocked", "node": "gpu-1", "message": report.message,
                    "warning": True, "dry_run": False, "notice_kind": "preemption",
                    "deadline": "2027-01-15T08:00:30.000Z", "seconds_to_deadline": 18.0, "pod": "ml/vllm-0",
                    "pdb": "vllm-pdb", "sent_at": "2027-01-15T08:00:12.000Z"}


def test_slack_gets_only_text_and_a_withdrawn_notice_has_no_deadline():
    report = lc.Report(lc.Reason.NOTICE_CANCELLED, "the host-maintenance notice was withdrawn: undid spotguard's "
                                                   "cordon and taint")
    msg = webhooks.message(report, node="gpu-1", progress=None, now=T0, dry_run=True)
    assert webhooks.body_for("https://hooks.slack.com/services/T0/B0/secret", msg) == {"text": msg.text}
    assert msg.text.startswith("[dry run] spotguard NoticeCancelled: node gpu-1: the host-maintenance notice")
    assert msg.fields["deadline"] is None and msg.fields["pod"] is None and msg.fields["dry_run"] is True


def test_only_the_moments_people_act_on_are_sent():
    assert lc.Reason.NOT_SERVING not in webhooks.REASONS and lc.Reason.DRAINED not in webhooks.REASONS
    assert {lc.Reason.TERMINATION_NOTICE, lc.Reason.EVICTION_BLOCKED, lc.Reason.DEADLINE_MISSED,
            lc.Reason.NOTICE_CANCELLED} <= webhooks.REASONS
    sent: list[str] = []
    notifier = webhooks.Notifier(("http://127.0.0.1:9/hook",), count=sent.append)
    queue = notifier._queues["http://127.0.0.1:9/hook"]
    notifier.send(lc.Report(lc.Reason.NOT_SERVING, "x", pod=POD), node="gpu-1", progress=PROGRESS)
    assert queue.qsize() == 0
    notifier.send(lc.Report(lc.Reason.TERMINATION_NOTICE, "x"), node="gpu-1", progress=PROGRESS)
    assert queue.qsize() == 1


def test_a_full_queue_drops_the_oldest_message_and_counts_it():
    counted: list[str] = []
    urls = ("http://127.0.0.1:9/a", "http://127.0.0.1:9/b")
    notifier = webhooks.Notifier(urls, count=counted.append)
    for index in range(webhooks.QUEUE_LIMIT + 3):   # a queue per URL, each 3 over its limit
        notifier.send(lc.Report(lc.Reason.EVICTED, f"pod {index}", pod=POD), node="gpu-1", progress=PROGRESS)
    assert counted == ["dropped"] * 6
    for url in urls:
        queue = notifier._queues[url]
        assert queue.qsize() == webhooks.QUEUE_LIMIT and queue.get_nowait().fields["message"] == "pod 3"


def test_a_template_replaces_the_text_and_fills_missing_fields_with_nothing():
    report = lc.Report(lc.Reason.EVICTION_BLOCKED, "PodDisruptionBudget vllm-pdb allows no disruption; retrying "
                                                   "until the deadline", pod=POD, warning=True)
    template = webhooks.check_template("{event} {pod} ({pdb}) on {node}, {seconds_to_deadline}s left | {text}")
    msg = webhooks.message(report, node="gpu-1", progress=PROGRESS, now=T0 + 12, template=template)
    assert msg.text.startswith("EvictionBlocked ml/vllm-0 (vllm-pdb) on gpu-1, 18.0s left | ⚠️ spotguard EvictionBlocked")
    cancelled = webhooks.message(lc.Report(lc.Reason.NOTICE_CANCELLED, "withdrawn"), node="gpu-1", progress=None,
                                 now=T0, template="{event}: {pod}{deadline}|")
    assert cancelled.text == "NoticeCancelled: |"
    assert webhooks.body_for("https://hooks.slack.com/services/T/B/s", msg) == {"text": msg.text}


def test_a_template_may_name_only_plain_fields():
    for bad in ("{node.__class__}", "{fields[0]}", "{nodes}", "{node!r}", "{", "{0}", "{}",
                "{seconds_to_deadline:.0f}"):
        try:
            webhooks.check_template(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")
    assert webhooks.check_template("plain text, no fields") == "plain text, no fields"
