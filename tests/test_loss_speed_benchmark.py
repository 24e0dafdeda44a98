"""The loss benchmark's two sides, measured the way it measures them: the fused loss maps far fewer fresh pages
per step than PyTorch's cross-entropy under checkpointing, which is where the CPU time went."""

from __future__ import annotations

import sys

import pytest

from conftest import load_benchmark

loss_speed = load_benchmark("loss_speed")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the trainer's allocator setting is glibc's")
def test_fused_loss_faults_in_a_fraction_of_the_pages_of_the_checkpointed_one():
    fused, checkpointed = (loss_speed.measure(side, steps=2, threads=1, positions=2048) for side in ("fused", "checkpointed"))
    assert fused["page_faults_per_step"] * 4 < checkpointed["page_faults_per_step"], (fused, checkpointed)
    assert fused["kernel_s_per_step"] < checkpointed["kernel_s_per_step"]
