"""Every model is causal, saves and loads safely, and M2Rec's branches, gate and text scoring behave."""

from __future__ import annotations

import json

import pytest
import torch

from m2rec.model.config import PAPER_DESIGN, ModelParams
from m2rec.model.factory import build_model, load_model, save_model
from m2rec.model.frequency import CausalFourierFilter

NUM_ITEMS = 50
SMALL = dict(hidden_size=16, d_state=4, max_length=24, dropout=0.0)
VARIANTS = {
    "sasrec": ("sasrec", {}),
    "sasrec_text": ("sasrec_text", {}),
    "mamba4rec": ("mamba4rec", {}),
    "m2rec": ("m2rec", PAPER_DESIGN),
    "m2rec_default": ("m2rec", {}),  # one temporal scale, text in the sequence branches
    "m2rec_two_layers": ("m2rec", {"num_layers": 2}),
    "m2rec_no_fft": ("m2rec", {"use_frequency": False}),
    "m2rec_no_text": ("m2rec", {"use_text": False}),
    "m2rec_no_gate": ("m2rec", {"gate": "mean"}),
}


def make(name: str, dtype=torch.float64):
    model_type, overrides = VARIANTS[name]
    torch.manual_seed(0)
    text = torch.randn(NUM_ITEMS + 1, 12)
    text[0] = 0
    model = build_model(model_type, NUM_ITEMS, ModelParams(**SMALL, **overrides), text)
    return model.to(dtype).eval()


@pytest.mark.parametrize("name", VARIANTS)
def test_future_items_never_change_the_past(name):
    model = make(name)
    torch.manual_seed(1)
    items = torch.randint(1, NUM_ITEMS + 1, (3, 20))
    base = model.encode(items)
    for t in (0, 7, 18):
        changed = items.clone()
        changed[:, t + 1 :] = torch.randint(1, NUM_ITEMS + 1, changed[:, t + 1 :].shape)
        out = model.encode(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-10)
        assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])  # the future does matter downstream


@pytest.mark.parametrize("name", VARIANTS)
def test_last_position_path_equals_full_encoding(name):
    model = make(name)
    items = torch.randint(1, NUM_ITEMS + 1, (4, 15))
    lengths = torch.tensor([15, 9, 1, 4])
    items[torch.arange(15).unsqueeze(0) >= lengths.unsqueeze(1)] = 0  # right padding
    full = model.encode(items)[torch.arange(4), lengths - 1]  # (B, H)
    torch.testing.assert_close(model.last_hidden(items, lengths), full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", VARIANTS)
def test_every_model_encodes_with_gates(name):
    """The serving contract: hidden states at the last position, and branch weights only where there are
    branches (a distribution over `branch_names`)."""
    model = make(name)
    items = torch.randint(1, NUM_ITEMS + 1, (3, 12))
    lengths = torch.tensor([12, 5, 1])
    items[torch.arange(12).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    hidden, gates = model.encode_with_gates(items, lengths)
    torch.testing.assert_close(hidden, model.last_hidden(items, lengths).unsqueeze(1), rtol=0, atol=1e-10)
    full, full_gates = model.encode_with_gates(items)
    torch.testing.assert_close(full, model.encode(items), rtol=0, atol=1e-10)
    if VARIANTS[name][0] == "m2rec":
        assert gates.shape == (3, 1, len(model.branch_names)) and full_gates.shape == (3, 12, len(model.branch_names))
    else:
        assert gates is None and full_gates is None and len(model.branch_names) == 0


def test_right_padding_does_not_change_real_positions():
    model = make("m2rec")
    items = torch.randint(1, NUM_ITEMS + 1, (2, 10))
    padded = torch.cat([items, torch.zeros(2, 5, dtype=torch.long)], 1)
    lengths = torch.tensor([10, 10])
    torch.testing.assert_close(model(items, lengths), model(padded, lengths))


def test_fourier_filter_is_a_causal_convolution():
    torch.manual_seed(0)
    layer = CausalFourierFilter(hidden_size=3, max_length=16).double()
    layer.norm = torch.nn.Identity()
    x = torch.randn(2, 11, 3, dtype=torch.float64)
    kernel = layer.kernel(11, torch.float64)  # (L, H)
    expected = x.clone()
    for t in range(11):
        for s in range(t + 1):
            expected[:, t] += kernel[t - s] * x[:, s]
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)


def test_fourier_filter_can_learn_a_periodic_lag():
    """A lag-7 copy (a weekly routine) is learnable by the frequency response, and only from the past."""
    torch.manual_seed(0)
    layer = CausalFourierFilter(hidden_size=1, max_length=32)
    layer.norm = torch.nn.Identity()
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(300):
        x = torch.randn(16, 32, 1)
        target = x + torch.nn.functional.pad(x, (0, 0, 7, 0))[:, :32]
        loss = (layer(x) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.01
    assert layer.kernel(32)[7, 0] > 0.9


def test_gate_weights_are_a_distribution_over_branches():
    model = make("m2rec")
    _, gates = model.encode_with_gates(torch.randint(1, NUM_ITEMS + 1, (2, 9)))
    assert model.branch_names == ["temporal", "frequency", "semantic"]
    assert gates.shape == (2, 9, 3)
    torch.testing.assert_close(gates.sum(-1), torch.ones(2, 9, dtype=gates.dtype))
    _, mean_gates = make("m2rec_no_gate").encode_with_gates(torch.randint(1, NUM_ITEMS + 1, (1, 4)))
    assert torch.all(mean_gates == 1 / 3)


def test_text_places_items_without_interactions():
    """Two items with identical text get representations that differ only by their ID embeddings; with the
    ID embedding of an unseen item at zero, its score comes from its text alone."""
    model = make("m2rec")
    with torch.no_grad():
        model.item_text[7] = model.item_text[3]
        model.item_embedding.weight[7].zero_()
        model.item_embedding.weight[3].zero_()
    reps = model.item_representations()
    torch.testing.assert_close(reps[7], reps[3])
    assert reps[7].abs().sum() > 0 and reps[0].abs().sum() == 0
    assert torch.all(make("m2rec_no_text").item_representations()[7] == make("m2rec_no_text").item_embedding.weight[7])


def test_item_id_dropout_scores_a_share_of_items_by_text_alone_in_training_only():
    torch.manual_seed(0)
    model = build_model("m2rec", 200, ModelParams(**SMALL, item_id_dropout=0.5), torch.randn(201, 12))
    text_only = model.text_output(model.item_text)  # (I+1, H)
    model.train()
    dropped = torch.isclose(model.item_representations(), text_only).all(-1)[1:]  # (I,)
    assert 0.3 < dropped.float().mean() < 0.7
    model.eval()
    torch.testing.assert_close(model.item_representations()[1:], (model.item_embedding.weight + text_only)[1:])


@pytest.mark.parametrize("name", ["m2rec", "sasrec", "sasrec_text", "mamba4rec"])
def test_save_and_load_round_trip(name, tmp_path):
    model = make(name, torch.float32)
    save_model(tmp_path, model, model.params if hasattr(model, "params") else ModelParams(**SMALL), {})
    loaded = load_model(tmp_path)
    items, lengths = torch.randint(1, NUM_ITEMS + 1, (2, 6)), torch.tensor([6, 3])
    torch.testing.assert_close(loaded(items, lengths), model(items, lengths))


def test_a_model_saved_before_text_in_sequence_existed_loads_as_it_was_trained(tmp_path):
    """A config written before model.text_in_sequence existed has no such key: it loads with the sequence branches
    reading IDs, as it was trained, not with today's default."""
    model = make("m2rec", torch.float32)
    save_model(tmp_path, model, model.params, {})
    config = json.loads((tmp_path / "config.json").read_text())
    del config["model_params"]["text_in_sequence"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_model(tmp_path)
    assert loaded.params.text_in_sequence is False
    items, lengths = torch.randint(1, NUM_ITEMS + 1, (2, 6)), torch.tensor([6, 3])
    torch.testing.assert_close(loaded(items, lengths), model(items, lengths))


@pytest.mark.parametrize("model_type", ["m2rec", "sasrec_text"])
def test_text_model_needs_embeddings(model_type):
    with pytest.raises(ValueError, match="item_text_embeddings"):
        build_model(model_type, NUM_ITEMS, ModelParams(**SMALL), None)


def test_sasrec_text_reads_and_scores_items_by_id_plus_text():
    """sasrec_text represents items as M2Rec scores them (ID embedding + projected text), on input and output:
    two items with the same text and the same ID embedding are interchangeable, and text changes the encoding."""
    model = make("sasrec_text")
    with torch.no_grad():
        model.item_text[7] = model.item_text[3]
        model.item_embedding.weight[7] = model.item_embedding.weight[3]
    reps = model.item_representations()
    torch.testing.assert_close(reps, model.item_embedding.weight + model.text_output(model.item_text)
                               * (torch.arange(NUM_ITEMS + 1) > 0).unsqueeze(1))
    history = torch.tensor([[1, 3, 5]])
    torch.testing.assert_close(model.encode(history), model.encode(torch.tensor([[1, 7, 5]])))
    plain = make("sasrec")
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()})
    assert not torch.allclose(plain.encode(history), model.encode(history))


@pytest.mark.parametrize("name, reads_history_text", [("m2rec", False), ("m2rec_default", True)])
def test_text_in_sequence_lets_the_sequence_branches_read_the_history_text(name, reads_history_text):
    """With text_in_sequence the sequence branches read each history item as ID plus projected text, so changing an
    earlier item's text changes the output at a later position; without it only the current item's text counts."""
    model = make(name)
    history = torch.tensor([[3, 7, 9, 4]])
    before = model.encode(history)[:, -1]  # (1, H)
    model.item_text[3] += 1.0  # the text of the first item only
    after = model.encode(history)[:, -1]
    assert (not torch.allclose(after, before)) == reads_history_text
