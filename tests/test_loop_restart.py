"""The production loop's restart scenario: a real `bentoml serve` (2 workers) SIGKILLed with its workers in the
middle of event traffic from 6 clients, then restarted (benchmarks/loop.py, on tiny data)."""

from __future__ import annotations

import pytest

from conftest import load_benchmark

loop = load_benchmark("loop")


@pytest.mark.slow
def test_acknowledged_events_survive_killing_the_service_and_its_workers_mid_traffic(tmp_path):
    result = loop.run_restart_scenario(tmp_path / "restart", clients=6, events_budget=120, kill_after=30)
    assert result["lost"] == 0 and result["duplicated"] == 0, result  # every acknowledged event logged once
    assert result["accepted"] == result["sent"] == 120  # clients retried until every event was acknowledged
    assert result["resent_after_failure"] > 0, result  # the kill did hit traffic in flight
    assert result["accepted_when_killed"] < result["accepted"]  # and events kept coming after the restart
