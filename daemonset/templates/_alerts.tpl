{{- /*
spotguard's alerting rules as Prometheus rule *groups*. One definition, two uses:
  - templates/prometheusrule.yaml puts them under a PrometheusRule's spec.groups;
  - tests/alerts/ render the chart and write the same groups to a plain rule file for
    `promtool check rules` / `promtool test rules` and the simulation's Prometheus.

Scrape requirements (the PodMonitor/ServiceMonitor of this chart set both):
  - honorLabels: true, so spotguard_eviction_blocked{namespace,pod,pdb} keeps the blocked pod's
    namespace/pod instead of being renamed to exported_namespace/exported_pod;
  - a `node` label from __meta_kubernetes_pod_node_name, so every alert names the node.
SpotguardMissingOnGpuNode also needs kube-state-metrics exporting the node labels it selects on.

Annotation texts are Go raw strings (`...`): the {{ $labels.x }} inside them is Prometheus' own
alert templating, passed through untouched.
*/ -}}
{{- define "spotguard.alertGroups" -}}
{{- $rule := .Values.prometheusRule -}}
{{- $extra := $rule.alertLabels | default dict -}}
- name: spotguard.rules
  rules:
    - alert: SpotguardPreemptionInProgress
      # phase is 1 for exactly one of guarding/cordoned/standby/surging/deregistering/draining/
      # evicting/drained. standby (a rebalance recommendation's surge) cordons nothing: not a preemption.
      expr: spotguard_phase{phase!~"guarding|standby"} == 1
      labels:
        {{- toYaml (merge (dict "severity" "info") $extra) | nindent 8 }}
      annotations:
        summary: {{ `Node {{ $labels.node }} is being drained by spotguard (phase {{ $labels.phase }}).` | quote }}
        description: {{ `The cloud provider announced that node {{ $labels.node }} goes away; spotguard cordoned it and is moving its serving pods off (phase {{ $labels.phase }}). Expected during spot preemptions and GPU host maintenance.` | quote }}
        runbook: >-
          Nothing to do while it progresses: the node was cordoned and tainted
          spotguard.io/impending-termination, its serving pods report not-ready, in-flight
          requests drain, then pods are evicted. Watch for SpotguardEvictionBlockedByPDB and
          check replacement pods (kubectl get pods -A --field-selector spec.nodeName!=<node>)
          become Ready elsewhere. A notice that is withdrawn (maintenance back to NONE) returns
          the phase to guarding and undoes only what spotguard did. Phase cordoned (--cordon-only,
          or an AWS rebalance recommendation with --rebalance-action cordon) only cordons and
          taints: the pods keep serving. Phase standby (--rebalance-action surge) does not fire
          this alert: nothing is cordoned, placeholders only bring up capacity in case.
        {{- with include "spotguard.runbookUrl" (dict "root" $ "alert" "SpotguardPreemptionInProgress") }}{{ . | nindent 8 }}{{ end }}
    - alert: SpotguardDrainMissedDeadline
      expr: increase(spotguard_drain_missed_deadline_total[{{ $rule.incidentWindow }}]) > 0
      labels:
        {{- toYaml (merge (dict "severity" "warning") $extra) | nindent 8 }}
      annotations:
        summary: {{ `spotguard on node {{ $labels.node }} did not evict every pod before the VM's deadline.` | quote }}
        description: {{ printf `In the last %s a drain on node {{ $labels.node }} reached the provider's deadline with pods still on the node: they were stopped by the VM going away, not by an orderly eviction.` $rule.incidentWindow | quote }}
        runbook: >-
          Find the drain in spotguard's logs on that node (kubectl logs -n <ns> <spotguard pod>
          or your log store, field node) and the Events on the Node: they name the pod that was
          still draining or blocked. Usual causes: a PodDisruptionBudget that allowed no
          disruption (see SpotguardEvictionBlockedByPDB), vLLM requests longer than the notice
          (lower max tokens or enable surge), or a safetyMarginSeconds too small for the
          pods' shutdown. The notice is 30 s on GCE spot: check preemptionNoticeDuration.
        {{- with include "spotguard.runbookUrl" (dict "root" $ "alert" "SpotguardDrainMissedDeadline") }}{{ . | nindent 8 }}{{ end }}
    - alert: SpotguardSurgeGivenUp
      expr: increase(spotguard_surge_given_up_total[{{ $rule.incidentWindow }}]) > 0
      labels:
        {{- toYaml (merge (dict "severity" "warning") $extra) | nindent 8 }}
      annotations:
        summary: {{ `spotguard on node {{ $labels.node }} drained a pod without the capacity its surge was to bring.` | quote }}
        description: {{ printf `In the last %s a long notice on node {{ $labels.node }} had a serving pod whose surge placeholder was refused or did not run in time: the pod was drained anyway and its replacement waits for a node like after a short notice.` $rule.incidentWindow | quote }}
        runbook: >-
          The SurgeGivenUp Event on the pod says why. "was refused": a ResourceQuota (GPUs) or
          the admission policy refused the placeholder; raise the quota or check the PriorityClass
          exists (spotguard check). "did not run in time": the node-pool autoscaler did not bring
          a node before the surge's time was up; check its events on the placeholder
          (NotTriggerScaleUp: pool at its maximum, no matching pool, or the PriorityClass below
          --expendable-pods-priority-cutoff) and the pool's provisioning time.
        {{- with include "spotguard.runbookUrl" (dict "root" $ "alert" "SpotguardSurgeGivenUp") }}{{ . | nindent 8 }}{{ end }}
    - alert: SpotguardWebhookFailing
      expr: increase(spotguard_webhook_deliveries_total{result=~"error|dropped"}[{{ $rule.incidentWindow }}]) > 0
      labels:
        {{- toYaml (merge (dict "severity" "warning") $extra) | nindent 8 }}
      annotations:
        summary: {{ `spotguard on node {{ $labels.node }} could not deliver webhook notifications.` | quote }}
        description: {{ printf `In the last %s spotguard on node {{ $labels.node }} gave up on webhook notifications ({{ $labels.result }}): a channel did not hear about a notice, an eviction or a blocked drain. Drains are not affected.` $rule.incidentWindow | quote }}
        runbook: >-
          spotguard's log on that node has "webhook not delivered" with the receiver's host and
          the error (timeout, HTTP status). Check the URL in the webhook Secret, the receiver,
          and egress from the node (a proxy goes in extraEnv: HTTPS_PROXY, NO_PROXY). "dropped"
          means more than 200 messages waited for one slow receiver.
        {{- with include "spotguard.runbookUrl" (dict "root" $ "alert" "SpotguardWebhookFailing") }}{{ . | nindent 8 }}{{ end }}
    - alert: SpotguardEvictionBlockedByPDB
      expr: spotguard_eviction_blocked == 1
      for: {{ $rule.evictionBlockedFor }}
      labels:
        {{- toYaml (merge (dict "severity" "warning") $extra) | nindent 8 }}
      annotations:
        summary: {{ `PodDisruptionBudget {{ $labels.namespace }}/{{ $labels.pdb }} blocks the eviction of {{ $labels.pod }} from node {{ $labels.node }}.` | quote }}
        description: {{ `spotguard is draining node {{ $labels.node }} and the Eviction API refuses pod {{ $labels.namespace }}/{{ $labels.pod }} (HTTP 429) because of PodDisruptionBudget {{ $labels.pdb }}. spotguard retries until the deadline; the VM goes away regardless.` | quote }}
        runbook: >-
          kubectl -n <namespace> get pdb <pdb> -o wide: ALLOWED DISRUPTIONS is 0. Either the
          application has no spare healthy replica (scale it up, or let the autoscaler add the
          node the replacement needs), or the PDB counts spotguard's not-ready pods against the
          budget: set unhealthyPodEvictionPolicy: AlwaysAllow on it (daemonset/README.md,
          "PodDisruptionBudget"). Deleting the pod by hand bypasses the budget: do it only when
          the node is going away anyway.
        {{- with include "spotguard.runbookUrl" (dict "root" $ "alert" "SpotguardEvictionBlockedByPDB") }}{{ . | nindent 8 }}{{ end }}
    - alert: SpotguardRequestsAborted
      # spotguard's own count: requests still running or waiting in vLLM when the drain budget
      # ran out. vLLM's request_success_total{finished_reason="abort"} also counts clients that
      # hang up, so it is shown on the dashboard rather than paged on.
      expr: increase(spotguard_abandoned_requests_total[{{ $rule.incidentWindow }}]) > 0
      labels:
        {{- toYaml (merge (dict "severity" "warning") $extra) | nindent 8 }}
      annotations:
        summary: {{ `Requests were cut off by a preemption on node {{ $labels.node }}.` | quote }}
        description: {{ printf `In the last %s about {{ $value | humanize }} vLLM requests were still in flight on node {{ $labels.node }} when spotguard's drain budget ran out; they were most likely aborted when the pod stopped.` $rule.incidentWindow | quote }}
        runbook: >-
          Compare the notice length with the longest requests: long generations cannot finish
          in a 30 s spot notice. Options: cap max_tokens for spot-served models, raise the
          notice (GCE preemptionNoticeDuration up to 120 s), run vLLM with --shutdown-timeout so
          SIGTERM drains instead of aborting, and make clients retry on 5xx. Check that routers
          honour pod readiness (some discover pod IPs directly and keep sending).
        {{- with include "spotguard.runbookUrl" (dict "root" $ "alert" "SpotguardRequestsAborted") }}{{ . | nindent 8 }}{{ end }}
    - alert: SpotguardMetadataUnreachable
      expr: spotguard_metadata_up == 0
      for: {{ $rule.metadataUnreachableFor }}
      labels:
        {{- toYaml (merge (dict "severity" "warning") $extra) | nindent 8 }}
      annotations:
        summary: {{ `spotguard on node {{ $labels.node }} cannot reach the metadata server.` | quote }}
        description: {{ printf `spotguard on node {{ $labels.node }} has had no successful answer from the cloud metadata server for %s: it would miss a preemption notice on this node.` $rule.metadataUnreachableFor | quote }}
        runbook: >-
          kubectl -n <ns> exec <spotguard pod> -- spotguard check. Look at
          spotguard_metadata_errors_total by reason. On GKE with Workload Identity the pod must
          use hostNetwork (the GKE metadata server does not serve every instance path); on AWS
          IMDSv2 needs a hop limit >= 2 without hostNetwork; check NetworkPolicies that block
          169.254.169.254 and a wrong metadataUrl value.
        {{- with include "spotguard.runbookUrl" (dict "root" $ "alert" "SpotguardMetadataUnreachable") }}{{ . | nindent 8 }}{{ end }}
    {{- with $rule.gpuSpotNodeSelectors }}
    - alert: SpotguardMissingOnGpuNode
      # Nodes that kube-state-metrics says are GPU spot nodes, minus the nodes where a spotguard
      # target is scraped (spotguard_build_info is 1 on every healthy target; it disappears
      # when the target is down or absent).
      expr: |-
        (
          {{- range $i, $selector := . }}
          {{- if $i }}
          or
          {{- end }}
          max by (node) (kube_node_labels{ {{- $selector -}} })
          {{- end }}
        )
        unless on (node)
        max by (node) (spotguard_build_info)
      for: {{ $rule.missingFor }}
      labels:
        {{- toYaml (merge (dict "severity" "warning") $extra) | nindent 8 }}
      annotations:
        summary: {{ `No spotguard is running on GPU spot node {{ $labels.node }}.` | quote }}
        description: {{ printf `Node {{ $labels.node }} is a GPU spot/preemptible node but no spotguard target on it has been scraped for %s: a preemption there would stop vLLM pods without draining them.` $rule.missingFor | quote }}
        runbook: >-
          kubectl get pods -n <ns> -o wide --field-selector spec.nodeName=<node>. No pod: the
          DaemonSet does not select the node (compare its labels with nodeSelectorTerms) or a
          taint is not tolerated (add it to extraTolerations), or GKE refused the critical
          priority outside kube-system (criticalPodsQuota.enabled). A pod that is not Ready:
          kubectl logs, then spotguard check. Running and Ready: the PodMonitor/ServiceMonitor
          is not selected by your Prometheus (its labels).
        {{- with include "spotguard.runbookUrl" (dict "root" $ "alert" "SpotguardMissingOnGpuNode") }}{{ . | nindent 8 }}{{ end }}
    {{- end }}
{{- end }}

{{- define "spotguard.runbookUrl" -}}
{{- with .root.Values.prometheusRule.runbookBaseUrl }}
runbook_url: {{ printf "%s#%s" . (lower $.alert) | quote }}
{{- end }}
{{- end }}
