"""The daemon's configuration: one frozen dataclass built from flags and their environment variables.

Every setting is a flag that also reads an environment variable (the flag wins). A bad value is a
`ConfigError` whose message names both, so the operator sees one line such as
`--notice-seconds / SPOTGUARD_NOTICE_SECONDS: must be a number of seconds > 0, got 'soon'`.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass
from typing import Callable, Mapping
from urllib.parse import urlsplit

from spotguard.webhooks import check_template

PROVIDERS = ("auto", "gce", "aws", "azure")
# What an AWS signal that is not a spot notice (rebalance recommendation, Auto Scaling termination) does.
SIGNAL_ACTIONS = ("log", "cordon", "cordon-and-drain")
# A rebalance recommendation can also only bring up capacity (the surge's placeholders, no cordon).
REBALANCE_ACTIONS = (*SIGNAL_ACTIONS, "surge")
# GCE's spot notice, and the least Azure's Preempt gives: the shortest notice without --notice-seconds.
SHORTEST_NOTICE_SECONDS = 30.0


class ConfigError(ValueError):
    """A setting is missing or malformed; the message is one line naming the flag and env var."""


@dataclass(frozen=True)
class Config:
    node_name: str
    provider: str
    # Root of the metadata server, scheme://host[:port]; None means the provider's own default.
    metadata_url: str | None
    listen_host: str
    listen_port: int
    dry_run: bool
    # Notice length to assume when the provider gives no deadline (GCE instance/preempted).
    notice_seconds: float | None
    # Evictions must have been issued this long before the deadline, so pods can still stop.
    safety_margin_seconds: float
    # Longest wait for a pod's EndpointSlice endpoints to show not-ready before draining anyway.
    endpoint_wait_seconds: float
    # Longest drain even on long notices (a not-ready pod holds a GPU its replacement needs).
    max_drain_seconds: float
    # How often in-flight requests are read from vLLM while draining.
    drain_poll_seconds: float
    log_level: str
    # Surge (spotguard.placeholder): on notices at least this long (0: never), placeholders for the
    # pods annotated spotguard.io/surge bring up capacity first; the surge ends at the latest
    # `surge_drain_reserve_seconds` (+ the safety margin) before the deadline.
    surge_min_notice_seconds: float = 600.0
    surge_drain_reserve_seconds: float = 120.0
    surge_priority_class: str = "spotguard-placeholder"
    surge_placeholder_image: str = "registry.k8s.io/pause:3.10.2"
    # Seconds between reads of a polled metadata server (AWS, Azure); None: the provider's default.
    poll_seconds: float | None = None
    # AWS: act on an EC2 scheduled event this long before its NotBefore (0: ignore them).
    scheduled_event_lead_seconds: float = 3600.0
    # Cordon and taint only, on every notice: the pods keep serving, nothing is evicted.
    cordon_only: bool = False
    # At a notice, also label the node out of cloud load balancers (undone on a withdrawn notice).
    exclude_from_load_balancers: bool = False
    # AWS rebalance recommendation: log, cordon, or cordon-and-drain; a cordon (and drain) is
    # released this long after the recommendation if no interruption came.
    rebalance_action: str = "log"
    rebalance_release_seconds: float = 1800.0
    # AWS Auto Scaling target lifecycle state Terminated: log, cordon, or cordon-and-drain.
    asg_termination_action: str = "cordon-and-drain"
    # Where notifications are POSTed (spotguard.webhooks); none by default.
    webhook_urls: tuple[str, ...] = ()
    # Extra headers on every webhook POST (an Authorization token, a routing key); never logged.
    webhook_headers: tuple[tuple[str, str], ...] = ()
    # The webhook message's text, str.format style over its fields (spotguard.webhooks); None: the default line.
    webhook_template: str | None = None
    # Where Google's GCE_METADATA_HOST says GCE's server is (root URL): used by the GCE provider
    # when --metadata-url is not given, never by another cloud's (so `auto` on AWS ignores it).
    gce_metadata_host_url: str | None = None


@dataclass(frozen=True)
class _Setting:
    dest: str
    flag: str
    env: str
    help: str
    default: str | None = None
    is_switch: bool = False
    metavar: str | None = None
    # The flag may be repeated; its environment variable holds the values separated by `separator`.
    is_list: bool = False
    separator: str = ","
    # Never echoed in an error (a webhook URL carries its token).
    secret: bool = False


SETTINGS: tuple[_Setting, ...] = (
    _Setting("node_name", "--node-name", "NODE_NAME",
             "the node this daemon guards (set from the downward API: spec.nodeName); required",
             metavar="NAME"),
    _Setting("provider", "--provider", "SPOTGUARD_PROVIDER",
             "where preemption notices come from: auto (detect), gce, aws, azure", default="auto"),
    _Setting("metadata_url", "--metadata-url", "SPOTGUARD_METADATA_URL",
             "root URL of the metadata server, scheme://host[:port]; the provider appends its paths. "
             "For GCE, GCE_METADATA_HOST (host:port) is honoured too", metavar="URL"),
    _Setting("listen", "--listen", "SPOTGUARD_LISTEN",
             "HOST:PORT serving /metrics, /healthz and /readyz", default="0.0.0.0:9101"),
    _Setting("dry_run", "--dry-run", "SPOTGUARD_DRY_RUN",
             "log and count every action; writes go to the API server as dry runs (dryRun=All: "
             "checked, PDBs answered, nothing stored), except serving=True on a healthy node's pods",
             is_switch=True),
    _Setting("notice_seconds", "--notice-seconds", "SPOTGUARD_NOTICE_SECONDS",
             "notice length to assume when the provider gives no deadline "
             "(GCE preemption: 30, or up to 120 with preemptionNoticeDuration); on AWS and Azure only "
             "for a spot notice whose own time is unreadable (defaults 120 and 30)", metavar="SECONDS"),
    _Setting("safety_margin_seconds", "--safety-margin-seconds", "SPOTGUARD_SAFETY_MARGIN_SECONDS",
             "stop draining and evict this long before the deadline, so pods have time to stop",
             default="5", metavar="SECONDS"),
    _Setting("endpoint_wait_seconds", "--endpoint-wait-seconds", "SPOTGUARD_ENDPOINT_WAIT_SECONDS",
             "longest wait for EndpointSlices to show a pod not-ready before draining anyway",
             default="10", metavar="SECONDS"),
    _Setting("max_drain_seconds", "--max-drain-seconds", "SPOTGUARD_MAX_DRAIN_SECONDS",
             "longest wait for in-flight requests, even when the notice is long (GPU host maintenance "
             "gives 60 min): a not-ready pod holds a GPU its replacement needs", default="300",
             metavar="SECONDS"),
    _Setting("drain_poll_seconds", "--drain-poll-seconds", "SPOTGUARD_DRAIN_POLL_SECONDS",
             "how often vLLM /metrics is read while draining", default="0.5", metavar="SECONDS"),
    _Setting("log_level", "--log-level", "SPOTGUARD_LOG_LEVEL",
             "debug, info, warning or error", default="info"),
    _Setting("surge_min_notice_seconds", "--surge-min-notice-seconds", "SPOTGUARD_SURGE_MIN_NOTICE_SECONDS",
             "surge on notices at least this long (0: never): pods annotated spotguard.io/surge=true keep "
             "serving while a placeholder pod shaped like each makes the node-pool autoscaler add capacity "
             "for its replacement; then they are drained as usual", default="600", metavar="SECONDS"),
    _Setting("surge_drain_reserve_seconds", "--surge-drain-reserve-seconds", "SPOTGUARD_SURGE_DRAIN_RESERVE_SECONDS",
             "time kept for the drain after a surge: the surge is given up this long (plus the safety "
             "margin) before the deadline", default="120", metavar="SECONDS"),
    _Setting("surge_priority_class", "--surge-priority-class", "SPOTGUARD_SURGE_PRIORITY_CLASS",
             "PriorityClass of the placeholders (the chart's: negative, preemptionPolicy Never)",
             default="spotguard-placeholder", metavar="NAME"),
    _Setting("surge_placeholder_image", "--surge-placeholder-image", "SPOTGUARD_SURGE_PLACEHOLDER_IMAGE",
             "image the placeholders run (a pause image: they only hold resources)",
             default="registry.k8s.io/pause:3.10.2", metavar="IMAGE"),
    _Setting("poll_seconds", "--poll-seconds", "SPOTGUARD_POLL_SECONDS",
             "how often AWS's IMDS (default 0.25) or Azure's Scheduled Events (default 1, a per-VM "
             "throttled service other pods share) are read; GCE needs none (hanging GETs)",
             metavar="SECONDS"),
    _Setting("scheduled_event_lead_seconds", "--scheduled-event-lead-seconds",
             "SPOTGUARD_SCHEDULED_EVENT_LEAD_SECONDS",
             "AWS: act on an EC2 scheduled event (reboot, stop, retirement, maintenance) this long before "
             "its NotBefore, as on a notice that long (0: ignore scheduled events)", default="3600",
             metavar="SECONDS"),
    _Setting("cordon_only", "--cordon-only", "SPOTGUARD_CORDON_ONLY",
             "on every notice only cordon and taint the node: the pods keep serving and nothing is evicted "
             "(something else drains, or the kubelet's shutdown is all you want)", is_switch=True),
    _Setting("exclude_from_load_balancers", "--exclude-from-load-balancers",
             "SPOTGUARD_EXCLUDE_FROM_LOAD_BALANCERS",
             "at a notice also label the node node.kubernetes.io/exclude-from-external-load-balancers, so cloud "
             "load balancers stop sending traffic through it (removed again if the notice is withdrawn)",
             is_switch=True),
    _Setting("rebalance_action", "--rebalance-action", "SPOTGUARD_REBALANCE_ACTION",
             "AWS rebalance recommendation (a higher risk of interruption, not a notice): log, cordon (the "
             "pods keep serving, no new ones come), cordon-and-drain (as on a notice of --notice-seconds, "
             "default 120) or surge (placeholders bring up capacity for the pods annotated spotguard.io/surge, "
             "no cordon, the pods keep serving; needs --surge-min-notice-seconds above 0)", default="log"),
    _Setting("rebalance_release_seconds", "--rebalance-release-seconds", "SPOTGUARD_REBALANCE_RELEASE_SECONDS",
             "undo a rebalance recommendation's cordon (or release its surge) this long after it if no "
             "interruption came (EC2 keeps "
             "the recommendation listed; left alone, the node would stay cordoned for good)", default="1800",
             metavar="SECONDS"),
    _Setting("asg_termination_action", "--asg-termination-action", "SPOTGUARD_ASG_TERMINATION_ACTION",
             "AWS Auto Scaling group terminating the instance (target lifecycle state Terminated): log, "
             "cordon, or cordon-and-drain (as on a notice of --notice-seconds, default 120)",
             default="cordon-and-drain"),
    _Setting("webhook_urls", "--webhook-url", "SPOTGUARD_WEBHOOK_URLS",
             "POST a JSON notification here on a notice, an eviction, a PDB blocking one, the node "
             "drained, a surge given up, a withdrawn notice, a missed deadline (Slack incoming-webhook "
             "URLs get Slack's format); repeat the flag for more URLs, comma-separate them in the env",
             metavar="URL", is_list=True, secret=True),
    _Setting("webhook_headers", "--webhook-header", "SPOTGUARD_WEBHOOK_HEADERS",
             "an extra HTTP header on every webhook POST, 'Name: value' (e.g. 'Authorization: Bearer ...'); "
             "repeat the flag for more, one per line in the env",
             metavar="'NAME: VALUE'", is_list=True, separator="\n", secret=True),
    _Setting("webhook_template", "--webhook-template", "SPOTGUARD_WEBHOOK_TEMPLATE",
             "the webhook message's text instead of spotguard's one line, with {node}, {pod}, {pdb}, "
             "{notice_kind}, {deadline}, {seconds_to_deadline}, {event}, {message}, {text} ... "
             "(e.g. '{event} on {node}: {message}')", metavar="TEMPLATE"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every setting as a flag. Defaults stay None so `load` can tell flag, env and default apart."""
    for setting in SETTINGS:
        help_text = f"{setting.help} [env {setting.env}"
        help_text += f", default {setting.default}]" if setting.default else "]"
        if setting.is_switch:
            parser.add_argument(setting.flag, dest=setting.dest, action="store_const", const="true",
                                default=None, help=help_text)
        elif setting.is_list:
            parser.add_argument(setting.flag, dest=setting.dest, action="append", default=None,
                                metavar=setting.metavar, help=help_text)
        else:
            parser.add_argument(setting.flag, dest=setting.dest, default=None,
                                metavar=setting.metavar or setting.dest.upper(), help=help_text)


def load(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Config:
    """Build the Config from parsed flags, falling back to environment variables, then defaults."""

    def raw(setting: _Setting) -> str | None:
        value = getattr(args, setting.dest, None)
        if isinstance(value, list):  # a repeated flag: one value joined as its env holds them
            value = setting.separator.join(value)
        if value is None:
            value = environ.get(setting.env)
        if value is None or value.strip() == "":
            return setting.default
        return value.strip()

    def parsed(dest: str, parse: Callable[[str], object]) -> object:
        setting = next(s for s in SETTINGS if s.dest == dest)
        value = raw(setting)
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError as error:
            got = "" if setting.secret else f", got {value!r}"
            raise ConfigError(f"{setting.flag} / {setting.env}: {error}{got}") from None

    node_name = parsed("node_name", _node_name)
    if node_name is None:
        raise ConfigError("--node-name / NODE_NAME: required (set it from the downward API: "
                          "fieldRef spec.nodeName)")
    host, port = parsed("listen", _host_port)  # type: ignore[misc]
    provider = parsed("provider", _provider)
    metadata_url = parsed("metadata_url", _root_url)
    gce_metadata_host_url = None
    if provider in ("gce", "auto") and environ.get("GCE_METADATA_HOST", "").strip():
        gce_host = environ["GCE_METADATA_HOST"].strip()
        try:
            gce_metadata_host_url = _root_url(f"http://{gce_host}")
        except ValueError as error:
            raise ConfigError(f"GCE_METADATA_HOST: {error}, got {gce_host!r}") from None
    notice_seconds = parsed("notice_seconds", _positive_seconds)
    margin = parsed("safety_margin_seconds", _non_negative_seconds)
    # The shortest notice spotguard can meet: the one it is told, else GCE's spot and Azure's
    # Preempt minimum (30 s). A margin that long evicts at the notice with nothing drained.
    shortest = notice_seconds if notice_seconds is not None else SHORTEST_NOTICE_SECONDS
    if margin >= shortest:  # type: ignore[operator]
        told = ("--notice-seconds / SPOTGUARD_NOTICE_SECONDS" if notice_seconds is not None
                else "the shortest a cloud gives")
        raise ConfigError(f"--safety-margin-seconds / SPOTGUARD_SAFETY_MARGIN_SECONDS: must be shorter than the "
                          f"notice ({shortest:g} s, {told}), got {margin:g}")
    rebalance_action = parsed("rebalance_action", _rebalance_action)
    surge_min_notice_seconds = parsed("surge_min_notice_seconds", _non_negative_seconds)
    if rebalance_action == "surge" and not surge_min_notice_seconds:
        raise ConfigError("--rebalance-action / SPOTGUARD_REBALANCE_ACTION: surge needs the surge on "
                          "(--surge-min-notice-seconds above 0), got surge with it 0")
    return Config(
        node_name=node_name,  # type: ignore[arg-type]
        provider=provider,  # type: ignore[arg-type]
        metadata_url=metadata_url,  # type: ignore[arg-type]
        listen_host=host,
        listen_port=port,
        dry_run=bool(parsed("dry_run", _boolean)),
        notice_seconds=notice_seconds,  # type: ignore[arg-type]
        safety_margin_seconds=margin,  # type: ignore[arg-type]
        endpoint_wait_seconds=parsed("endpoint_wait_seconds", _non_negative_seconds),  # type: ignore[arg-type]
        max_drain_seconds=parsed("max_drain_seconds", _positive_seconds),  # type: ignore[arg-type]
        drain_poll_seconds=parsed("drain_poll_seconds", _positive_seconds),  # type: ignore[arg-type]
        log_level=parsed("log_level", _log_level),  # type: ignore[arg-type]
        surge_min_notice_seconds=surge_min_notice_seconds,  # type: ignore[arg-type]
        surge_drain_reserve_seconds=parsed("surge_drain_reserve_seconds", _non_negative_seconds),  # type: ignore[arg-type]
        surge_priority_class=parsed("surge_priority_class", _object_name),  # type: ignore[arg-type]
        surge_placeholder_image=parsed("surge_placeholder_image", _image),  # type: ignore[arg-type]
        webhook_urls=parsed("webhook_urls", _urls) or (),  # type: ignore[arg-type]
        webhook_template=parsed("webhook_template", check_template),  # type: ignore[arg-type]
        webhook_headers=parsed("webhook_headers", _headers) or (),  # type: ignore[arg-type]
        poll_seconds=parsed("poll_seconds", _poll_seconds),  # type: ignore[arg-type]
        cordon_only=bool(parsed("cordon_only", _boolean)),
        exclude_from_load_balancers=bool(parsed("exclude_from_load_balancers", _boolean)),
        rebalance_action=rebalance_action,  # type: ignore[arg-type]
        asg_termination_action=parsed("asg_termination_action", _signal_action),  # type: ignore[arg-type]
        rebalance_release_seconds=parsed("rebalance_release_seconds", _positive_seconds),  # type: ignore[arg-type]
        scheduled_event_lead_seconds=parsed("scheduled_event_lead_seconds", _non_negative_seconds),  # type: ignore[arg-type]
        gce_metadata_host_url=gce_metadata_host_url,
    )


_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _node_name(value: str) -> str:
    if len(value) > 253 or not _DNS_SUBDOMAIN.fullmatch(value):
        raise ValueError("must be a Kubernetes node name (lower-case DNS subdomain)")
    return value


def _poll_seconds(value: str) -> float:
    seconds = _positive_seconds(value)
    if not 0.05 <= seconds <= 10:
        raise ValueError("must be between 0.05 and 10 seconds")
    return seconds


def _urls(value: str) -> tuple[str, ...]:
    urls = tuple(url.strip() for url in value.split(",") if url.strip())
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
            # Not the URL itself: a webhook URL is often a secret (Slack's path is its token).
            raise ValueError(f"each must be an http(s) URL; {parts.scheme or 'no scheme'}://"
                             f"{parts.hostname or '?'}/... is not")
    return urls


# An HTTP header name (RFC 9110 token), and the ones spotguard writes itself.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_OWN_HEADERS = frozenset({"content-type", "content-length", "host", "transfer-encoding"})


def _headers(value: str) -> tuple[tuple[str, str], ...]:
    headers = []
    for line in (line.strip() for line in value.split("\n")):
        if not line:
            continue
        name, colon, header_value = line.partition(":")
        name, header_value = name.strip(), header_value.strip()
        if not colon:  # nothing echoed: the whole line may be the token
            raise ValueError("each must be 'Name: value'; a line has no ':'")
        # The name only: the value is often a token.
        if not _HEADER_NAME.fullmatch(name) or not header_value or any(c in header_value for c in "\r\0"):
            raise ValueError(f"each must be 'Name: value' with a header name and a value on one line; "
                             f"{name[:40] or 'an empty name'!r} is not")
        if name.lower() in _OWN_HEADERS:
            raise ValueError(f"{name} is spotguard's own (it posts JSON)")
        headers.append((name, header_value))
    return tuple(headers)


def _object_name(value: str) -> str:
    if len(value) > 253 or not _DNS_SUBDOMAIN.fullmatch(value):
        raise ValueError("must be a Kubernetes object name (lower-case DNS subdomain)")
    return value


def _image(value: str) -> str:
    if any(c.isspace() for c in value) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/:@-]*", value):
        raise ValueError("must be an image reference like registry.k8s.io/pause:3.10.2")
    return value


def _provider(value: str) -> str:
    value = value.lower()
    if value not in PROVIDERS:
        raise ValueError(f"must be one of {', '.join(PROVIDERS)}")
    return value


def _rebalance_action(value: str) -> str:
    value = value.lower()
    if value not in REBALANCE_ACTIONS:
        raise ValueError(f"must be one of {', '.join(REBALANCE_ACTIONS)}")
    return value


def _signal_action(value: str) -> str:
    value = value.lower()
    if value not in SIGNAL_ACTIONS:
        raise ValueError(f"must be one of {', '.join(SIGNAL_ACTIONS)}")
    return value


def _root_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be a root URL like http://169.254.169.254 or http://127.0.0.1:8080")
    if not re.fullmatch(r"[A-Za-z0-9.\-]+(:[0-9]+)?|\[[0-9A-Fa-f:.]+\](:[0-9]+)?", parts.netloc):
        raise ValueError("has an invalid host (no credentials, spaces or odd characters)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("must be scheme://host[:port] only; the provider appends its own paths")
    try:
        parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    return f"{parts.scheme}://{parts.netloc}"


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError("must be HOST:PORT with a port between 1 and 65535")
    return host.strip("[]"), int(port_text)


def _boolean(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if not math.isfinite(seconds):
        raise ValueError("must be a finite number of seconds")
    return seconds


def _positive_seconds(value: str) -> float:
    seconds = _seconds(value)
    if seconds <= 0:
        raise ValueError("must be a number of seconds > 0")
    return seconds


def _non_negative_seconds(value: str) -> float:
    seconds = _seconds(value)
    if seconds < 0:
        raise ValueError("must be a number of seconds >= 0")
    return seconds


def _log_level(value: str) -> str:
    lowered = value.lower()
    if lowered not in ("debug", "info", "warning", "error"):
        raise ValueError("must be debug, info, warning or error")
    return lowered
