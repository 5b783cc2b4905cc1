"""Each building block on a toy input: values, shapes and the library oracle."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import transformer_sum_mod as tsm

# Data


def test_labels_are_sum_mod_classes():
    data = tsm.SumModDataset(200, 7, 30, 4, seed=3)
    for index in range(len(data)):
        tokens, label = data[index]
        assert tokens.shape == (7,)
        assert tokens.min() >= 0 and tokens.max() < 30
        assert label.item() == tokens.sum().item() % 4


def test_same_seed_gives_same_data_and_other_seed_does_not():
    first = tsm.SumModDataset(50, 16, 100, 10, seed=1)
    again = tsm.SumModDataset(50, 16, 100, 10, seed=1)
    other = tsm.SumModDataset(50, 16, 100, 10, seed=2)
    assert np.array_equal(first.tokens, again.tokens)
    assert not np.array_equal(first.tokens, other.tokens)


@pytest.mark.parametrize("max_active", [1, 3, 16])
def test_curriculum_keeps_at_most_k_tokens_with_a_residue(max_active):
    data = tsm.SumModDataset(300, 16, 100, 10, seed=0, max_active=max_active)
    counts = []
    for index in range(len(data)):
        tokens, label = data[index]
        inactive = data.ranks[index] >= data.active_counts(np.array([index]))[0]
        # Inactive positions hold multiples of 10: they add nothing mod 10.
        assert (tokens[torch.from_numpy(inactive)] % 10 == 0).all()
        assert label.item() == tokens.sum().item() % 10
        counts.append(data.active_counts(np.array([index]))[0])
    assert min(counts) >= 1 and max(counts) == max_active
    # About half the sequences sit exactly at the current stage.
    assert 0.35 < np.mean(np.array(counts) == max_active) < 0.75 or max_active == 1


def test_held_out_set_does_not_depend_on_training_seed():
    cfg_a = tsm.Config(seed=0)
    cfg_b = tsm.Config(seed=7)
    sets = [
        tsm.SumModDataset(
            c.val_size, c.seq_len, c.vocab_size, c.num_classes, c.val_seed
        )
        for c in (cfg_a, cfg_b)
    ]
    assert np.array_equal(sets[0].tokens, sets[1].tokens)


# Positional encoding


def test_positional_encoding_matches_the_formula():
    d_model, length = 8, 12
    encoding = tsm.PositionalEncoding(d_model, max_len=length)
    for pos in range(length):
        for i in range(d_model // 2):
            angle = pos / 10000 ** (2 * i / d_model)
            assert encoding.table[pos, 2 * i].item() == pytest.approx(
                math.sin(angle), abs=1e-5
            )
            assert encoding.table[pos, 2 * i + 1].item() == pytest.approx(
                math.cos(angle), abs=1e-5
            )


def test_positional_encoding_is_a_buffer_and_adds_to_its_input():
    encoding = tsm.PositionalEncoding(6, max_len=20)
    assert "table" in dict(encoding.named_buffers())
    assert list(encoding.parameters()) == []
    x = torch.randn(3, 5, 6)
    out = encoding(x)  # (B, T, D)
    assert out.shape == (3, 5, 6)
    assert torch.allclose(out - x, encoding.table[:5].expand(3, 5, 6), atol=1e-6)


# Attention written out


def test_scaled_dot_product_attention_shapes_rows_and_library():
    q = torch.randn(2, 3, 5, 4)  # (B, H, T, Dh)
    k = torch.randn(2, 3, 7, 4)  # (B, H, S, Dh)
    v = torch.randn(2, 3, 7, 4)
    out, weights = tsm.scaled_dot_product_attention(q, k, v)
    assert out.shape == (2, 3, 5, 4) and weights.shape == (2, 3, 5, 7)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 3, 5))
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-6)


def test_masks_block_future_and_padded_keys():
    length = 6
    causal = tsm.causal_mask(length)
    assert causal.shape == (length, length)
    assert causal[0, 1] and not causal[1, 0] and not causal.diagonal().any()
    lengths = torch.tensor([6, 4, 1])
    padded = tsm.padding_mask(lengths, length)  # (B, S)
    assert padded.tolist()[1] == [False] * 4 + [True] * 2
    blocked = causal | padded[:, None, :]  # (B, T, S)
    q, k, v = (torch.randn(3, length, 4) for _ in range(3))
    out, weights = tsm.scaled_dot_product_attention(q, k, v, blocked)
    assert (weights[blocked] == 0).all()  # nothing attends to a blocked key
    assert torch.allclose(weights.sum(-1), torch.ones(3, length))
    # PyTorch's functional version takes the opposite meaning: True = attend.
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=~blocked)
    assert torch.allclose(out, reference, atol=1e-6)


def _mask_cases(batch, length):
    lengths = torch.tensor([length, length - 2, 3][:batch])
    padded = tsm.padding_mask(lengths, length)
    return {
        "none": (None, None),
        "padding": (padded, None),
        "causal": (None, tsm.causal_mask(length)),
        "both": (padded, tsm.causal_mask(length)),
    }


@pytest.mark.parametrize("heads", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masks", ["none", "padding", "causal", "both"])
def test_manual_multihead_attention_matches_pytorch(heads, dtype, masks):
    torch.manual_seed(heads)
    d_model, batch, length = 16, 3, 7
    mha = nn.MultiheadAttention(d_model, heads, dropout=0.3, batch_first=True)
    mha = mha.to(dtype).eval()  # eval: dropout off, as the manual version
    x = torch.randn(batch, length, d_model, dtype=dtype)
    key_padding_mask, attn_mask = _mask_cases(batch, length)[masks]
    expected, expected_weights = mha(
        x,
        x,
        x,
        key_padding_mask=key_padding_mask,
        attn_mask=attn_mask,
        need_weights=True,
        average_attn_weights=False,
    )
    out, weights = tsm.manual_multihead_attention(
        mha, x, x, x, key_padding_mask=key_padding_mask, attn_mask=attn_mask
    )
    assert out.shape == (batch, length, d_model)
    assert weights.shape == (batch, heads, length, length)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-10
    assert torch.allclose(out, expected, atol=tolerance)
    assert torch.allclose(weights, expected_weights, atol=tolerance)


def test_manual_multihead_attention_with_different_key_length():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, batch_first=True).eval()
    query, memory = torch.randn(2, 4, 12), torch.randn(2, 9, 12)
    expected, expected_weights = mha(
        query, memory, memory, need_weights=True, average_attn_weights=False
    )
    out, weights = tsm.manual_multihead_attention(mha, query, memory, memory)
    assert out.shape == (2, 4, 12) and weights.shape == (2, 3, 4, 9)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(weights, expected_weights, atol=1e-5)


# Encoder layer and model


def test_encoder_layer_shapes_and_attention_rows():
    layer = tsm.EncoderLayer(d_model=16, num_heads=4, ffn_dim=32, dropout=0.1)
    layer.eval()
    x = torch.randn(5, 9, 16)
    out, weights = layer(x, need_weights=True)
    assert out.shape == (5, 9, 16)
    assert weights.shape == (5, 4, 9, 9)  # (B, H, T, T)
    assert torch.allclose(weights.sum(-1), torch.ones(5, 4, 9), atol=1e-6)
    out, weights = layer(x)
    assert weights is None


def test_encoder_layer_is_post_layer_norm():
    torch.manual_seed(0)
    layer = tsm.EncoderLayer(8, 2, 16, dropout=0.0).eval()
    x = torch.randn(2, 5, 8)
    attended, _ = layer.attention(x, x, x)
    middle = layer.norm1(x + attended)
    expected = layer.norm2(middle + layer.feed_forward(middle))
    assert torch.allclose(layer(x)[0], expected, atol=1e-6)


def test_mean_pool_averages_positions_and_skips_padding():
    x = torch.randn(3, 5, 4)
    assert torch.allclose(tsm.mean_pool(x), x.mean(dim=1))
    mask = tsm.padding_mask(torch.tensor([5, 2, 1]), 5)
    pooled = tsm.mean_pool(x, mask)  # (B, D)
    assert pooled.shape == (3, 4)
    assert torch.allclose(pooled[1], x[1, :2].mean(dim=0))
    assert torch.allclose(pooled[2], x[2, 0])


@pytest.mark.parametrize("heads,layers", [(1, 1), (4, 2), (2, 3)])
def test_model_shapes(heads, layers):
    model = tsm.TinyTransformer(
        vocab_size=30, d_model=8, num_heads=heads, num_layers=layers,
        ffn_dim=16, num_classes=5,
    )  # fmt: skip
    model.eval()
    tokens = torch.randint(0, 30, (4, 6))  # (B, T)
    logits, maps = model(tokens, need_weights=True)
    assert logits.shape == (4, 5)
    assert len(maps) == layers
    assert all(m.shape == (4, heads, 6, 6) for m in maps)
    logits_again, no_maps = model(tokens)
    assert no_maps == [] and torch.allclose(logits, logits_again)
    single = tsm.capture_attention(model, tokens[0])
    assert [m.shape for m in single] == [(heads, 6, 6)] * layers


def test_padding_does_not_change_the_prediction():
    torch.manual_seed(0)
    model = tsm.TinyTransformer(20, 8, 2, 2, 16, 5).eval()
    short = torch.tensor([[3, 7, 11]])
    padded = torch.tensor([[3, 7, 11, 0, 0]])
    mask = tsm.padding_mask(torch.tensor([3]), 5)
    expected, _ = model(short)
    logits, _ = model(padded, key_padding_mask=mask)
    assert torch.allclose(logits, expected, atol=1e-5)


def test_parameter_groups_follow_depth_order():
    model = tsm.TinyTransformer(20, 8, 2, 3, 16, 5)
    groups = list(
        dict.fromkeys(tsm.parameter_group(n) for n, _ in model.named_parameters())
    )
    per_layer = ["attention", "norm1", "feed_forward", "norm2"]
    expected = ["embedding"]
    expected += [f"layer {i} {part}" for i in range(3) for part in per_layer]
    assert groups == expected + ["head"]


# Training helpers


def test_learning_rate_schedule():
    cfg = tsm.Config(lr=1.0, warmup_steps=10)
    assert tsm.learning_rate(cfg, 0, None, 100) == pytest.approx(0.1)
    assert tsm.learning_rate(cfg, 50, None, 100) == 1.0
    assert tsm.learning_rate(cfg, 50, 50, 100) == pytest.approx(1.0)
    assert tsm.learning_rate(cfg, 75, 50, 100) == pytest.approx(0.5)
    assert tsm.learning_rate(cfg, 100, 50, 100) == pytest.approx(0.0)


def test_residue_centroid_accuracy():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 6)) * 10
    clustered = centres[np.arange(100) % 10] + rng.normal(size=(100, 6))
    assert tsm.residue_centroid_accuracy(clustered, 10) == 1.0
    noise = rng.normal(size=(100, 6))
    assert tsm.residue_centroid_accuracy(noise, 10) < 0.4
