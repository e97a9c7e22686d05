"""The benchmark's report: targets met or missed, the markdown table, the plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spotguard_sim.support import quantile


def evaluate_targets(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, met or missed, per profile where they depend on it."""
    targets: dict[str, Any] = {}
    for name, profile in report["profiles"].items():
        scenarios = profile["scenarios"]
        if not all(s in scenarios for s in ("kubelet_only_drain", "evict_immediately", "spotguard_drain")):
            continue
        drain, control, nth_like = (scenarios[s] for s in ("spotguard_drain", "kubelet_only_drain", "evict_immediately"))
        ours, theirs = drain["replacement_ready_s"], nth_like["replacement_ready_s"]
        targets[f"drain_{name}"] = {
            "target": "spotguard_drain loses 0 requests, fewer than kubelet_only_drain, and its replacement is "
                      "Ready no later than 1 s after evict_immediately's",
            "spotguard_drain_lost": drain["lost"], "kubelet_only_drain_lost": control["lost"],
            "spotguard_drain_replacement_s": ours, "evict_immediately_replacement_s": theirs,
            "met": drain["lost"] == 0 and drain["lost"] < control["lost"]
            and ours is not None and theirs is not None and ours <= theirs + 1.0}
        surge = scenarios.get("spotguard_surge")
        if surge is not None:
            others = {n: scenarios[n]["capacity_gap_s"] for n in ("kubelet_only", "evict_immediately", "spotguard")
                      if n in scenarios}
            provisioning = report["config"]["provisioning_delay_s"]
            targets[f"surge_{name}"] = {
                "target": "spotguard_surge: capacity gap 0 s and 0 lost; kubelet_only, evict_immediately and "
                          "spotguard: a gap of at least one node provisioning",
                "spotguard_surge_gap_s": surge["capacity_gap_s"], "spotguard_surge_lost": surge["lost"],
                "others_gap_s": others, "provisioning_delay_s": provisioning,
                "met": surge["capacity_gap_s"] == 0 and surge["lost"] == 0
                and all(gap is not None and gap >= provisioning for gap in others.values())}
    reaction = report.get("reaction") or {}
    aws = (report.get("reaction_polled") or {}).get("aws")
    if aws:
        p99 = aws["external_ms"]["p99"]
        targets["reaction_p99_aws"] = {"target_ms": 300, "measured_ms": p99, "met": p99 is not None and p99 <= 300}
    for cloud, polled in (report.get("footprint_polled") or {}).items():
        targets[f"idle_cpu_{cloud}"] = {"target_millicores": 2, "measured_millicores": polled["cpu_millicores_idle"],
                                        "met": polled["cpu_millicores_idle"] <= 2}
    if reaction:
        p99 = reaction["external_ms"]["p99"]
        targets["reaction_p99"] = {"target_ms": 100, "measured_ms": p99, "met": p99 is not None and p99 <= 100,
                                   "daemon_histogram_p99_ms": reaction["daemon_histogram_ms"]["p99"]}
    footprint = report.get("footprint") or {}
    if footprint:
        targets["idle_rss"] = {"target_mb": 60, "measured_mb": footprint["rss_mb"], "met": footprint["rss_mb"] <= 60}
        targets["idle_cpu"] = {"target_millicores": 2, "measured_millicores": footprint["cpu_millicores_idle"],
                               "met": footprint["cpu_millicores_idle"] <= 2}
        per_min = footprint["api_requests_per_min_idle"]
        targets["idle_api_requests"] = {"target_per_min": 1, "measured_per_min": per_min,
                                        "met": None if per_min is None else per_min <= 1}
    return targets


OUTCOME_COLOURS = {"completed": "#2e7d32", "aborted": "#c62828", "refused": "#ef6c00",
                   "error": "#6a1b9a", "cancelled": "#757575", "unfinished": "#757575"}
MARKERS = (  # (key, label, colour, line style)
    ("cordoned", "cordoned", "#1565c0", "--"),
    ("endpoint_not_ready", "endpoint not ready (router)", "#8e24aa", ":"),
    ("pod_terminating", "evicted (pod terminating)", "#6d4c41", "-."),
    ("node_shutdown", "node shutdown (SIGTERM)", "#424242", "--"),
    ("vm_gone", "VM gone", "#000000", "-"),
    ("replacement_ready", "replacement ready", "#2e7d32", "--"),
)


def write_plots(report: dict[str, Any], runs: list[dict[str, Any]], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    written = []
    for profile_name, profile in report.get("profiles", {}).items():
        chosen = [next(r for r in runs if r["profile"] == profile_name and r["scenario"] == s and r["rep"] == 0)
                  for s in profile["scenarios"]]
        fig, axes = plt.subplots(len(chosen), 1, figsize=(11, 2.3 * len(chosen) + 0.8), sharex=True, squeeze=False)
        for ax, run in zip(axes[:, 0], chosen):
            timeline = sorted(run["timeline"], key=lambda row: row[0])
            for index, (start, end, outcome, on_victim, _) in enumerate(timeline):
                lost = outcome != "completed"
                ax.hlines(index, start, max(end, start + 0.15), colors=OUTCOME_COLOURS.get(outcome, "#757575"),
                          linewidth=2.6 if lost else 1.6 if on_victim else 0.9,
                          alpha=1.0 if on_victim or lost else 0.3, zorder=3 if lost else 2)
            ax.axvline(0, color="#000000", linewidth=1.4)
            for key, _, colour, style in MARKERS:
                value = run["markers"].get(key)
                if value is not None:
                    ax.axvline(value, color=colour, linestyle=style, linewidth=1.2)
            summary = profile["scenarios"][run["scenario"]]
            ax.set_title(f"{run['scenario']}: {run['requests_in_flight_at_notice']} in flight on the preempted pod "
                         f"at the notice; lost {run['lost']} (aborted {run['lost_aborted']}, refused "
                         f"{run['lost_refused']}); all runs: lost {summary['lost']}", fontsize=9, loc="left")
            ax.set_ylabel("request", fontsize=8)
            ax.tick_params(labelsize=8)
        axes[-1, 0].set_xlabel("seconds since the preemption notice")
        handles = [Line2D([], [], color=c, linewidth=2, label=o) for o, c in OUTCOME_COLOURS.items()
                   if o in ("completed", "aborted", "refused")]
        handles.append(Line2D([], [], color="#000000", linewidth=1.4, label="notice"))
        handles += [Line2D([], [], color=c, linestyle=s, label=label) for _, label, c, s in MARKERS]
        fig.suptitle(f"Requests around one preemption, profile {profile_name} ({profile['deadline_s']:g} s notice); "
                     "bold = on the preempted pod, faint = on the other replica", fontsize=10)
        fig.tight_layout(rect=(0, 0.07, 1, 0.98))
        fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=8, frameon=False)
        path = directory / f"timeline-{profile_name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    reaction = report.get("reaction")
    rows = []  # (label, values in ms, colour) per scenario, profile and measure
    for profile_name, profile in report.get("profiles", {}).items():
        for name in profile["scenarios"]:
            for key, what, colour in (("reaction_s", "cordoned + not-ready", "#1565c0"),
                                      ("notready_s", "endpoint out (router)", "#8e24aa")):
                values = [r[key] * 1000 for r in runs if r["profile"] == profile_name and r["scenario"] == name
                          and r[key] is not None]
                if values:
                    rows.append((f"{profile_name} {name}: {what}", values, colour))
    if reaction or rows:
        height = max(4.2, 0.26 * len(rows) + 1.2)
        if reaction and rows:
            fig, (left, right) = plt.subplots(1, 2, figsize=(12, height), gridspec_kw={"width_ratios": (1, 1.15)})
        else:   # one part measured: one panel, not half a figure left blank
            fig, only = plt.subplots(figsize=(7, height))
            left, right = (only, None) if reaction else (None, only)
        if left is not None:
            for key, label, colour in (("external", "external: cordoned + pod Ready=False", "#1565c0"),
                                       ("own_writes", "external: cordoned + serving=False", "#8e24aa"),
                                       ("daemon", "daemon's own histogram", "#2e7d32")):
                values = sorted(v for v in reaction["samples_ms"][key] if v is not None)
                if values:
                    left.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post",
                              label=f"{label} (p99 {quantile(values, 0.99):.0f} ms)", color=colour)
            for cloud, colour in (("aws", "#ef6c00"), ("azure", "#00838f")):
                polled = (report.get("reaction_polled") or {}).get(cloud)
                values = sorted(v for v in (polled or {}).get("samples_ms", {}).get("external", []) if v is not None)
                every = (polled or {}).get("poll_seconds")   # absent in runs before it was recorded
                polling = f"polled every {every:g} s" if every else "polled"
                if values:
                    left.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post",
                              label=f"{cloud} ({polling}), external (p99 {quantile(values, 0.99):.0f} ms)",
                              color=colour, linestyle="--")
            left.axvline(100, color="#c62828", linestyle="--", label="target p99 100 ms (GCE)")
            left.set_xscale("log")
            left.set_xlabel("ms from notice (log scale)")
            left.set_ylabel("fraction of notices")
            left.set_title(f"spotguard reaction, {reaction['repetitions']} notices, idle node", fontsize=10)
            left.legend(fontsize=7, loc="lower right")
        if right is not None:
            for index, (_, values, colour) in enumerate(rows):
                right.scatter(values, [index] * len(values), s=16, color=colour)
            right.set_yticks(range(len(rows)), [label for label, _, _ in rows], fontsize=7)
            right.set_ylim(-0.7, len(rows) - 0.3)
            right.invert_yaxis()
            right.set_xscale("log")
            right.axvline(100, color="#c62828", linestyle="--", linewidth=0.8)
            right.set_xlabel("ms from notice (log scale), one dot per run")
            right.set_title("under load, per scenario run", fontsize=10)
        fig.tight_layout()
        path = directory / "reaction.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def markdown_table(report: dict[str, Any]) -> str:
    def pair(d: dict[str, Any] | None) -> str:
        return "n/a" if not d or d.get("p50") is None else f"{d['p50']:g} / {d['p99']:g}"

    lines = []
    for profile_name, profile in report.get("profiles", {}).items():
        lines.append(f"\n{profile_name} ({profile['cloud']}, deadline {profile['deadline_s']:g} s, node shutdown "
                     f"at {profile['shutdown_at_s']:g} s, VM gone at {profile['vm_gone_s']:g} s, budget "
                     f"{profile['budget_s']:g} s; {report['runs']} run(s) each)\n")
        lines.append("| scenario | sent | in flight at notice | completed | aborted | refused | lost | "
                     "reaction ms p50/p99 | not-ready ms p50/p99 | drain lag ms p50 | replacement Ready s | "
                     "capacity gap s |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, s in profile["scenarios"].items():
            lag = s["drain_detect_lag_ms"]["p50"]
            lines.append(f"| {name} | {s['requests']} | {s['requests_in_flight_at_notice']} | {s['completed']} | "
                         f"{s['aborted']} | {s['refused']} | **{s['lost']}** | {pair(s['reaction_ms'])} | "
                         f"{pair(s['notready_ms'])} | {'n/a' if lag is None else f'{lag:g}'} | "
                         f"{'n/a' if s['replacement_ready_s'] is None else s['replacement_ready_s']} | "
                         f"{'n/a' if s.get('capacity_gap_s') is None else s['capacity_gap_s']} |")
    reactions = [r for r in (report.get("reaction"), *(report.get("reaction_polled") or {}).values()) if r]
    if reactions:
        lines.append("\nreaction: notice -> cordoned + pod Ready=False, seen by a watch (idle node)\n")
        lines.append("| cloud | notices | external ms p50/p99 | daemon's histogram ms p50/p99 |")
        lines.append("|---|---|---|---|")
        for r in reactions:
            lines.append(f"| {r.get('cloud', 'gce')} | {r['repetitions']} | {pair(r['external_ms'])} | "
                         f"{pair(r['daemon_histogram_ms'])} |")
    if report.get("admission", {}).get("sizes"):
        lines.append("\nadmission: dry-run eviction and pod Event latency, the chart's param policies against a "
                     "user they skip\n")
        lines.append("| pods in namespace | eviction with policy ms p50/p99 | control ms p50/p99 | p50 ratio | "
                     "Event with policy ms p50/p99 | control ms p50/p99 | p50 ratio |")
        lines.append("|---|---|---|---|---|---|---|")
        for size in report["admission"]["sizes"]:
            p, c = size["policy_ms"], size["control_ms"]
            ep, ec = size.get("event_policy_ms"), size.get("event_control_ms")
            events = (f"{ep['p50']:g} / {ep['p99']:g} | {ec['p50']:g} / {ec['p99']:g} | {size['event_ratio_p50']:g}"
                      if ep and ec else "n/a | n/a | n/a")   # runs before the Event policy was measured
            lines.append(f"| {size['pods_in_namespace']} | {p['p50']:g} / {p['p99']:g} | {c['p50']:g} / {c['p99']:g} | "
                         f"{size['ratio_p50']:g} | {events} |")
    return "\n".join(lines)


