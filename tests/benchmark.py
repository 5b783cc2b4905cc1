"""Benchmark: the default recipe and the article's, seeds 0-2, one at a time.

    python tests/benchmark.py            # about 5 minutes on 2 CPU cores

Each run is a separate `python transformer_sum_mod.py ...` process, timed
from start to exit (imports, training, evaluation, plots). Prints a Markdown
table per run and the medians per recipe; outputs go to bench_outputs/.
Not a unit test: it measures this machine.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "transformer_sum_mod.py"


def run_once(recipe: str, seed: int, out_root: Path) -> dict:
    out_dir = out_root / f"{recipe}-seed{seed}"
    command = [sys.executable, str(SCRIPT), "--recipe", recipe,
               "--seed", str(seed), "--out-dir", str(out_dir)]  # fmt: skip
    start = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if finished.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{finished.stderr}")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    final = metrics["final"]
    return {
        "recipe": recipe,
        "seed": seed,
        "val_acc": final["val_acc"],
        "val_loss": final["val_loss"],
        "first_train_loss": metrics["history"][0]["train_loss"],
        "last_train_loss": metrics["history"][-1]["train_loss"],
        "first_val_loss": metrics["history"][0]["val_loss"],
        "seconds_to_99": final["seconds_to_99"],
        "embedding_residue_acc": final["embedding_residue_acc"],
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=["default", "article"])
    parser.add_argument("--out-root", default=str(ROOT / "bench_outputs"))
    args = parser.parse_args()
    rows = []
    print("| recipe | seed | held-out acc | held-out loss | train loss first -> "
          "last | s to 99 % | residue acc | wall s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for recipe in args.recipes:
        for seed in args.seeds:
            row = run_once(recipe, seed, Path(args.out_root))
            rows.append(row)
            to_99 = row["seconds_to_99"]
            print(
                f"| {recipe} | {seed} | {100 * row['val_acc']:.2f} % "
                f"| {row['val_loss']:.3f} "
                f"| {row['first_train_loss']:.3f} -> {row['last_train_loss']:.3f} "
                f"| {'never' if to_99 is None else f'{to_99:.1f}'} "
                f"| {100 * row['embedding_residue_acc']:.0f} % "
                f"| {row['wall']:.1f} |",
                flush=True,
            )
    print()
    for recipe in args.recipes:
        mine = [r for r in rows if r["recipe"] == recipe]
        accuracy = statistics.median(r["val_acc"] for r in mine)
        wall = statistics.median(r["wall"] for r in mine)
        print(f"median {recipe}: held-out accuracy {100 * accuracy:.2f} %, "
              f"wall {wall:.1f} s over seeds {args.seeds}")  # fmt: skip


if __name__ == "__main__":
    main()
