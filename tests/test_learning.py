"""The training machinery learns: a broken loop, loss or curriculum fails here."""

import dataclasses

import torch

import transformer_sum_mod as tsm


def test_tiny_model_learns_well_above_chance_through_the_curriculum():
    # Sum of 3 tokens in 0..19 mod 5 (chance 20 %): 8 epochs of 32 steps.
    cfg = dataclasses.replace(
        tsm.Config(),
        seq_len=3,
        vocab_size=20,
        num_classes=5,
        d_model=32,
        num_heads=2,
        ffn_dim=64,
        epochs=8,
        train_size=2048,
        batch_size=64,
        val_size=512,
    )
    tsm.seed_everything(cfg.seed)
    model = tsm.build_model(cfg)
    result = tsm.train(model, cfg, torch.device("cpu"), log=lambda line: None)
    history = result["history"]
    assert len(history) == cfg.epochs
    assert [s["active"] for s in result["stages"]] == [2, 3]  # curriculum moved
    assert history[0]["val_acc"] < 0.35
    assert history[-1]["val_acc"] > 0.6  # three times chance
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.5
