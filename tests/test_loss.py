"""The full loss is exact in chunks, the sampled loss draws only trained items, and neither pushes down items
absent from training."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from m2rec.model.config import ModelParams
from m2rec.model.factory import build_model
from m2rec.stages.train import train
from m2rec.training import loss as loss_module
from m2rec.training.loss import NextItemLoss, full_cross_entropy, sampled_cross_entropy
from m2rec.training.trainer import TrainParams, item_counts

FAST = dict(hidden_size=16, d_state=8, max_length=20)


def test_chunked_full_loss_equals_pytorch_cross_entropy_in_value_and_gradient():
    torch.manual_seed(0)
    hidden, items = torch.randn(37, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    targets = torch.randint(1, 11, (37,))
    untrained = torch.zeros(11, dtype=torch.bool)
    untrained[[0, 7]] = True
    targets[targets == 7] = 1
    reference = torch.nn.functional.cross_entropy((hidden @ items.t()).masked_fill(untrained, float("-inf")), targets)
    expected = (reference.detach(), *torch.autograd.grad(reference, (hidden, items)))
    for per_chunk in (10**6, 5 * 11, 11):  # one pass; chunks of 5 rows; one row at a time
        value = full_cross_entropy(hidden, items, targets, untrained, logits_per_chunk=per_chunk)
        for got, want in zip((value.detach(), *torch.autograd.grad(value, (hidden, items))), expected):
            torch.testing.assert_close(got, want)


def test_full_loss_passes_gradcheck_in_double_precision():
    torch.manual_seed(1)
    hidden = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    items = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    untrained = torch.tensor([True, False, False, True, False, False])
    targets = torch.tensor([1, 2, 4, 5, 1, 1, 2, 4, 5])
    assert torch.autograd.gradcheck(
        lambda h, i: full_cross_entropy(h, i, targets, untrained, logits_per_chunk=2 * 6), (hidden, items))


def test_full_loss_never_holds_more_logits_than_its_chunk(monkeypatch):
    seen = []
    original = loss_module._softmax_numerators

    def recording(hidden, items, untrained, shift=None, out=None):
        seen.append(hidden.shape[0] * items.shape[0])
        return original(hidden, items, untrained, shift, out)

    monkeypatch.setattr(loss_module, "_softmax_numerators", recording)
    hidden = torch.randn(1000, 4, requires_grad=True)
    full_cross_entropy(hidden, torch.randn(300, 4), torch.randint(1, 300, (1000,)), logits_per_chunk=3000).backward()
    assert len(seen) >= 2 * 100 and max(seen) <= 3000  # forward and recomputation in backward, 10 rows at a time


def test_sampled_loss_by_hand_and_a_draw_equal_to_the_target_is_no_negative():
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    items = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    targets = torch.tensor([1, 2])
    value = sampled_cross_entropy(hidden, items, targets, candidates=torch.tensor([3]), negatives=4)
    # each position: target logit against four draws of item 3 (logit 1)
    expected = torch.stack([torch.logsumexp(torch.tensor([2.0, 1, 1, 1, 1]), 0) - 2,
                            torch.logsumexp(torch.tensor([3.0, 1, 1, 1, 1]), 0) - 3]).mean()
    torch.testing.assert_close(value, expected)
    own = sampled_cross_entropy(hidden, items, targets, candidates=torch.tensor([1]), negatives=3)
    # position 0 drew only its own target: no negatives, loss 0; position 1 has item 1 (logit 0) three times
    torch.testing.assert_close(own, (torch.logsumexp(torch.tensor([3.0, 0, 0, 0]), 0) - 3) / 2)


@pytest.mark.parametrize("kind", ["full", "sampled"])
def test_items_absent_from_training_are_not_pushed_down_as_negatives(kind):
    sequences = [np.array([1, 2, 3, 1]), np.array([2, 3, 2])]  # items 4 and 5 never occur
    mask = item_counts(sequences, num_items=5) > 0
    assert mask.tolist() == [False, True, True, True, False, False]
    model = build_model("sasrec", 5, ModelParams(**FAST))
    inputs, targets = torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 1]])
    for trained_items, untouched in ((mask, True), (None, False)):
        model.zero_grad()
        NextItemLoss(model, trained_items, kind, negatives=64)(inputs, targets).backward()
        grad = model.item_embedding.weight.grad  # (6, H)
        assert (grad[4:].abs().sum() == 0) == untouched and grad[1:4].abs().sum() > 0


def test_training_with_sampled_loss_beats_chance(tiny_synthetic, tmp_path):
    n_items = len(pd.read_parquet(tiny_synthetic / "items.parquet"))
    metrics = train(tiny_synthetic, tmp_path / "m", "m2rec", ModelParams(**FAST),
                    TrainParams(epochs=8, batch_size=32, loss="sampled", negatives=16, progress=False))
    assert metrics["valid"]["HR@10"] > 2 * 10 / n_items
