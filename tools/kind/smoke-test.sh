#!/usr/bin/env bash
# tools/kind/smoke-test.sh: check a cluster made by tools/kind/cluster.sh up.
#
#   tools/kind/smoke-test.sh [--shutdown]
#
# Always: a pod on the first worker fetches (Python's urllib) from a pod on the second worker by
# pod IP, through a ClusterIP Service (kube-proxy), and by the Service's DNS name (CoreDNS); the
# server must see the client's own pod IP (no masquerading between nodes).
# --shutdown: then powers the second worker off (cluster.sh poweroff) with a pod on it that logs
# SIGTERM and keeps running, and shows the kubelet's graceful node shutdown: when the pod got
# SIGTERM, how long it ran after it, the kubelet's log and the pod's final status. The worker is
# started again afterwards.
# Uses the Python base image setup.sh builds (loaded into the nodes); namespace kind-smoke.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tools/kind/lib.sh
source "$HERE/lib.sh"

SHUTDOWN=false
[[ ${1:-} == --shutdown ]] && SHUTDOWN=true
KUBECTL=(/usr/local/bin/kubectl --context "kind-$CLUSTER_NAME")
NS=kind-smoke
mapfile -t WORKERS < <("${KUBECTL[@]}" get nodes -l '!node-role.kubernetes.io/control-plane' -o name | sed 's#node/##' | sort)
((${#WORKERS[@]} >= 2)) || die "needs two workers, found ${#WORKERS[@]}"
CLIENT_NODE=${WORKERS[0]}
SERVER_NODE=${WORKERS[1]}
WORK=$(mktemp -d)
cleanup() {
    jobs -p | xargs -r kill 2>/dev/null || true
    rm -rf "$WORK"
    "${KUBECTL[@]}" delete namespace "$NS" --wait=false >/dev/null 2>&1 || true
}
trap cleanup EXIT

say "loading $PYTHON_IMAGE into the nodes"
/usr/local/bin/kind load docker-image "$PYTHON_IMAGE" --name "$CLUSTER_NAME" >/dev/null 2>&1

indent() { sed -e '/^$/d' -e 's/^/          /' <<<"$1"; }

# Prints each request's peer address, so the test sees which source IP arrived.
SERVER='
import http.server
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.client_address[0].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer(("", 8000), Handler).serve_forever()
'
# Logs SIGTERM and keeps running (a server draining in-flight work) until killed.
DRAINER='
import signal, time
def term(*_):
    print(time.strftime("%H:%M:%S"), "SIGTERM received, draining", flush=True)
    while True:
        time.sleep(1)
        print(time.strftime("%H:%M:%S"), "still draining", flush=True)
signal.signal(signal.SIGTERM, term)
print(time.strftime("%H:%M:%S"), "running", flush=True)
while True:
    time.sleep(1)
'

"${KUBECTL[@]}" delete namespace "$NS" --ignore-not-found --wait=true >/dev/null  # a previous run's
"${KUBECTL[@]}" create namespace "$NS" >/dev/null
"${KUBECTL[@]}" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: $NS, labels: {app: server}}
spec:
  nodeName: $SERVER_NODE
  containers:
    - name: server
      image: $PYTHON_IMAGE
      imagePullPolicy: Never
      ports: [{containerPort: 8000}]
      readinessProbe: {tcpSocket: {port: 8000}, periodSeconds: 1}
      command: [python3, -c]
      args:
        - |
$(indent "$SERVER")
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: $NS}
spec:
  selector: {app: server}
  ports: [{port: 80, targetPort: 8000}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: $NS}
spec:
  nodeName: $CLIENT_NODE
  containers:
    - {name: client, image: $PYTHON_IMAGE, imagePullPolicy: Never, command: [sleep, infinity]}
EOF
"${KUBECTL[@]}" -n "$NS" wait --for=condition=Ready pod/server pod/client --timeout=120s >/dev/null
SERVER_IP=$("${KUBECTL[@]}" -n "$NS" get pod server -o jsonpath='{.status.podIP}')
CLIENT_IP=$("${KUBECTL[@]}" -n "$NS" get pod client -o jsonpath='{.status.podIP}')
SERVICE_IP=$("${KUBECTL[@]}" -n "$NS" get service server -o jsonpath='{.spec.clusterIP}')
say "client $CLIENT_IP on $CLIENT_NODE, server $SERVER_IP on $SERVER_NODE, Service $SERVICE_IP"
# fetch URL: what the server saw as our address; retried for 30 s (kube-proxy programs a new
# Service's endpoints a moment after the pod turns Ready).
FETCH='
import sys, time, urllib.request
for attempt in range(30):
    try:
        print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
        break
    except OSError as error:
        print("retrying:", error, file=sys.stderr)
        time.sleep(1)
else:
    sys.exit(1)
'
for url in "http://$SERVER_IP:8000/" "http://$SERVICE_IP/" "http://server.$NS.svc.cluster.local/"; do
    seen=$("${KUBECTL[@]}" -n "$NS" exec client -- python3 -c "$FETCH" "$url" 2>"$WORK/fetch.err") ||
        die "client could not fetch $url: $(tail -n 1 "$WORK/fetch.err")"
    # Through the Service the source is the client pod too (kube-proxy DNATs, no SNAT).
    [[ $seen == "$CLIENT_IP" ]] || die "$url: the server saw $seen, not the client's pod IP $CLIENT_IP"
    say "ok: $url answered from $SERVER_NODE, server saw the client as $seen ($(grep -c retrying "$WORK/fetch.err" || true) retries)"
done

$SHUTDOWN || exit 0

say "graceful node shutdown of $SERVER_NODE"
"${KUBECTL[@]}" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: drainer, namespace: $NS}
spec:
  nodeName: $SERVER_NODE
  terminationGracePeriodSeconds: 120
  containers:
    - name: drainer
      image: $PYTHON_IMAGE
      imagePullPolicy: Never
      command: [python3, -c]
      args:
        - |
$(indent "$DRAINER")
EOF
"${KUBECTL[@]}" -n "$NS" wait --for=condition=Ready pod/drainer --timeout=60s >/dev/null
# The kubelet logs its shutdown steps at verbosity 1: raise it until the node's next boot (/run).
docker exec "$SERVER_NODE" sh -euc '
    echo "$(grep ^KUBELET_EXTRA_ARGS= /etc/default/kubelet) --v=1" >/run/kubelet-smoke-test.env
    mkdir -p /run/systemd/system/kubelet.service.d
    printf "[Service]\nEnvironmentFile=/run/kubelet-smoke-test.env\n" >/run/systemd/system/kubelet.service.d/99-smoke-test.conf
    systemctl daemon-reload
    systemctl restart kubelet
    for i in $(seq 30); do systemd-inhibit --list --no-legend | grep -q kubelet && exit 0; sleep 1; done
    echo "the kubelet took no shutdown inhibitor lock" >&2
    exit 1'
for _ in $(seq 30); do  # the restarted kubelet serves logs again
    "${KUBECTL[@]}" -n "$NS" logs drainer >/dev/null 2>&1 && break
    sleep 1
done
"${KUBECTL[@]}" -n "$NS" logs -f drainer >"$WORK/drainer.log" 2>&1 &
docker exec "$SERVER_NODE" journalctl -u kubelet -f -n 0 -o short-precise >"$WORK/kubelet.log" 2>&1 &
sleep 2
say "poweroff at $(date -u +%T)"
"$HERE/cluster.sh" poweroff "$SERVER_NODE"
sleep 1
echo "--- the pod's log (terminationGracePeriodSeconds 120; the kubelet gives it 15 s at shutdown)"
cat "$WORK/drainer.log"
echo "--- the kubelet's log about the shutdown"
grep -E 'Shutdown manager|shutdown event|node shutdown' "$WORK/kubelet.log" | cut -c1-300 | head -n 20
echo "--- the pod's status as the kubelet left it"
"${KUBECTL[@]}" -n "$NS" get pod drainer -o jsonpath='phase={.status.phase} reason={.status.reason} message={.status.message}{"\n"}'
say "starting $SERVER_NODE again"
docker update --restart=on-failure:1 "$SERVER_NODE" >/dev/null
docker start "$SERVER_NODE" >/dev/null
"${KUBECTL[@]}" wait --for=condition=Ready "node/$SERVER_NODE" --timeout=180s
