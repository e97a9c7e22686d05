"""`spotguard check` on pods that say they drain themselves on SIGTERM (spotguard.io/drains-on-sigterm)."""

from __future__ import annotations

from typing import Any

from spotguard import check


def vllm_pod(*, args: list[str] | None = None, annotated: bool = True, prestop: list[str] | None = None,
             grace: int = 30) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "vllm", "image": "vllm/vllm-openai", "args": args or ["--model", "m"]}
    if prestop is not None:
        container["lifecycle"] = {"preStop": {"exec": {"command": prestop}}}
    annotations = {"spotguard.io/drains-on-sigterm": "true"} if annotated else {}
    return {"metadata": {"namespace": "ml", "name": "vllm-0", "annotations": annotations},
            "spec": {"terminationGracePeriodSeconds": grace, "containers": [container],
                     "readinessGates": [{"conditionType": "spotguard.io/serving"}]}}


def findings(pod: dict[str, Any], *, cloud: str | None = "gce") -> list[tuple[str, str]]:
    said: list[tuple[str, str]] = []
    check._check_drain_on_sigterm(pod, lambda level, text: said.append((level, text)), cloud=cloud)
    return said


def test_annotated_with_shutdown_timeout_is_backed_up() -> None:
    (level, text), = findings(vllm_pod(args=["--model", "m", "--shutdown-timeout", "20"]))
    assert level == "OK" and "--shutdown-timeout 20" in text


def test_the_equals_form_and_the_prestop_helper_count_too() -> None:
    assert findings(vllm_pod(args=["--shutdown-timeout=15"]))[0][0] == "OK"
    helper = ["python3", "/etc/spotguard/vllm-drain-prestop.py", "--max-wait", "25"]
    (level, text), = findings(vllm_pod(prestop=helper))
    assert level == "OK" and "preStop helper" in text


def test_the_flag_alone_is_advised_the_helper_for_gke_and_both_together_are_not() -> None:
    helper = ["python3", "/etc/spotguard/vllm-drain-prestop.py", "--max-wait", "25"]
    (_, alone), = findings(vllm_pod(args=["--shutdown-timeout", "20"]))
    assert "on GCE (without preemptionNoticeDuration) the node's shutdown starts with the notice" in alone and "preStop helper" in alone
    (level, both), = findings(vllm_pod(args=["--shutdown-timeout", "20"], prestop=helper, grace=60))
    assert level == "OK" and "--shutdown-timeout 20 behind the drain preStop helper" in both
    assert "GCE" not in both and "GKE" not in both


def test_the_helper_advice_follows_the_cloud_whose_shutdown_comes_with_the_notice() -> None:
    flag_alone = vllm_pod(args=["--shutdown-timeout", "20"])
    # AWS and Azure shut the node down at the notice's end: the drain's refusals race nothing.
    for cloud in ("aws", "azure"):
        (level, text), = findings(flag_alone, cloud=cloud)
        assert level == "OK" and "preStop" not in text and text.endswith("evicts it at the notice")
    # Metadata unreadable: the advice stays, worded for the clouds it applies to.
    (_, unknown), = findings(flag_alone, cloud=None)
    assert "where (as on GKE) the node's shutdown starts with the notice" in unknown


def test_the_grace_must_hold_the_hooks_wait_and_vllms_drain_after_it() -> None:
    helper = ["python3", "/etc/spotguard/vllm-drain-prestop.py", "--max-wait", "25"]
    (level, text), = findings(vllm_pod(args=["--shutdown-timeout", "25"], prestop=helper, grace=30))
    assert level == "WARN" and "terminationGracePeriodSeconds 30" in text and "50 s" in text
    assert findings(vllm_pod(args=["--shutdown-timeout", "25"], prestop=helper, grace=55))[0][0] == "OK"
    # The helper's own default (25 s) when its command gives no --max-wait, alone or with the flag.
    (level, text), = findings(vllm_pod(prestop=["python3", "/etc/spotguard/vllm-drain-prestop.py"], grace=20))
    assert level == "WARN" and "25 s" in text
    assert findings(vllm_pod(prestop=["python3", "/etc/spotguard/vllm-drain-prestop.py", "--max-wait=10"],
                             grace=20))[0][0] == "OK"


def test_annotated_without_any_drain_is_a_warning() -> None:
    (level, text), = findings(vllm_pod(args=["--model", "m", "--shutdown-timeout", "0"]))
    assert level == "WARN" and "aborted" in text


def test_a_grace_period_shorter_than_the_drain_is_a_warning() -> None:
    (level, text), = findings(vllm_pod(args=["--shutdown-timeout", "60"], grace=30))
    assert level == "WARN" and "terminationGracePeriodSeconds 30" in text


def test_an_unannotated_pod_that_drains_gets_the_hint() -> None:
    (level, text), = findings(vllm_pod(args=["--shutdown-timeout", "20"], annotated=False))
    assert level == "OK" and 'spotguard.io/drains-on-sigterm: "true"' in text
    assert findings(vllm_pod(annotated=False)) == []
