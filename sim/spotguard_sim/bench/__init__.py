"""`spotguard-sim bench`: spotguard against what users run today, measured on the local control plane.

Everything runs against the real local control plane (kube-apiserver, etcd, controller-manager,
scheduler) with the simulated kubelet, the fake vLLM, the Service-following router and the node-pool
autoscaler emulator of `spotguard_sim`; every spotguard is a real `spotguard run` process.

What is measured (docs/BENCHMARKS.md has the method and the results):

- **Scenarios.** The same vLLM Deployment (two replicas, one per spot GPU node), the same load (open
  loop, steady rate, request lengths from one seeded distribution) and the same preemption of one
  node, handled several ways, each in a fresh namespace on fresh nodes: `kubelet_only` (no handler),
  `nth` (AWS's Node Termination Handler v1.25.0 itself, on the AWS profile; scripts/install-nth.sh),
  `evict_immediately` (a re-implementation of AWS NTH's behaviour: poll every 2 s, cordon and evict
  every pod at once) and `spotguard`, each with vLLM's default SIGTERM (in-flight requests aborted)
  and each again as `..._drain` with vLLM `--shutdown-timeout` (vLLM finishes what it has);
  `spotguard_drain` pods are annotated drains-on-sigterm, so spotguard evicts them at the notice.
  The `_drain` controls separate what spotguard adds from what vLLM's own drain gives. Where the
  kubelet's SIGTERM comes with the notice (GKE), `..._prestop` puts the chart's drain-aware preStop
  helper in front of vLLM's drain, so vLLM is not stopped while the pod is still in its Service;
  on long notices `spotguard_surge` hands the pod over (its replacement Ready first). Five notice
  profiles (config.PROFILES): GKE spot with the default 30 s shutdown and with 120 s, GCE's 120 s
  `preemptionNoticeDuration`, EC2's two-minute warning and a (time-compressed) maintenance window;
  each says when the kubelet's graceful node shutdown starts and how long it lasts. Counted: requests
  lost, and when the replacement pod was Ready (the capacity gap).
- **Reaction.** Notice -> node cordoned and the serving pod not-ready, watched from outside, many
  repetitions; compared with the daemon's own `spotguard_reaction_duration_seconds`. For GCE
  (hanging GETs), and for AWS and Azure (polled every 0.25 s and 1 s, notices spread over the cycle).
- **Footprint.** One idle daemon: RSS and CPU from /proc, API requests from the API server's audit
  log (user agent `spotguard/...`), next to idle Python processes for scale.
- **Storm.** As many nodes (one daemon process each) preempted at once as this machine holds.
- **Admission.** What the chart's eviction policy costs the API server per eviction, by namespace
  size (bench/admission.py).

The timing of the run is reported on stderr; the results go to a JSON file (plus `-runs.json`
with every request of every run) and PNG plots next to it.

The parts, one module each: config (what is compared), scenarios (one preemption under load),
baselines (the handlers spotguard is compared with), reaction, footprint, storm, admission, observe
(watching from outside), context (the cluster each part runs in), measure (/proc, audit log),
report (targets, table, plots) and run (the command line and the whole run).
"""
