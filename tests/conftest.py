"""Shared helpers: tiny configurations that run in a second or two."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCRIPT = ROOT / "transformer_sum_mod.py"

# A run small enough for unit tests: 4 steps of 32, 64 held-out sequences
# of 8 tokens in 0..29.
TINY = [
    "--epochs", "1",
    "--train-size", "128",
    "--batch-size", "32",
    "--val-size", "64",
    "--d-model", "16",
    "--num-heads", "2",
    "--ffn-dim", "32",
    "--seq-len", "8",
    "--vocab-size", "30",
]  # fmt: skip


@pytest.fixture
def tiny_args(tmp_path):
    """TINY plus a fresh --out-dir inside pytest's temporary folder."""
    return [*TINY, "--out-dir", str(tmp_path / "out")]
