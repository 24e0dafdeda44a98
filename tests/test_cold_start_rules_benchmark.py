"""The cold-start placement benchmark: every rule places exactly the untrained items, measuring a rule leaves the
model as it was, and the pooled report counts cold and warm users together."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2rec.data.prepared import PreparedDataset
from m2rec.model.config import ModelParams
from m2rec.model.factory import build_model

from conftest import load_benchmark

rules = load_benchmark("cold_start_rules")


def test_every_rule_places_one_embedding_per_untrained_item():
    torch.manual_seed(0)
    ids, text = torch.randn(200, 16, dtype=torch.float64), torch.randn(200, 8, dtype=torch.float64)
    counts = torch.randint(0, 30, (200,)).double()
    assert rules.SHIPPED in rules.RULES
    for name, place in rules.RULES.items():
        placed = place(ids, text, counts)
        assert placed.shape == (int((counts == 0).sum()), 16) and torch.isfinite(placed).all(), name
    torch.testing.assert_close(rules.RULES["as_trained"](ids, text, counts), ids[counts == 0])


def test_measuring_a_rule_leaves_the_model_as_it_was_and_pools_cold_with_warm(tiny_synthetic):
    data = PreparedDataset.load(tiny_synthetic)
    model = build_model("m2rec", data.num_items, ModelParams(hidden_size=16, d_state=8, max_length=20),
                        torch.randn(data.num_items + 1, 8))
    before = model.item_embedding.weight.detach().clone()
    held_out = np.array([1, 2, 3])
    outcome = rules.measure(model, data, held_out, rules.RULES["zero"])
    assert torch.equal(model.item_embedding.weight, before)
    _, targets = data.histories("test")
    assert len(outcome["test"]["cold_ranks"]) == int(np.isin(targets, held_out).sum())
    report = rules.summary([outcome, outcome])["test"]
    cold = np.asarray(outcome["test"]["cold_ranks"])
    hits, cases = outcome["test"]["warm_hits"] + (cold < 10).sum(), outcome["test"]["warm_cases"] + len(cold)
    assert report["all_HR@10"] == pytest.approx(hits / cases)
    assert report["warm_HR@10"] == pytest.approx(outcome["test"]["warm_hits"] / outcome["test"]["warm_cases"])
