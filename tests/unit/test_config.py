"""Configuration: flags win over env vars, defaults apply, bad values fail with one line naming both."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotguard import config as cfg


def load(argv: list[str] = (), env: dict[str, str] | None = None) -> cfg.Config:
    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser)
    return cfg.load(parser.parse_args(list(argv)), environ=env or {})


def test_defaults():
    config = load(env={"NODE_NAME": "gpu-spot-1"})
    assert config.node_name == "gpu-spot-1"
    assert config.provider == "auto"
    assert (config.listen_host, config.listen_port) == ("0.0.0.0", 9101)
    assert config.dry_run is False and config.notice_seconds is None and config.metadata_url is None


def test_flag_wins_over_environment():
    config = load(["--node-name", "from-flag", "--notice-seconds", "120"],
                  env={"NODE_NAME": "from-env", "SPOTGUARD_NOTICE_SECONDS": "30"})
    assert config.node_name == "from-flag" and config.notice_seconds == 120


def test_every_setting_reads_its_environment_variable():
    env = {"NODE_NAME": "n1", "SPOTGUARD_PROVIDER": "gce", "SPOTGUARD_METADATA_URL": "http://127.0.0.1:8089",
           "SPOTGUARD_LISTEN": "127.0.0.1:9200", "SPOTGUARD_DRY_RUN": "true", "SPOTGUARD_NOTICE_SECONDS": "90",
           "SPOTGUARD_SAFETY_MARGIN_SECONDS": "3", "SPOTGUARD_ENDPOINT_WAIT_SECONDS": "4",
           "SPOTGUARD_MAX_DRAIN_SECONDS": "60", "SPOTGUARD_DRAIN_POLL_SECONDS": "0.25",
           "SPOTGUARD_LOG_LEVEL": "debug", "SPOTGUARD_SURGE_MIN_NOTICE_SECONDS": "900",
           "SPOTGUARD_SURGE_DRAIN_RESERVE_SECONDS": "90", "SPOTGUARD_SURGE_PRIORITY_CLASS": "hold",
           "SPOTGUARD_SURGE_PLACEHOLDER_IMAGE": "registry.example/pause:3@sha256:abc",
           "SPOTGUARD_WEBHOOK_URLS": "https://hooks.slack.com/services/T/B/s, http://127.0.0.1:8080/hook",
           "SPOTGUARD_POLL_SECONDS": "0.5", "SPOTGUARD_SCHEDULED_EVENT_LEAD_SECONDS": "0",
           "SPOTGUARD_CORDON_ONLY": "true", "SPOTGUARD_REBALANCE_ACTION": "Cordon-And-Drain",
           "SPOTGUARD_REBALANCE_RELEASE_SECONDS": "600", "SPOTGUARD_ASG_TERMINATION_ACTION": "cordon",
           "SPOTGUARD_WEBHOOK_TEMPLATE": "{event} on {node}", "SPOTGUARD_EXCLUDE_FROM_LOAD_BALANCERS": "true",
           "SPOTGUARD_WEBHOOK_HEADERS": "Authorization: Bearer a,b\n\nX-Team:  gpu "}
    assert set(env) == {s.env for s in cfg.SETTINGS}
    config = load(env=env)
    assert (config.provider, config.metadata_url, config.listen_port, config.dry_run) == \
           ("gce", "http://127.0.0.1:8089", 9200, True)
    assert (config.notice_seconds, config.safety_margin_seconds, config.endpoint_wait_seconds,
            config.max_drain_seconds, config.drain_poll_seconds, config.log_level) == (90, 3, 4, 60, 0.25, "debug")
    assert (config.surge_min_notice_seconds, config.surge_drain_reserve_seconds, config.surge_priority_class,
            config.surge_placeholder_image) == (900, 90, "hold", "registry.example/pause:3@sha256:abc")
    assert config.webhook_urls == ("https://hooks.slack.com/services/T/B/s", "http://127.0.0.1:8080/hook")
    assert config.poll_seconds == 0.5 and load([], {"NODE_NAME": "n"}).poll_seconds is None
    assert (config.cordon_only, config.rebalance_action, config.rebalance_release_seconds) == \
        (True, "cordon-and-drain", 600)
    defaults = load([], {"NODE_NAME": "n"})
    assert (config.asg_termination_action, defaults.asg_termination_action) == ("cordon", "cordon-and-drain")
    assert (config.webhook_template, defaults.webhook_template) == ("{event} on {node}", None)
    assert (defaults.cordon_only, defaults.rebalance_action, defaults.rebalance_release_seconds) == (False, "log", 1800)
    assert load(["--rebalance-action", "Surge"], {"NODE_NAME": "n"}).rebalance_action == "surge"
    assert (config.exclude_from_load_balancers, defaults.exclude_from_load_balancers) == (True, False)
    assert config.webhook_headers == (("Authorization", "Bearer a,b"), ("X-Team", "gpu")) and defaults.webhook_headers == ()
    assert config.scheduled_event_lead_seconds == 0 and load([], {"NODE_NAME": "n"}).scheduled_event_lead_seconds == 3600


def test_webhook_urls_repeat_as_flags_and_a_bad_one_is_named_without_its_secret():
    config = load(["--webhook-url", "https://a.example/x", "--webhook-url", "https://b.example/y"], {"NODE_NAME": "n"})
    assert config.webhook_urls == ("https://a.example/x", "https://b.example/y")
    assert load([], {"NODE_NAME": "n"}).webhook_urls == ()
    with pytest.raises(cfg.ConfigError) as error:
        load([], {"NODE_NAME": "n", "SPOTGUARD_WEBHOOK_URLS": "https://ok.example/x,hooks.slack.com/services/T/B/s3cr3t"})
    assert str(error.value) == ("--webhook-url / SPOTGUARD_WEBHOOK_URLS: each must be an http(s) URL; "
                                "no scheme://?/... is not")
    assert "s3cr3t" not in str(error.value)


@pytest.mark.parametrize("flag,value,says", [
    ("--surge-min-notice-seconds", "-1", "--surge-min-notice-seconds / SPOTGUARD_SURGE_MIN_NOTICE_SECONDS: must be a number of seconds >= 0, got '-1'"),
    ("--surge-priority-class", "Low Priority", "--surge-priority-class / SPOTGUARD_SURGE_PRIORITY_CLASS: must be a Kubernetes object name (lower-case DNS subdomain), got 'Low Priority'"),
    ("--surge-placeholder-image", "pause 3", "--surge-placeholder-image / SPOTGUARD_SURGE_PLACEHOLDER_IMAGE: must be an image reference like registry.k8s.io/pause:3.10.2, got 'pause 3'"),
])
def test_bad_surge_settings_name_their_flag(flag: str, value: str, says: str):
    with pytest.raises(cfg.ConfigError) as error:
        load([flag, value], {"NODE_NAME": "n"})
    assert str(error.value) == says


def test_gce_metadata_host_is_honoured_when_no_url_is_given():
    from spotguard.providers import make_provider

    def gce_url(env: dict[str, str]) -> str:
        return make_provider(load(["--provider", "gce"], {"NODE_NAME": "n", **env})).root_url  # type: ignore[attr-defined]

    assert gce_url({"GCE_METADATA_HOST": "127.0.0.1:9999"}) == "http://127.0.0.1:9999"
    assert gce_url({"GCE_METADATA_HOST": "127.0.0.1:9999", "SPOTGUARD_METADATA_URL": "http://127.0.0.2"}) == \
        "http://127.0.0.2"
    assert gce_url({}) == "http://metadata.google.internal"


@pytest.mark.parametrize("argv, env, names", [
    ([], {}, "--node-name / NODE_NAME"),
    (["--node-name", "Bad_Name"], {}, "--node-name / NODE_NAME"),
    (["--provider", "openstack"], {"NODE_NAME": "n"}, "--provider / SPOTGUARD_PROVIDER"),
    ([], {"NODE_NAME": "n", "SPOTGUARD_METADATA_URL": "metadata.google.internal"},
     "--metadata-url / SPOTGUARD_METADATA_URL"),
    ([], {"NODE_NAME": "n", "SPOTGUARD_METADATA_URL": "http://h/computeMetadata/v1"},
     "--metadata-url / SPOTGUARD_METADATA_URL"),
    (["--listen", "9101"], {"NODE_NAME": "n"}, "--listen / SPOTGUARD_LISTEN"),
    ([], {"NODE_NAME": "n", "SPOTGUARD_DRY_RUN": "maybe"}, "--dry-run / SPOTGUARD_DRY_RUN"),
    (["--notice-seconds", "-5"], {"NODE_NAME": "n"}, "--notice-seconds / SPOTGUARD_NOTICE_SECONDS"),
    (["--notice-seconds", "nan"], {"NODE_NAME": "n"}, "--notice-seconds / SPOTGUARD_NOTICE_SECONDS"),
    (["--drain-poll-seconds", "0"], {"NODE_NAME": "n"}, "--drain-poll-seconds / SPOTGUARD_DRAIN_POLL_SECONDS"),
    (["--webhook-template", "{node.__dict__}"], {"NODE_NAME": "n"}, "--webhook-template / SPOTGUARD_WEBHOOK_TEMPLATE"),
    (["--rebalance-action", "drain"], {"NODE_NAME": "n"}, "--rebalance-action / SPOTGUARD_REBALANCE_ACTION"),
    (["--rebalance-action", "surge", "--surge-min-notice-seconds", "0"], {"NODE_NAME": "n"},
     "--rebalance-action / SPOTGUARD_REBALANCE_ACTION"),
    (["--rebalance-release-seconds", "0"], {"NODE_NAME": "n"},
     "--rebalance-release-seconds / SPOTGUARD_REBALANCE_RELEASE_SECONDS"),
    (["--scheduled-event-lead-seconds", "-60"], {"NODE_NAME": "n"},
     "--scheduled-event-lead-seconds / SPOTGUARD_SCHEDULED_EVENT_LEAD_SECONDS"),
    ([], {"NODE_NAME": "n", "GCE_METADATA_HOST": "a b"}, "GCE_METADATA_HOST"),
])
def test_bad_setting_names_the_flag_and_env_var(argv, env, names):
    with pytest.raises(cfg.ConfigError) as raised:
        load(argv, env)
    message = str(raised.value)
    assert message.startswith(names) and "\n" not in message


def test_gce_metadata_host_never_points_another_cloud_at_gce():
    from spotguard.providers import make_provider

    env = {"NODE_NAME": "n", "GCE_METADATA_HOST": "127.0.0.1:9999"}
    assert load(["--provider", "aws"], env).gce_metadata_host_url is None
    # Under auto it is kept for the GCE probe only; AWS and Azure probe their own address.
    auto = load(["--provider", "auto"], env)
    assert auto.metadata_url is None and auto.gce_metadata_host_url == "http://127.0.0.1:9999"
    assert make_provider(auto, name="aws").root_url == "http://169.254.169.254"  # type: ignore[attr-defined]
    assert make_provider(auto, name="gce").root_url == "http://127.0.0.1:9999"  # type: ignore[attr-defined]


def test_bad_config_exits_2_with_one_line_and_no_traceback():
    result = subprocess.run([sys.executable, "-m", "spotguard", "run", "--node-name", "n", "--listen", "x"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "spotguard: error: --listen / SPOTGUARD_LISTEN: must be HOST:PORT with a port between 1 and 65535, got 'x'"]


# Parametrized rather than drawn, so every setting's parser gets its own 1,000 values.
@pytest.mark.parametrize("dest", [s for s in cfg.SETTINGS if s.dest != "node_name"], ids=lambda s: s.dest)
@settings(max_examples=1000, deadline=None)
@given(value=st.text(max_size=40))
def test_any_value_for_any_setting_loads_or_fails_with_a_config_error(dest, value):
    env = {"NODE_NAME": "n", dest.env: value}
    try:
        config = load(env=env)
    except cfg.ConfigError as error:
        # The flag at fault is named; a margin longer than the notice names both of them.
        assert f"{dest.flag} / {dest.env}" in str(error) or str(error).startswith("GCE_METADATA_HOST")
    else:
        assert isinstance(config, cfg.Config)


@settings(max_examples=1000, deadline=None)
@given(name=st.text(max_size=300))
def test_any_node_name_loads_or_fails_with_a_config_error(name):
    try:
        config = load(env={"NODE_NAME": name})
    except cfg.ConfigError as error:
        assert str(error).startswith("--node-name / NODE_NAME:")
    else:
        assert config.node_name == name.strip()


@settings(max_examples=1000, deadline=None)
@given(host=st.text(max_size=60))
def test_any_gce_metadata_host_loads_or_fails_with_a_config_error(host):
    # Google's own variable, read by the GCE provider when no --metadata-url is given: outside
    # input like the others.
    try:
        config = load(env={"NODE_NAME": "n", "GCE_METADATA_HOST": host})
    except cfg.ConfigError as error:
        assert str(error).startswith("GCE_METADATA_HOST:")
    else:
        url = config.gce_metadata_host_url
        assert url is None if not host.strip() else url.startswith("http://")


@pytest.mark.parametrize(("argv", "shortest"), [(["--safety-margin-seconds", "30"], "30 s, the shortest a cloud gives"),
                                                (["--safety-margin-seconds", "45", "--notice-seconds", "40"],
                                                 "40 s, --notice-seconds / SPOTGUARD_NOTICE_SECONDS")])
def test_a_safety_margin_as_long_as_the_notice_is_refused(argv: list[str], shortest: str) -> None:
    with pytest.raises(cfg.ConfigError) as raised:
        load(argv, env={"NODE_NAME": "n"})
    message = str(raised.value)
    assert message.startswith("--safety-margin-seconds / SPOTGUARD_SAFETY_MARGIN_SECONDS: must be shorter")
    assert shortest in message and "\n" not in message
    assert load(["--safety-margin-seconds", "60", "--notice-seconds", "120"], env={"NODE_NAME": "n"})


def _run_daemon(*flags: str, tmp_path) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    # A kubeconfig that parses (no API server is ever reached: listening comes first).
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text('{"apiVersion": "v1", "kind": "Config", "current-context": "c", '
                          '"clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:1"}}], '
                          '"users": [{"name": "u", "user": {"token": "t"}}], '
                          '"contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}')
    return subprocess.run([sys.executable, "-m", "spotguard", "run", "--node-name", "n", "--provider", "gce",
                           "--metadata-url", "http://127.0.0.1:1", *flags], capture_output=True, text=True,
                          timeout=60, env={"KUBECONFIG": str(kubeconfig), "PATH": "/usr/bin:/bin"})


def test_a_listen_address_in_use_is_one_line_and_exit_2(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run_daemon("--listen", f"127.0.0.1:{port}", tmp_path=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"spotguard: error: --listen / SPOTGUARD_LISTEN: cannot listen on 127.0.0.1:{port}")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_listen_host_that_does_not_resolve_is_one_line_and_exit_2(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = _run_daemon("--listen", "no-such-host.invalid:9101", tmp_path=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "--listen / SPOTGUARD_LISTEN: cannot listen on no-such-host.invalid:9101" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_webhook_headers_repeat_as_flags_and_a_bad_one_is_named_without_its_value():
    config = load(["--webhook-header", "Authorization: Bearer s3cret, with a comma", "--webhook-header", "X-A: 1"],
                  {"NODE_NAME": "n"})
    assert config.webhook_headers == (("Authorization", "Bearer s3cret, with a comma"), ("X-A", "1"))
    for bad, named in (("Authorization Bearer s3cret", "a line has no ':'"),
                       ("Bad Name: s3cret", "'Bad Name'"), ("X-Empty:", "'X-Empty'"),
                       ("Content-Type: text/s3cret", "Content-Type is spotguard's own")):
        with pytest.raises(cfg.ConfigError) as error:
            load(["--webhook-header", bad], {"NODE_NAME": "n"})
        message = str(error.value)
        assert message.startswith("--webhook-header / SPOTGUARD_WEBHOOK_HEADERS: ") and named in message, message
        assert "s3cret" not in message, message
