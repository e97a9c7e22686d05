{{- /*
Scrape settings shared by the PodMonitor and the ServiceMonitor. honorLabels keeps the labels
spotguard sets itself (spotguard_eviction_blocked{namespace,pod,pdb} names the BLOCKED pod, not
spotguard's own); the relabeling adds `node`, which every alert and dashboard panel groups by.
*/ -}}
{{- define "spotguard.scrapeEndpoint" -}}
- port: metrics
  path: /metrics
  interval: {{ .interval }}
  scrapeTimeout: {{ .scrapeTimeout }}
  honorLabels: true
  relabelings:
    - action: replace
      sourceLabels: [__meta_kubernetes_pod_node_name]
      targetLabel: node
{{- end }}
