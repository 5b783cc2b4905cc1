"""A tiny Transformer encoder that learns "sum mod 10", with its insides shown.

What it teaches
    The encoder built from ``torch.nn.MultiheadAttention``: token embeddings,
    sinusoidal positional encoding, post-LN encoder layers with a GELU
    feed-forward network, mean pooling and a linear classifier. Attention is
    also written out by hand (``scaled_dot_product_attention`` and
    ``manual_multihead_attention``) and the tests check it against PyTorch.
    The task: read 16 integers in 0..99 and predict their sum mod 10.

Why the training recipe is unusual
    The label changes whenever any single token's residue changes, so, as
    with parity, no token on its own says anything about the label and plain
    training on random sequences stays at chance (10 %). The default recipe
    therefore uses a curriculum: at first only a few tokens per sequence are
    "active" (the others are multiples of 10, which add nothing mod 10); the
    number of active tokens grows as soon as the model handles the current
    number. Once every token is active the learning rate decays to zero.
    ``--recipe article`` keeps the original recipe so you can watch it fail.

How to run
    python transformer_sum_mod.py                  # default recipe, 95-120 s, 2 cores
    python transformer_sum_mod.py --epochs 1       # smoke run, ~15 s with imports
    python transformer_sum_mod.py --recipe article # the original recipe: memorises
    python transformer_sum_mod.py --help           # every option and its default

What it writes (into --out-dir, default outputs/)
    loss_curves.png      loss and accuracy per epoch, chance levels, curriculum
    attention_heads.png  attention of one held-out sequence, first and final
    embedding_pca.png    token embeddings in 2-D, coloured by token mod 10
    grad_norms.png       gradient norms of each layer over the first steps
    metrics.json         the config, per-epoch history and final numbers

Deliberate simplifications
    One small model trained on the CPU by default; no checkpoints; the
    positional encoding is fixed (not learned); plots use matplotlib's
    defaults apart from what each figure needs to be read.
"""

# %% Imports
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.decomposition import PCA
from torch.utils.data import DataLoader, Dataset

# %% Configuration


@dataclass(frozen=True)
class Config:
    """Every setting of a run. The defaults are the "default" recipe."""

    # Task: the article's values.
    vocab_size: int = 100  # tokens are the integers 0..99
    seq_len: int = 16  # integers per sequence
    num_classes: int = 10  # label = sum mod 10
    # Model: the article's sizes.
    d_model: int = 64  # width of every token vector
    num_heads: int = 4  # 4 heads of width 16
    num_layers: int = 2  # two encoder layers are enough for this task
    ffn_dim: int = 128  # feed-forward hidden width, 2 x d_model
    dropout: float = 0.0  # article 0.1; with fresh data there is no over-fit
    max_len: int = 512  # rows in the positional-encoding table
    # Training.
    epochs: int = 36  # an epoch is train_size sequences
    train_size: int = 16_384  # 128 steps of 128 per epoch
    val_size: int = 2048  # fixed held-out set of uniform random sequences
    batch_size: int = 128  # less gradient noise; about as fast per sequence
    lr: float = 3e-3  # peak AdamW learning rate
    weight_decay: float = 1e-2  # AdamW's decoupled weight decay (article)
    warmup_steps: int = 100  # linear warm-up avoids early loss spikes
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    fresh_data: bool = True  # new training sequences each epoch
    curriculum: bool = True  # grow the number of active tokens
    curriculum_start: int = 2  # active tokens at the first stage
    curriculum_threshold: float = 0.7  # accuracy needed to add one more
    curriculum_check_every: int = 13  # steps between curriculum checks
    hardest_share: float = 0.5  # share of each batch at the current stage
    decay_after_curriculum: bool = True  # cosine lr decay once all active
    # Recording and output.
    grad_record_steps: int = 120  # record gradient norms of the first steps
    attn_layers: str = "all"  # layers drawn in the attention figure
    seed: int = 0  # training seed; the held-out set has its own
    val_seed: int = 20_240_601  # seed of the held-out set
    device: str = "auto"  # cuda, then mps, then cpu
    out_dir: str = "outputs"
    show: bool = False  # open plot windows as well as saving PNGs
    recipe: str = "default"


# Named presets. Options given on the command line override them.
RECIPES = {
    "default": {},
    # The article's recipe, unchanged: one fixed set of 4,096 sequences seen
    # 8 times, dropout 0.1, constant lr 1e-3, seed 42, 512 held-out sequences.
    "article": {
        "epochs": 8,
        "batch_size": 64,
        "train_size": 4096,
        "val_size": 512,
        "dropout": 0.1,
        "lr": 1e-3,
        "warmup_steps": 0,
        "grad_clip": 0.0,
        "fresh_data": False,
        "curriculum": False,
        "decay_after_curriculum": False,
        "seed": 42,
    },
}


class UsageError(ValueError):
    """A bad option value; main() prints it on one line and exits with 2."""


# %% Reproducibility and device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch once, before anything random happens."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """'auto' takes cuda, then mps, then cpu; an absent device is a UsageError."""
    has_cuda = torch.cuda.is_available()
    has_mps = torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if has_cuda else "mps" if has_mps else "cpu")
    if (name == "cuda" and not has_cuda) or (name == "mps" and not has_mps):
        raise UsageError(
            f"--device {name}: no {name} device is available here; "
            "use --device cpu or --device auto"
        )
    return torch.device(name)


# %% Data


class SumModDataset(Dataset):
    """Sequences of integers, each labelled with its sum mod num_classes.

    Worked example (vocab 100, 10 classes, length 4 to keep it short):
        tokens [37, 90, 4, 61]  ->  sum 192  ->  label 2

    Curriculum. With ``max_active = k`` each sequence has between 1 and k
    "active" positions holding any token 0..vocab-1; every other position
    holds a multiple of num_classes (0, 10, .., 90), which adds nothing to the
    label. A share ``hardest_share`` of the sequences has exactly k active
    positions, the rest a uniform count in 1..k. Example with k = 2:
        tokens [40, 37, 0, 70]  ->  only 37 counts  ->  label 7
    ``max_active=None`` gives plain uniform sequences. The random draws are
    made once, in __init__; max_active may change between batches, so a
    curriculum can move on in the middle of an epoch.
    """

    def __init__(
        self,
        size: int,
        seq_len: int,
        vocab_size: int,
        num_classes: int,
        seed: int,
        max_active: int | None = None,
        hardest_share: float = 0.5,
    ):
        rng = np.random.default_rng(seed)
        num_fillers = (vocab_size - 1) // num_classes + 1  # 0, 10, .., 90
        self.tokens = rng.integers(0, vocab_size, size=(size, seq_len))
        self.fillers = rng.integers(0, num_fillers, size=(size, seq_len))
        self.fillers *= num_classes
        # Rank of each position in a random order; the k lowest are active.
        self.ranks = rng.random((size, seq_len)).argsort(axis=1)
        self.levels = rng.random(size)  # picks each sequence's active count
        self.num_classes = num_classes
        self.hardest_share = hardest_share
        self.max_active = max_active

    def __len__(self) -> int:
        return len(self.tokens)

    def active_counts(self, indices: np.ndarray) -> np.ndarray:
        """Number of active positions of each sequence at the current stage."""
        k = self.max_active
        levels = self.levels[indices]
        if self.hardest_share >= 1.0:
            return np.full(len(levels), k)
        # Levels below hardest_share get k; the rest of [0, 1) maps onto 1..k.
        fraction = (levels - self.hardest_share) / (1.0 - self.hardest_share)
        spread = 1 + (np.clip(fraction, 0.0, 1.0) * k).astype(int).clip(max=k - 1)
        return np.where(levels < self.hardest_share, k, spread)

    def rows(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences (N, T) and labels (N,) for an array of N indices."""
        tokens = self.tokens[indices]  # (N, T)
        if self.max_active is not None:
            counts = self.active_counts(indices)  # (N,)
            active = self.ranks[indices] < counts[:, None]  # (N, T)
            tokens = np.where(active, tokens, self.fillers[indices])
        labels = tokens.sum(axis=1) % self.num_classes  # (N,)
        return torch.from_numpy(tokens), torch.from_numpy(labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, labels = self.rows(np.array([index]))
        return tokens[0], labels[0]  # (T,), ()

    def __getitems__(self, indices: list[int]) -> list[tuple]:
        """A whole batch in one NumPy call. DataLoader uses this hook when a
        dataset has it; the items are the same as from __getitem__."""
        tokens, labels = self.rows(np.asarray(indices))
        return list(zip(tokens, labels, strict=True))


# %% Positional encoding
# Shape legend, used from here on:
#   B batch, T query positions, S key positions (T for self-attention),
#   D d_model, H heads, Dh = D / H head width, F ffn_dim, K classes.


class PositionalEncoding(nn.Module):
    """Add fixed sine/cosine position signals to token vectors.

    PE[pos, 2i]   = sin(pos / 10000^(2i/D))
    PE[pos, 2i+1] = cos(pos / 10000^(2i/D))
    Attention itself ignores order; these signals let it tell positions apart.
    """

    def __init__(self, d_model: int, max_len: int = 512):
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
        # 10000^(-2i/D) written as exp(-(2i/D) ln 10000): the same numbers, a
        # geometric series of frequencies from 1 down to nearly 1/10000.
        two_i = torch.arange(0, d_model, 2, dtype=torch.float32)  # (D/2,)
        frequency = torch.exp(-two_i / d_model * math.log(10000.0))  # (D/2,)
        angle = position * frequency  # (max_len, D/2)
        table = torch.zeros(max_len, d_model)  # (max_len, D)
        table[:, 0::2] = torch.sin(angle)
        table[:, 1::2] = torch.cos(angle)
        # A buffer moves with .to(device) and is saved, but is not trained.
        self.register_buffer("table", table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        return x + self.table[: x.size(1)]


# %% Attention, written out (what nn.MultiheadAttention computes)


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T / sqrt(d_k)) V.

    q (..., T, Dh), k and v (..., S, Dh); ``mask`` is boolean, broadcastable
    to (..., T, S), True where a query may NOT attend (PyTorch's meaning for
    nn.MultiheadAttention; F.scaled_dot_product_attention uses the opposite).
    Returns output (..., T, Dh) and weights (..., T, S). A query with every
    key masked gets NaN weights, as in PyTorch.
    """
    d_k = q.size(-1)
    # Dot products of d_k unit-variance terms have variance d_k; dividing by
    # sqrt(d_k) brings it back to 1 so the softmax does not saturate.
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)  # (..., T, S)
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))  # exp(-inf) = 0
    weights = scores.softmax(dim=-1)  # (..., T, S), each row sums to 1
    return weights @ v, weights  # (..., T, Dh), (..., T, S)


def causal_mask(length: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, T) bool, True above the diagonal: query t may not see keys after t."""
    ones = torch.ones(length, length, dtype=torch.bool, device=device)
    return ones.triu(diagonal=1)


def padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B, S) bool, True at padded key positions (index >= that row's length)."""
    positions = torch.arange(max_len, device=lengths.device)  # (S,)
    return positions.unsqueeze(0) >= lengths.unsqueeze(1)  # (B, S)


def manual_multihead_attention(
    mha: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head attention by hand, from ``mha``'s own weights.

    Matches ``mha(query, key, value, key_padding_mask=..., attn_mask=...,
    need_weights=True, average_attn_weights=False)`` for a batch_first module
    in eval mode (no dropout) with the default packed input projection.
    query (B, T, D), key and value (B, S, D); key_padding_mask (B, S) and
    attn_mask (T, S) are boolean, True = may not attend.
    Returns output (B, T, D) and per-head weights (B, H, T, S).
    """
    batch, t_len, d_model = query.shape
    s_len = key.size(1)
    heads = mha.num_heads
    head_dim = d_model // heads
    # in_proj_weight stacks W_q, W_k and W_v on top of each other: (3D, D).
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)  # each (D, D)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)  # each (D,)
    q = query @ w_q.T + b_q  # (B, T, D)
    k = key @ w_k.T + b_k  # (B, S, D)
    v = value @ w_v.T + b_v  # (B, S, D)
    # Split D into H heads of width Dh; each head attends on its own.
    q = q.view(batch, t_len, heads, head_dim).transpose(1, 2)  # (B, H, T, Dh)
    k = k.view(batch, s_len, heads, head_dim).transpose(1, 2)  # (B, H, S, Dh)
    v = v.view(batch, s_len, heads, head_dim).transpose(1, 2)  # (B, H, S, Dh)
    blocked = torch.zeros(batch, 1, t_len, s_len, dtype=torch.bool)  # (B,1,T,S)
    blocked = blocked.to(query.device)
    if attn_mask is not None:
        blocked = blocked | attn_mask  # (T, S) -> (B, 1, T, S)
    if key_padding_mask is not None:
        blocked = blocked | key_padding_mask[:, None, None, :]  # (B, 1, T, S)
    heads_out, weights = scaled_dot_product_attention(q, k, v, blocked)
    # heads_out (B, H, T, Dh), weights (B, H, T, S)
    # Merge heads: put the H outputs of width Dh side by side again.
    merged = heads_out.transpose(1, 2).reshape(batch, t_len, d_model)  # (B, T, D)
    return mha.out_proj(merged), weights  # (B, T, D), (B, H, T, S)


# %% Encoder layer


def dropout_layer(rate: float) -> nn.Module:
    """nn.Dropout(rate), or a no-op when rate is 0: nn.Dropout(0.0) still
    does work on every call (about a tenth of a CPU training step here)."""
    return nn.Dropout(rate) if rate > 0 else nn.Identity()


class EncoderLayer(nn.Module):
    """One post-LN encoder layer (as in the original Transformer):

        x = LayerNorm(x + Dropout(MultiHeadAttention(x, x, x)))
        x = LayerNorm(x + Dropout(W2 Dropout(GELU(W1 x + b1)) + b2))

    The residual path lets each sub-layer learn a correction to x; the
    LayerNorm after the sum keeps every position's vector at a steady scale.
    """

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        # Modules are registered in the order forward() uses them, so the
        # gradient-norm figure lists them in depth order.
        self.attention = nn.MultiheadAttention(
            d_model, num_heads, dropout=dropout, batch_first=True
        )
        self.norm1 = nn.LayerNorm(d_model)
        # Position-wise: the same two-layer MLP applied to every position.
        self.feed_forward = nn.Sequential(
            nn.Linear(d_model, ffn_dim),  # (B, T, D) -> (B, T, F)
            nn.GELU(),
            dropout_layer(dropout),
            nn.Linear(ffn_dim, d_model),  # (B, T, F) -> (B, T, D)
        )
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = dropout_layer(dropout)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, D) -> (B, T, D) and per-head weights (B, H, T, T) or None."""
        attended, weights = self.attention(
            x,
            x,
            x,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            average_attn_weights=False,  # keep one map per head
        )
        x = self.norm1(x + self.dropout(attended))  # (B, T, D)
        x = self.norm2(x + self.dropout(self.feed_forward(x)))  # (B, T, D)
        return x, weights


# %% Model


def mean_pool(x: torch.Tensor, key_padding_mask: torch.Tensor | None = None):
    """Average over positions, (B, T, D) -> (B, D).

    Padded positions (True in key_padding_mask) are left out of the average;
    otherwise the padding's vectors would leak into every sequence summary.
    """
    if key_padding_mask is None:
        return x.mean(dim=1)  # (B, D)
    keep = (~key_padding_mask).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
    counts = keep.sum(dim=1).clamp(min=1.0)  # (B, 1)
    return (x * keep).sum(dim=1) / counts  # (B, D)


class TinyTransformer(nn.Module):
    """Embedding -> positional encoding -> encoder layers -> mean -> linear."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        num_heads: int,
        num_layers: int,
        ffn_dim: int,
        num_classes: int,
        dropout: float = 0.0,
        max_len: int = 512,
    ):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.positional = PositionalEncoding(d_model, max_len)
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, num_heads, ffn_dim, dropout)
            for _ in range(num_layers)
        )
        self.head = nn.Linear(d_model, num_classes)

    def forward(
        self,
        tokens: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """tokens (B, T) -> logits (B, K) and, if asked, one (B, H, T, T) map
        per layer (an empty list otherwise)."""
        x = self.embedding(tokens)  # (B, T) -> (B, T, D)
        x = self.positional(x)  # (B, T, D)
        attention_maps = []
        for layer in self.layers:
            x, weights = layer(x, key_padding_mask, need_weights)  # (B, T, D)
            if need_weights:
                attention_maps.append(weights)  # (B, H, T, T)
        pooled = mean_pool(x, key_padding_mask)  # (B, D)
        return self.head(pooled), attention_maps  # (B, K)


def build_model(cfg: Config) -> TinyTransformer:
    return TinyTransformer(
        cfg.vocab_size,
        cfg.d_model,
        cfg.num_heads,
        cfg.num_layers,
        cfg.ffn_dim,
        cfg.num_classes,
        cfg.dropout,
        cfg.max_len,
    )


# %% Training


def learning_rate(cfg: Config, step: int, decay_start: int | None, total: int):
    """Linear warm-up, then constant; cosine decay to 0 from ``decay_start``.

    lr(s) = peak * (1 + cos(pi * (s - start) / (total - start))) / 2
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if decay_start is None or total <= decay_start:
        return cfg.lr
    progress = min(1.0, (step - decay_start) / (total - decay_start))
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device):
    """Mean cross-entropy and accuracy over a loader, in eval mode."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for tokens, labels in loader:
        tokens, labels = tokens.to(device), labels.to(device)
        logits, _ = model(tokens)  # (B, K)
        total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(dim=1) == labels).sum().item()
        count += len(labels)
    model.train(was_training)
    return total_loss / count, correct / count


@torch.no_grad()
def capture_attention(model: nn.Module, tokens: torch.Tensor) -> list[np.ndarray]:
    """Per-layer attention maps (H, T, T) of one sequence (T,), in eval mode.

    Eval mode switches dropout off, so every row is a true distribution.
    """
    was_training = model.training
    model.eval()
    _, maps = model(tokens.unsqueeze(0), need_weights=True)  # (T,) -> (1, T)
    model.train(was_training)
    return [m[0].cpu().numpy() for m in maps]  # each (1, H, T, T) -> (H, T, T)


def parameter_group(name: str) -> str:
    """'layers.1.feed_forward.0.weight' -> 'layer 1 feed_forward'."""
    parts = name.split(".")
    if parts[0] == "layers":
        return f"layer {parts[1]} {parts[2]}"
    return parts[0]


def gradient_norms(model: nn.Module, step: int) -> list[dict]:
    """One row per parameter tensor: its group, the step and its L2 norm."""
    return [
        {"group": parameter_group(name), "step": step, "norm": p.grad.norm().item()}
        for name, p in model.named_parameters()
        if p.grad is not None
    ]


@torch.no_grad()
def stage_accuracy(model, cfg: Config, active: int, seed: list[int], device) -> float:
    """Accuracy on 256 fresh sequences with exactly ``active`` active tokens."""
    probe = SumModDataset(
        256, cfg.seq_len, cfg.vocab_size, cfg.num_classes, seed, active, 1.0
    )
    tokens, labels = probe.rows(np.arange(len(probe)))  # (256, T), (256,)
    was_training = model.training
    model.eval()
    logits, _ = model(tokens.to(device))  # (256, K)
    model.train(was_training)
    return (logits.argmax(dim=1).cpu() == labels).float().mean().item()


def train(
    model: nn.Module,
    cfg: Config,
    device: torch.device,
    should_stop=lambda: False,
    log=print,
) -> dict:
    """Train with AdamW and cross-entropy; return everything the plots need.

    ``should_stop()`` is asked after every step (Ctrl-C sets it). A non-finite
    loss or gradient stops training and restores the weights of the last
    finished epoch, so what is reported and drawn is the finite part.
    """
    val_set = SumModDataset(
        cfg.val_size, cfg.seq_len, cfg.vocab_size, cfg.num_classes, cfg.val_seed
    )
    val_loader = DataLoader(val_set, batch_size=512)
    probe_tokens = val_set[0][0]  # the held-out sequence shown in the figure
    # AdamW applies weight decay to the weights directly (w -= lr * wd * w),
    # not through the gradient, so Adam's per-weight scaling leaves it intact.
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    steps_per_epoch = math.ceil(cfg.train_size / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    active = cfg.seq_len
    if cfg.curriculum:
        active = min(cfg.curriculum_start, cfg.seq_len)
    decay_start = None
    if cfg.decay_after_curriculum and active == cfg.seq_len:
        decay_start = 0
    stages = [{"step": 0, "active": active}]
    history, grad_rows, first_attention = [], [], None
    seconds_to_99, diverged, interrupted = None, None, False
    good_state = copy.deepcopy(model.state_dict())
    train_set = None
    step = 0
    start = time.perf_counter()
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        if cfg.fresh_data or train_set is None:
            data_seed = [cfg.seed, epoch if cfg.fresh_data else 0]
            train_set = SumModDataset(
                cfg.train_size,
                cfg.seq_len,
                cfg.vocab_size,
                cfg.num_classes,
                data_seed,
                active if cfg.curriculum else None,
                cfg.hardest_share,
            )
        shuffle = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        loader = DataLoader(
            train_set, batch_size=cfg.batch_size, shuffle=True, generator=shuffle
        )
        loss_sum, correct, count = 0.0, 0, 0
        for tokens, labels in loader:
            tokens, labels = tokens.to(device), labels.to(device)
            lr = learning_rate(cfg, step, decay_start, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits, _ = model(tokens)  # (B, K)
            loss = F.cross_entropy(logits, labels)
            if not torch.isfinite(loss):
                diverged = {"step": step, "what": "loss", "lr": lr}
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if step < cfg.grad_record_steps:
                grad_rows += gradient_norms(model, step)
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            total_norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            if not torch.isfinite(total_norm):
                diverged = {"step": step, "what": "gradient", "lr": lr}
                break
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(labels)
            correct += (logits.argmax(dim=1) == labels).sum().item()
            count += len(labels)
            if first_attention is None:
                first_attention = capture_attention(model, probe_tokens.to(device))
            # Curriculum: once the model handles the current number of active
            # tokens, allow one more (from the next batch on).
            check_now = step % cfg.curriculum_check_every == 0
            if active < cfg.seq_len and check_now:
                accuracy = stage_accuracy(model, cfg, active, [cfg.seed, step], device)
                if accuracy >= cfg.curriculum_threshold:
                    active += 1
                    train_set.max_active = active
                    stages.append({"step": step, "active": active})
                    if active == cfg.seq_len and cfg.decay_after_curriculum:
                        decay_start = step
            if should_stop():
                interrupted = True
                break
        if diverged:
            model.load_state_dict(good_state)  # last finished epoch, or start
            diverged["epoch"] = epoch
            break
        val_loss, val_acc = evaluate(model, val_loader, device)
        seconds = time.perf_counter() - start
        if count:
            train_loss, train_acc = loss_sum / count, correct / count
        else:
            train_loss, train_acc = float("nan"), float("nan")
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "seconds": seconds,
            }
        )
        good_state = copy.deepcopy(model.state_dict())
        log(
            f"epoch {epoch:3d}/{cfg.epochs} | train loss {train_loss:.4f} "
            f"acc {100 * train_acc:5.1f}% | val loss {val_loss:.4f} "
            f"acc {100 * val_acc:5.1f}% | active {active:2d} | "
            f"lr {lr:.1e} | {seconds:5.1f} s"
        )
        if seconds_to_99 is None and val_acc >= 0.99:
            seconds_to_99 = seconds
            log(f"held-out accuracy reached 99% after {seconds:.1f} s")
        if interrupted:
            log(f"interrupted after step {step}; saving what was trained")
            break
    if first_attention is None:  # no step was taken
        first_attention = capture_attention(model, probe_tokens.to(device))
    return {
        "history": history,
        "grad_rows": grad_rows,
        "stages": stages,
        "steps_per_epoch": steps_per_epoch,
        "steps": step,
        "first_attention": first_attention,
        "final_attention": capture_attention(model, probe_tokens.to(device)),
        "probe_tokens": probe_tokens.tolist(),
        "seconds": time.perf_counter() - start,
        "seconds_to_99": seconds_to_99,
        "interrupted": interrupted,
        "diverged": diverged,
    }


# %% Measuring what the embeddings learned


def residue_centroid_accuracy(embeddings: np.ndarray, num_classes: int) -> float:
    """Leave-one-out nearest-centroid accuracy of "token mod K" from embeddings.

    For each token, the centroid of every residue class is computed without
    that token; the token counts as correct when the closest centroid is its
    own residue's. Chance is 1 / num_classes.
    """
    residues = np.arange(len(embeddings)) % num_classes
    correct = 0
    for token, vector in enumerate(embeddings):
        others = np.arange(len(embeddings)) != token
        distances = np.full(num_classes, np.inf)
        for residue in range(num_classes):
            members = embeddings[others & (residues == residue)]
            if len(members):
                distances[residue] = np.linalg.norm(vector - members.mean(axis=0))
        correct += int(np.argmin(distances) == residues[token])
    return correct / len(embeddings)


# %% Plots (each takes data and returns a figure)


def plot_training_curves(
    history: list[dict], stages: list[dict], steps_per_epoch: int, num_classes: int
) -> plt.Figure:
    """Loss and accuracy per epoch, chance levels, and the curriculum stages."""
    frame = pd.DataFrame(history)
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    if frame.empty:
        fig.suptitle("Training curves: no epoch finished, nothing to draw")
        return fig
    for column, label, marker in [("train", "train", "o"), ("val", "held-out", "s")]:
        loss_ax.plot(
            frame["epoch"], frame[f"{column}_loss"], marker=marker, label=label
        )
        acc_ax.plot(
            frame["epoch"], 100 * frame[f"{column}_acc"], marker=marker, label=label
        )
    loss_ax.axhline(math.log(num_classes), color="grey", ls="--", label="chance")
    acc_ax.axhline(100 / num_classes, color="grey", ls="--", label="chance")
    loss_ax.set(title="Cross-entropy loss", xlabel="epoch", ylabel="loss")
    acc_ax.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)", ylim=(0, 101))
    if len(stages) > 1:
        # Curriculum: active tokens per sequence against (fractional) epochs.
        stage_ax = acc_ax.twinx()
        epochs = [s["step"] / steps_per_epoch for s in stages] + [frame["epoch"].max()]
        counts = [s["active"] for s in stages] + [stages[-1]["active"]]
        stage_ax.step(epochs, counts, where="post", color="tab:green", alpha=0.6)
        stage_ax.set_ylabel("curriculum: active tokens", color="tab:green")
        stage_ax.set_ylim(0, max(counts) + 1)
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(loc="center right")
    fig.suptitle("Training curves (train accuracy is on the curriculum mix)")
    fig.tight_layout()
    return fig


def plot_attention(
    first: list[np.ndarray],
    final: list[np.ndarray],
    tokens: list[int],
    layers: list[int],
    num_classes: int,
) -> plt.Figure:
    """Per-head attention of one held-out sequence, after step 1 and at the end.

    Rows: (moment, layer); columns: heads. One colour scale for all panels,
    from 0 to the largest weight shown, so uniform rows (1/T) stay visible.
    """
    heads, length, _ = first[0].shape
    panels = [("after step 1", layer, first[layer]) for layer in layers]
    panels += [("final", layer, final[layer]) for layer in layers]
    top = max(float(np.nan_to_num(maps, nan=0.0).max()) for _, _, maps in panels)
    top = top if top > 0 else 1.0
    fig, axes = plt.subplots(
        len(panels),
        heads,
        figsize=(2.9 * heads + 1.2, 2.9 * len(panels)),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    ticks = np.arange(0, length, max(1, length // 16))  # at most ~16 labels
    labels = [str(tokens[i]) for i in ticks]
    for row, (moment, layer, maps) in enumerate(panels):
        for head in range(heads):
            ax = axes[row, head]
            image = ax.imshow(maps[head], cmap="viridis", vmin=0.0, vmax=top)
            ax.set_title(f"{moment}, layer {layer}, head {head}", fontsize=9)
            ax.set(xlabel="key token", ylabel="query token")
            ax.label_outer()  # tick labels on the outer panels only
    # The axes are shared, so these ticks apply to every panel.
    axes[-1, 0].set_xticks(ticks, labels)
    axes[-1, 0].set_yticks(ticks, labels)
    for ax in axes.flat:
        ax.tick_params(labelsize=7)
        ax.tick_params(axis="x", labelrotation=90)
    label = sum(tokens) % num_classes
    fig.suptitle(
        f"Attention of one held-out sequence (sum mod {num_classes} = {label}); "
        "rows: when and which layer, columns: heads"
    )
    fig.tight_layout(rect=(0.0, 0.0, 0.9, 1.0))  # leave room for the colour bar
    fig.colorbar(
        image,
        cax=fig.add_axes((0.92, 0.2, 0.015, 0.6)),
        label=f"attention weight, scale 0 to {top:.2f} "
        f"(uniform = 1/{length} = {1 / length:.3f})",
    )
    return fig


def plot_embedding_pca(
    embeddings: np.ndarray, num_classes: int, residue_acc: float | None
) -> plt.Figure:
    """Token embeddings projected on their first two principal components."""
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    if not np.isfinite(embeddings).all():
        ax.text(0.5, 0.5, "embeddings are not finite", ha="center")
        return fig
    pca = PCA(n_components=2)
    points = pca.fit_transform(embeddings)  # (V, D) -> (V, 2)
    residues = np.arange(len(embeddings)) % num_classes
    colours = plt.get_cmap("tab10" if num_classes <= 10 else "tab20", num_classes)
    for residue in range(num_classes):
        chosen = residues == residue
        ax.scatter(
            points[chosen, 0],
            points[chosen, 1],
            color=colours(residue),
            label=str(residue),
            s=28,
            edgecolors="black",
            linewidths=0.3,
        )
    for token, (x, y) in enumerate(points):
        ax.annotate(
            str(token),
            (x, y),
            fontsize=5,
            alpha=0.7,
            xytext=(2, 2),
            textcoords="offset points",
        )
    explained = 100 * pca.explained_variance_ratio_
    ax.set(
        xlabel=f"PC1 ({explained[0]:.1f} % of variance)",
        ylabel=f"PC2 ({explained[1]:.1f} % of variance)",
    )
    ax.legend(
        title=f"token mod {num_classes}",
        fontsize=7,
        loc="best",
        ncols=2 if num_classes > 5 else 1,
    )
    score = "n/a" if residue_acc is None else f"{100 * residue_acc:.0f} %"
    ax.set_title(
        "Token embeddings (PCA)\nnearest-centroid residue accuracy in full "
        f"dimension: {score} (chance {100 / num_classes:.0f} %)"
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_gradient_norms(grad_rows: list[dict]) -> plt.Figure:
    """Distribution of per-tensor gradient norms by layer group, log scale.

    Colour marks the kind of block (attention, LayerNorm, feed-forward, ...),
    so the same kind looks the same in every layer.
    """
    frame = pd.DataFrame(grad_rows, columns=["group", "step", "norm"])
    frame = frame[frame["norm"] > 0]  # log scale: exact zeros cannot be drawn
    frame["kind"] = frame["group"].str.split().str[-1].str.rstrip("12")
    order = list(dict.fromkeys(frame["group"]))  # first-seen = depth order
    kinds = list(dict.fromkeys(frame["kind"]))
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(order) + 2), 4.8))
    if len(frame):
        sns.violinplot(
            data=frame,
            x="group",
            y="norm",
            hue="kind",
            order=order,
            hue_order=kinds,
            dodge=False,
            palette="Set2",
            inner="quartile",
            cut=0,
            density_norm="width",
            log_scale=True,
            ax=ax,
        )
        ax.legend(title="block", fontsize=8, loc="best")
    ax.set(
        xlabel="parameter group (input to output)",
        ylabel="gradient L2 norm per tensor (log)",
    )
    ax.tick_params(axis="x", labelrotation=30)
    steps = frame["step"].nunique()
    ax.set_title(
        f"Gradient norms over the first {steps} training steps "
        "(each violin: norms of that group's tensors at every step, before clipping)"
    )
    fig.tight_layout()
    return fig


# %% Command line


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a whole number, got {text!r}"
        ) from None


def real_number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


PROGRAM = "transformer_sum_mod.py"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# (flag, Config field, type, help). The default shown is the default recipe's.
OPTIONS = [
    ("--epochs", "epochs", positive_int, "training epochs"),
    ("--batch-size", "batch_size", positive_int, "sequences per step"),
    ("--lr", "lr", real_number, "peak AdamW learning rate"),
    ("--weight-decay", "weight_decay", real_number, "AdamW weight decay"),
    ("--dropout", "dropout", real_number, "dropout probability, in [0, 1)"),
    ("--d-model", "d_model", positive_int, "model width (even)"),
    ("--num-heads", "num_heads", positive_int, "attention heads (divide d-model)"),
    ("--num-layers", "num_layers", positive_int, "encoder layers"),
    ("--ffn-dim", "ffn_dim", positive_int, "feed-forward hidden width"),
    ("--seq-len", "seq_len", positive_int, "integers per sequence"),
    ("--vocab-size", "vocab_size", positive_int, "tokens are 0..vocab-size-1"),
    ("--num-classes", "num_classes", positive_int, "label = sum mod this"),
    ("--train-size", "train_size", positive_int, "training sequences per epoch"),
    ("--val-size", "val_size", positive_int, "held-out sequences"),
    ("--seed", "seed", whole_number, "training seed (the held-out set is fixed)"),
    ("--out-dir", "out_dir", str, "folder for the PNGs and metrics.json"),
    (
        "--attn-layers",
        "attn_layers",
        str,
        "layers in the attention figure: 'all' or indices like 0,1",
    ),
]


def build_parser() -> argparse.ArgumentParser:
    defaults = Config()
    article = RECIPES["article"]
    parser = OneLineParser(
        prog=PROGRAM,
        allow_abbrev=False,  # --ep is not --epochs: say what you mean
        description="Train a tiny Transformer encoder on sum mod 10 and plot "
        "its insides. Options given here override the chosen --recipe.",
        # Options left out keep their recipe value, so no argparse default.
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        help="named preset (default: default). 'article' = the original "
        "recipe: " + ", ".join(f"{k}={v}" for k, v in article.items()),
    )
    for flag, field, kind, text in OPTIONS:
        shown = f"default: {getattr(defaults, field)}"
        if field in article:
            shown += f"; article: {article[field]}"
        parser.add_argument(flag, dest=field, type=kind, help=f"{text} ({shown})")
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda", "mps"],
        help="auto takes cuda, then mps, then cpu (default: auto)",
    )
    parser.add_argument(
        "--show",
        action="store_true",
        help="also open the figures in windows (default: off, PNGs only)",
    )
    return parser


# Upper bounds catch a typo (a few zeros too many) before it fills the memory
# or runs for days. NOTE: large sizes together can still exceed the memory.
UPPER_BOUNDS = {
    "epochs": 10_000,
    "batch_size": 8192,
    "train_size": 1_000_000,
    "val_size": 1_000_000,
    "d_model": 1024,
    "num_heads": 64,
    "num_layers": 24,
    "ffn_dim": 4096,
    "vocab_size": 100_000,
    "num_classes": 20,  # the embedding figure gives each residue a colour
}
MAX_TOKENS = 20_000_000  # (train_size + val_size) * seq_len, about 0.5 GB
MAX_STEP_BYTES = 8 * 2**30  # memory estimate of one training step


def training_step_bytes(cfg: Config) -> int:
    """Rough float32 memory of one training step: each parameter with its
    gradient and two Adam moments, plus the activations kept for backward
    (about 10 vectors of width D and 2 of width F per token and layer, and
    one B*H*T*T map of attention weights per layer). An estimate to catch
    impossible sizes, not a promise."""
    d, f, t = cfg.d_model, cfg.ffn_dim, cfg.seq_len
    per_layer = 4 * d * d + 2 * d * f + 9 * d + f  # attention, FFN, norms
    parameters = cfg.vocab_size * d + cfg.num_layers * per_layer
    parameters += d * cfg.num_classes + cfg.num_classes
    tokens = cfg.batch_size * t
    activations = cfg.num_layers * (
        tokens * (10 * d + 2 * f) + cfg.batch_size * cfg.num_heads * t * t
    )
    return 4 * (4 * parameters + activations)


def check_config(cfg: Config) -> None:
    """Rules that span options or need more than a type; raise UsageError."""
    flags = {field: flag for flag, field, _, _ in OPTIONS}
    for field, limit in UPPER_BOUNDS.items():
        if getattr(cfg, field) > limit:
            raise UsageError(f"{flags[field]} must be at most {limit:_}")
    if (cfg.train_size + cfg.val_size) * cfg.seq_len > MAX_TOKENS:
        raise UsageError(
            f"(--train-size + --val-size) x --seq-len must be at most "
            f"{MAX_TOKENS:_} tokens"
        )
    step_bytes = training_step_bytes(cfg)
    if step_bytes > MAX_STEP_BYTES:
        raise UsageError(
            f"one training step would need about "
            f"{step_bytes / 2**30:.0f} GiB (limit "
            f"{MAX_STEP_BYTES // 2**30} GiB); make --batch-size, --seq-len, "
            "--d-model, --ffn-dim or --num-layers smaller"
        )
    heads_rule = (
        f"--d-model ({cfg.d_model}) must be divisible by --num-heads ({cfg.num_heads})"
    )
    rules = [
        (cfg.d_model % 2 == 0, "--d-model must be even (sine/cosine pairs)"),
        (cfg.d_model % cfg.num_heads == 0, heads_rule),
        (
            cfg.seq_len <= cfg.max_len,
            f"--seq-len must be at most {cfg.max_len} (positional table length)",
        ),
        (
            cfg.vocab_size >= 2,
            "--vocab-size must be at least 2 (the embedding plot needs 2 tokens)",
        ),
        (cfg.num_classes >= 2, "--num-classes must be at least 2"),
        (
            0 <= cfg.seed < 2**32,
            f"--seed must be in 0..{2**32 - 1} (NumPy's range), got {cfg.seed}",
        ),
        (
            0.0 <= cfg.dropout < 1.0,
            f"--dropout must be in [0, 1), got {cfg.dropout}",
        ),
        (
            math.isfinite(cfg.lr) and cfg.lr > 0,
            f"--lr must be a finite number above 0, got {cfg.lr}",
        ),
        (
            math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0,
            f"--weight-decay must be a finite number >= 0, got {cfg.weight_decay}",
        ),
        (cfg.out_dir.strip() != "", "--out-dir must not be empty"),
    ]
    for ok, message in rules:
        if not ok:
            raise UsageError(message)
    attention_layers(cfg)  # raises on a bad --attn-layers


def attention_layers(cfg: Config) -> list[int]:
    """Parse --attn-layers ('all' or '0,2') into layer indices."""
    if cfg.attn_layers.strip() == "all":
        return list(range(cfg.num_layers))
    try:
        chosen = [int(part) for part in cfg.attn_layers.split(",")]
    except ValueError:
        chosen = [-1]
    if not all(0 <= layer < cfg.num_layers for layer in chosen):
        raise UsageError(
            f"--attn-layers must be 'all' or comma-separated indices in "
            f"0..{cfg.num_layers - 1}, got {cfg.attn_layers!r}"
        )
    return sorted(set(chosen))


def parse_config(argv: list[str] | None) -> Config:
    """Command line -> Config: recipe values first, explicit options on top."""
    given = vars(build_parser().parse_args(argv))
    recipe = given.get("recipe", "default")
    cfg = replace(Config(), **{**RECIPES[recipe], **given})
    check_config(cfg)
    return cfg


# %% Output files and interruption

FIGURE_FILES = [
    "loss_curves.png",
    "attention_heads.png",
    "embedding_pca.png",
    "grad_norms.png",
]
OUTPUT_FILES = [*FIGURE_FILES, "metrics.json"]


def prepare_out_dir(path_text: str) -> Path:
    """Create the output folder and prove it is writable, or raise UsageError."""
    path = Path(path_text)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out-dir {path_text!r} is an existing file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise UsageError(
            f"--out-dir {path_text!r} cannot be created or written "
            f"({error.strerror or error})"
        ) from None
    for name in OUTPUT_FILES:
        if (path / name).is_dir():
            raise UsageError(
                f"--out-dir {path_text!r} has a folder named {name!r}, where "
                "this script writes a file; move it or choose another --out-dir"
            )
    return path


def replace_file(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename it over
    ``path``: a reader never sees a half-written file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    umask = os.umask(0)  # mkstemp makes the file private; use the usual mode
    os.umask(umask)
    try:
        os.chmod(temporary, 0o666 & ~umask)
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def finite_or_none(value):
    """JSON has no NaN or infinity: write those as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite_or_none(item) for item in value]
    return value


class StopOnInterrupt:
    """First Ctrl-C: finish the step, then save. Second Ctrl-C: quit at once
    (KeyboardInterrupt, so a half-written temporary file is still removed)."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        sys.stderr.write(
            "\nCtrl-C: finishing this step, then saving plots and metrics "
            "(press Ctrl-C again to quit at once)\n"
        )


# %% Main


def finished_epochs(count: int) -> str:
    """'the 3 finished epochs', or the untrained model when none finished."""
    if count == 0:
        return "the initial model (no epoch finished)"
    return f"the {count} finished epoch{'s' if count > 1 else ''}"


def main(argv: list[str] | None = None) -> dict:
    """Run everything; return (and write to metrics.json) the results."""
    run_start = time.perf_counter()
    try:
        cfg = parse_config(argv)
        device = pick_device(cfg.device)
        out_dir = prepare_out_dir(cfg.out_dir)
    except UsageError as error:
        sys.stderr.write(f"{PROGRAM}: error: {error}\n")
        raise SystemExit(2) from None
    if not cfg.show:
        plt.switch_backend("agg")  # draw to files only; never needs a display
    earlier = [name for name in OUTPUT_FILES if (out_dir / name).exists()]
    if earlier:
        print(f"note: replacing {len(earlier)} files of an earlier run in {out_dir}/")

    seed_everything(cfg.seed)
    model = build_model(cfg).to(device)
    parameters = sum(p.numel() for p in model.parameters())
    example = SumModDataset(1, cfg.seq_len, cfg.vocab_size, cfg.num_classes, 0)
    tokens, label = example[0]
    print(
        f"recipe {cfg.recipe} | device {device} | {parameters:,} parameters | "
        f"seed {cfg.seed}"
    )
    print(
        f"example: {tokens.tolist()} -> sum {int(tokens.sum())} -> label {int(label)}"
    )
    print(
        f"chance level: loss ln({cfg.num_classes}) = "
        f"{math.log(cfg.num_classes):.3f}, accuracy {100 / cfg.num_classes:.0f}%"
    )

    stopper = StopOnInterrupt()
    previous_handler = signal.signal(signal.SIGINT, stopper)
    try:
        result = train(model, cfg, device, should_stop=lambda: stopper.requested)
        if result["diverged"]:
            failure = result["diverged"]
            sys.stderr.write(
                f"{PROGRAM}: error: the {failure['what']} became non-finite at "
                f"step {failure['step']} (epoch {failure['epoch']}, lr "
                f"{failure['lr']:.2e}); try a lower --lr. The plots and metrics "
                f"show {finished_epochs(len(result['history']))}.\n"
            )
        embeddings = model.embedding.weight.detach().cpu().numpy()  # (V, D)
        residue_acc = None
        if np.isfinite(embeddings).all():
            residue_acc = residue_centroid_accuracy(embeddings, cfg.num_classes)
            print(
                f"embedding residue accuracy (nearest centroid, leave-one-out): "
                f"{100 * residue_acc:.1f}% (chance {100 / cfg.num_classes:.0f}%)"
            )
        figures = [
            plot_training_curves(
                result["history"],
                result["stages"],
                result["steps_per_epoch"],
                cfg.num_classes,
            ),
            plot_attention(
                result["first_attention"],
                result["final_attention"],
                result["probe_tokens"],
                attention_layers(cfg),
                cfg.num_classes,
            ),
            plot_embedding_pca(embeddings, cfg.num_classes, residue_acc),
            plot_gradient_norms(result["grad_rows"]),
        ]
        files = []
        for name, figure in zip(FIGURE_FILES, figures, strict=True):
            replace_file(
                out_dir / name,
                lambda path, f=figure: f.savefig(path, format="png", dpi=110),
            )
            files.append(str(out_dir / name))
        last = result["history"][-1] if result["history"] else {}
        results = {
            "config": asdict(cfg),
            "history": result["history"],
            "final": {
                "val_loss": last.get("val_loss"),
                "val_acc": last.get("val_acc"),
                "seconds": result["seconds"],
                "seconds_to_99": result["seconds_to_99"],
                "embedding_residue_acc": residue_acc,
                "steps": result["steps"],
                "curriculum_stages": result["stages"],
                "interrupted": result["interrupted"],
                "diverged": result["diverged"],
                "total_seconds": time.perf_counter() - run_start,
            },
            "files": files + [str(out_dir / "metrics.json")],
        }
        results = finite_or_none(results)
        replace_file(
            out_dir / "metrics.json",
            lambda path: Path(path).write_text(json.dumps(results, indent=2)),
        )
        if last:
            print(
                f"final held-out accuracy {100 * last['val_acc']:.2f}% "
                f"(loss {last['val_loss']:.4f}) after {result['seconds']:.1f} s"
            )
        print("wrote " + ", ".join(results["files"]))
        if cfg.show:
            show_figures()
        for figure in figures:
            plt.close(figure)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    return results


def show_figures() -> None:
    """Open the figures in windows if this machine has an interactive backend."""
    backend = matplotlib.get_backend().lower()
    if backend in {"agg", "pdf", "ps", "svg", "cairo", "template"}:
        print(
            f"--show: no display available (matplotlib backend {backend}); "
            "the PNG files are saved"
        )
        return
    plt.show()


def exit_status(results: dict) -> int:
    """0 when training finished, 130 when interrupted, 1 when it diverged."""
    if results["final"]["interrupted"]:
        return 130
    if results["final"]["diverged"]:
        return 1
    return 0


if __name__ == "__main__":
    try:
        status = exit_status(main())
    except KeyboardInterrupt:
        sys.stderr.write(
            f"\n{PROGRAM}: stopped by Ctrl-C; files not yet saved were not written\n"
        )
        status = 130
    # Everything is saved by now and the process is ending: ignore Ctrl-C
    # during Python's shut-down, which would otherwise kill it by signal
    # instead of ending with this status.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(status)
