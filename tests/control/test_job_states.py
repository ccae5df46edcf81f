"""The pure parts of jobs and rollouts: execution states, targets, stages, gates."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from fieldmesh.control.jobs import (
    Execution,
    InvalidTransition,
    JobSpec,
    Targets,
    cancel,
    dispatch,
    expire,
    job_counts,
    notify_payload,
    parse_update,
    retry,
    transition,
)
from fieldmesh.control.rollouts import CohortStats, Gates, device_order, evaluate_gates, stage_bounds
from fieldmesh.core.errors import ConfigError


def ex(**kw: object) -> Execution:
    return Execution(**{"job_id": "j", "device_id": "d", **kw})  # type: ignore[arg-type]


def test_the_happy_path_and_final_states() -> None:
    e = dispatch(ex(), now_ms=100)
    assert e.in_flight and e.sent_ms == 100
    e = transition(e, "in_progress", now_ms=110, details={"step": 1})
    e = transition(e, "in_progress", now_ms=120, details={"step": 2})
    e = transition(e, "succeeded", now_ms=130, details={"version": "2"})
    assert e.final and e.details == {"step": 2, "version": "2"}
    for to in ("in_progress", "failed", "succeeded", "canceled", "queued"):
        with pytest.raises(InvalidTransition):
            transition(e, to, now_ms=140)
    with pytest.raises(InvalidTransition):
        transition(ex(), "queued", now_ms=1)
    with pytest.raises(InvalidTransition):
        dispatch(e, now_ms=1)


def test_timeout_counts_from_sending_and_retry_raises_the_execution_number() -> None:
    e = ex(queued_ms=0)
    assert expire(e, now_ms=10**9, timeout_s=1) is None  # never sent: no clock running
    e = dispatch(e, now_ms=1000)
    assert expire(e, now_ms=1999, timeout_s=1) is None
    t = expire(e, now_ms=2000, timeout_s=1)
    assert t is not None and t.state == "timed_out"
    r = retry(t, now_ms=2000, max_attempts=2)
    assert r is not None and (r.state, r.attempt, r.execution, r.sent_ms) == ("queued", 2, 2, None)
    assert r.details["previous"]["state"] == "timed_out"
    r2 = dispatch(r, now_ms=2100)
    failed = transition(r2, "failed", now_ms=2200)
    assert retry(failed, now_ms=2200, max_attempts=2) is None  # attempts spent
    assert retry(transition(dispatch(ex(), now_ms=1), "rejected", now_ms=2), now_ms=3, max_attempts=5) is None


def test_cancel() -> None:
    c = cancel(dispatch(ex(), now_ms=1), now_ms=5, reason="operator")
    assert c is not None and c.state == "canceled" and c.details["reason"] == "operator"
    assert cancel(c, now_ms=6, reason="again") is None


def test_updates_are_checked() -> None:
    assert parse_update(b'{"execution": 3, "status": "failed", "details": {"e": 1}}') == (3, "failed", {"e": 1})
    for bad in (b"[]", b"{}", b'{"execution": 0, "status": "failed"}', b'{"execution": 1, "status": "timed_out"}',
                b'{"execution": 1, "status": "succeeded", "details": []}', b"nope",
                b'{"execution": true, "status": "succeeded"}',
                json.dumps({"execution": 1, "status": "failed", "details": {"x": "y" * 5000}}).encode()):
        with pytest.raises(ValueError):
            parse_update(bad)


def test_notify_lists_pending_executions_oldest_first() -> None:
    spec = JobSpec(job_id="j", document={"op": "report"}, targets=Targets(devices=("d",)), timeout_s=9)
    a = ex(job_id="j2", queued_ms=5)
    b = ex(job_id="j1", queued_ms=7)
    done = transition(ex(job_id="j3"), "succeeded", now_ms=1)
    body = json.loads(notify_payload([(b, spec), (a, spec), (done, spec)]))
    assert [j["job_id"] for j in body["jobs"]] == ["j2", "j1"]
    assert body["jobs"][0] == {"job_id": "j2", "execution": 1, "document": {"op": "report"}, "timeout_s": 9}
    assert json.loads(notify_payload([])) == {"jobs": []}


def test_targets() -> None:
    devs = [SimpleNamespace(id="a", status="active", groups=("n",), tags=("fw:1",), attributes={"m": "x"}),
            SimpleNamespace(id="b", status="suspended", groups=("s",), tags=(), attributes={}),
            SimpleNamespace(id="c", status="active", groups=("s",), tags=("fw:1", "out"), attributes={"m": "y"})]
    assert Targets(devices=("z",), groups=("n",)).resolve(devs) == ["a", "z"]
    assert Targets(query={"status": "active", "tags": ["fw:1"]}).resolve(devs) == ["a", "c"]
    assert Targets(query={"attributes": {"m": "y"}, "groups": ["s", "q"]}).resolve(devs) == ["c"]
    with pytest.raises(ConfigError):
        Targets(query={"colour": "red"})
    with pytest.raises(ConfigError):
        Targets(devices=("../x",))
    with pytest.raises(ConfigError):
        Targets().check()


def test_job_spec_is_validated() -> None:
    t = Targets(devices=("d",))
    for kw in ({"job_id": "a b"}, {"document": {"no": "op"}}, {"timeout_s": 0}, {"max_attempts": 11},
               {"document": {"op": "x", "pad": "y" * 70_000}}):
        with pytest.raises(ConfigError):
            JobSpec(**{"job_id": "j", "document": {"op": "report"}, "targets": t, **kw})  # type: ignore[arg-type]
    assert job_counts([ex(), ex(state="failed")])["failed"] == 1


def test_stages_and_order() -> None:
    assert stage_bounds(1000, 10, (10, 50, 100)) == [10, 100, 500, 1000]
    assert stage_bounds(7, 10, (50, 100)) == [7, 7, 7]
    assert stage_bounds(3, 0, (10, 100)) == [0, 1, 3]
    devs = [f"d{i}" for i in range(100)]
    o1, o2 = device_order("r1", devs, ["d50", "d7", "zz"]), device_order("r2", devs)
    assert o1[:2] == ["d50", "d7"] and sorted(o1) == sorted(devs) and o1 != o2
    assert device_order("r1", devs, ["d50", "d7"]) == o1  # stable


def test_gates() -> None:
    g = Gates(max_failure_rate=0.05, min_samples=20)
    assert evaluate_gates(g, final=5, failures=0)[0].ok is None  # too few to judge
    assert evaluate_gates(g, final=5, failures=1)[0].ok is None  # 1 of 20 would still be 5%
    assert evaluate_gates(g, final=5, failures=2)[0].ok is False  # 2 of 20 already is too many
    assert evaluate_gates(g, final=40, failures=2)[0].ok is True
    assert evaluate_gates(g, final=40, failures=3)[0].ok is False
    g2 = Gates(max_failure_rate=None, max_failures=0, max_anomaly_rate_delta=0.1, min_fresh_ratio=0.9,
               metric="t", max_metric_delta=2.0, min_devices=2)
    upd = CohortStats(devices=4, reporting=4, readings=100, anomalies=30, fresh=3, metric_mean=25.0)
    base = CohortStats(devices=10, reporting=10, readings=1000, anomalies=50, fresh=10, metric_mean=22.0)
    r = {x.name: x for x in evaluate_gates(g2, final=4, failures=0, updated=upd, baseline=base)}
    assert r["failures"].ok is True
    assert r["anomaly_rate_delta"].value == pytest.approx(0.25) and r["anomaly_rate_delta"].ok is False
    assert r["fresh_ratio"].value == 0.75 and r["fresh_ratio"].ok is False
    assert r["metric_delta:t"].value == 3.0 and r["metric_delta:t"].ok is False
    few = CohortStats(devices=1, reporting=1, readings=10, anomalies=10, fresh=1)
    r = {x.name: x for x in evaluate_gates(g2, final=1, failures=0, updated=few, baseline=base)}
    assert r["anomaly_rate_delta"].ok is None and r["fresh_ratio"].ok is None
    with pytest.raises(ConfigError):
        Gates.from_dict({"max_failure": 1})


def test_job_topics_are_device_side_topics_a_device_may_use() -> None:
    from fieldmesh.core.topics import route_of_topic
    from fieldmesh.runtime.doorauth import device_publish_topics, device_subscribe_topics, nats_device_permissions

    assert route_of_topic("devices/x/jobs/notify") == ("side", "x", None)
    assert route_of_topic("devices/x/jobs/j-1/update") == ("side", "x", None)
    for t in ("devices/x/jobs", "devices/x/jobs/j/other", "devices/x/jobs//update", "devices/x/jobs/a/b/update"):
        assert route_of_topic(t).kind == "unknown", t
    assert "devices/x/jobs/+/update" in device_publish_topics("x")
    assert "devices/x/jobs/notify" in device_subscribe_topics("x")
    perms = nats_device_permissions("x")
    assert "devices.x.jobs.*.update" in perms["publish"]["allow"]
    assert "devices.x.jobs.notify" in perms["subscribe"]["allow"]


def test_a_rollout_spec_of_wrong_types_is_a_config_error_not_a_crash_later() -> None:
    from fieldmesh.control.rollouts import RolloutSpec
    from fmtest.fleet import artifact, signing_key

    key, _ = signing_key()
    m, _ = artifact(key, "2.0")
    good = {"rollout_id": "r", "artifact": m, "targets": {"devices": ["a"]}}
    assert RolloutSpec.from_dict(good).canary == 10
    for bad in ({"canary": "x"}, {"canary": True}, {"rate_per_s": "fast"}, {"timeout_s": 0}, {"stages": "100"},
                {"stages": [50, "x"]}, {"gates": []}, {"gates": {"max_failure_rate": "1"}},
                {"gates": {"min_samples": 0}}, {"gates": {"metric": "a b"}}, {"targets": []},
                {"targets": {"devices": [1]}}, {"targets": {"query": {"groups": "g"}}}, {"artifact": "x"},
                {"rollout_id": 5}, {"bake_s": -1}, {"canary_group": ""}, {"extra": 1}):
        with pytest.raises(ConfigError):
            RolloutSpec.from_dict({**good, **bad})
    with pytest.raises(ConfigError):
        RolloutSpec.from_dict([])  # type: ignore[arg-type]
