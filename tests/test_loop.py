"""The production loop as a user runs it: a real `bentoml serve` (2 workers) next to scheduled retraining under
kfp.local, with 8 clients sending /recommend and /events throughout (benchmarks/loop.py, on tiny data)."""

from __future__ import annotations

import pytest

from conftest import load_benchmark

loop = load_benchmark("loop")


@pytest.mark.slow
def test_events_survive_a_failed_and_a_passed_retraining_and_the_service_follows_the_champion(tmp_path):
    result = loop.run_scenario(tmp_path / "loop", tiny=True, clients=8, events_budget=300, events_per_s=3.0)
    events, swap = result["events"], result["swap"]
    # every accepted event: logged once, none lost, retries applied once
    assert events["accepted"] >= 200 and events["lost"] == 0 and events["duplicated"] == 0
    assert events["retries"] > 0 and events["retries_answered_duplicate"] == events["retries"]
    # ... in version 2's training data exactly once (up to its cutoff), the rest served from the log
    assert events["in_v2_training_twice"] == 0 and events["missing_from_v2_training"] == 0
    assert events["in_v2_training_once"] + events["after_v2_cutoff_served_from_log"] == events["accepted"]
    assert events["online_sequences_match_feast"]  # what Feast users look up = what the service ranks from
    # the failed cycle changed nothing users see; it is tracked with its verdict, not registered
    failed = result["failed_cycle"]
    assert not failed["gate"]["passed"] and not failed["registered"]
    assert failed["versions_served_before_it_ended"] == ["m2rec v1"]
    assert failed["mlflow_run_gate_passed"] == "false"
    # the passed cycle learned from the served events, and the service moved to it without a restart or an error
    assert result["passed_cycle"]["version"] == "2" and result["passed_cycle"]["events_merged"] > 0
    assert swap["non_2xx"] == 0, swap["non_2xx_examples"]
    assert swap["seconds_to_new_version"] is not None and swap["seconds_to_new_version"] < 30
    assert result["readyz"]["model_version"] == "m2rec v2" and result["readyz"]["last_error"] is None
