"""How spotguard builds its Kubernetes API client (spotguard.kubeapi.new_client)."""

from __future__ import annotations

import json
import socket

from spotguard.kubeapi import KEEPALIVE, new_client


def test_api_connections_use_tcp_keepalive(tmp_path, monkeypatch) -> None:
    """A watch on a silently dead connection is noticed in about 30 s, not at its read timeout."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    api_client = new_client()
    try:
        # What urllib3 will set on every socket it opens.
        options = set(api_client.rest_client.pool_manager.connection_pool_kw["socket_options"])
        assert (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1) in options
        assert (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE["idle"]) in options
        assert (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE["interval"]) in options
        assert (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE["count"]) in options
        assert api_client.configuration.host == "https://127.0.0.1:6443"
    finally:
        api_client.close()
