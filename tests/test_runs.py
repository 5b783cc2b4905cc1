"""Whole runs: outputs, bad input, warnings, Ctrl-C, divergence, determinism."""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SCRIPT, TINY

import transformer_sum_mod as tsm

FIGURES = ["loss_curves.png", "attention_heads.png", "embedding_pca.png",
           "grad_norms.png"]  # fmt: skip


def read_metrics(out_dir: Path) -> dict:
    """Load metrics.json, refusing NaN or infinity (not valid JSON)."""

    def refuse(constant):
        raise ValueError(f"non-finite number in metrics.json: {constant}")

    return json.loads((out_dir / "metrics.json").read_text(), parse_constant=refuse)


def run_script(args, **kwargs):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


def assert_complete_outputs(out_dir: Path, results: dict, epochs: int):
    for name in FIGURES:
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = read_metrics(out_dir)
    assert on_disk == json.loads(json.dumps(results))
    assert len(on_disk["history"]) == epochs
    keys = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"}
    assert all(keys <= set(row) for row in on_disk["history"])
    assert sorted(Path(f).name for f in on_disk["files"]) == sorted(
        FIGURES + ["metrics.json"]
    )
    umask = os.umask(0)
    os.umask(umask)
    for name in [*FIGURES, "metrics.json"]:  # usual mode, not mkstemp's 0600
        assert (out_dir / name).stat().st_mode & 0o777 == 0o666 & ~umask
    # Nothing else is left behind (no temporary files).
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        FIGURES + ["metrics.json"]
    )


def test_smoke_run_writes_four_pngs_and_finite_metrics(tiny_args, tmp_path):
    results = tsm.main(tiny_args)
    out_dir = tmp_path / "out"
    assert_complete_outputs(out_dir, results, epochs=1)
    final = results["final"]
    for key in ("val_loss", "val_acc", "seconds", "embedding_residue_acc"):
        assert math.isfinite(final[key])
    assert final["interrupted"] is False and final["diverged"] is None
    assert tsm.exit_status(results) == 0
    assert results["config"]["d_model"] == 16


@pytest.mark.parametrize(
    "extra",
    [
        ["--num-heads", "1", "--num-layers", "3"],
        ["--num-layers", "1", "--seq-len", "3", "--vocab-size", "2"],
        ["--batch-size", "1", "--train-size", "3", "--seq-len", "40"],
        ["--recipe", "article", "--epochs", "2", "--train-size", "64"],
        ["--attn-layers", "0", "--num-classes", "3", "--seq-len", "1"],
    ],
)
def test_unusual_but_valid_choices_just_work(tiny_args, tmp_path, extra):
    results = tsm.main(tiny_args + extra)
    epochs = int(extra[extra.index("--epochs") + 1]) if "--epochs" in extra else 1
    assert_complete_outputs(tmp_path / "out", results, epochs=epochs)


def test_recipe_article_keeps_the_original_settings_and_options_override():
    cfg = tsm.parse_config(["--recipe", "article"])
    assert (cfg.epochs, cfg.train_size, cfg.dropout, cfg.lr) == (8, 4096, 0.1, 1e-3)
    assert not cfg.curriculum and not cfg.fresh_data and cfg.seed == 42
    assert (cfg.batch_size, cfg.weight_decay, cfg.d_model) == (64, 1e-2, 64)
    cfg = tsm.parse_config(["--recipe", "article", "--epochs", "3", "--seed", "1"])
    assert (cfg.epochs, cfg.seed, cfg.train_size) == (3, 1, 4096)


def test_help_shows_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as raised:
        tsm.main(["--help"])
    assert raised.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, field, _, _ in tsm.OPTIONS:
        assert flag in text
        assert f"default: {getattr(tsm.Config(), field)}" in text
    for flag in ("--recipe", "--device", "--show"):
        assert flag in text


# Bad input: one line, exit code 2, no traceback, nothing written.


def invalid_command_lines(tmp_path: Path) -> list[list[str]]:
    """Generated from the option table, plus rules that span options."""
    bad_by_type = {
        tsm.positive_int: ["0", "-3", "1.5", "abc", "", "nan", "1e3"],
        tsm.real_number: ["abc", "", "1,5"],
        tsm.whole_number: ["abc", "1.5", "", "-1", "4294967296"],
    }
    cases = []
    for flag, field, kind, _ in tsm.OPTIONS:
        for value in bad_by_type.get(kind, []):
            cases.append([flag, value])
        cases.append([flag])  # value missing
        if field in tsm.UPPER_BOUNDS:
            cases.append([flag, str(tsm.UPPER_BOUNDS[field] + 1)])
            cases.append([flag, "1" + "0" * 30])
    for value in ["0", "-1e-3", "nan", "inf", "-inf"]:
        cases.append([f"--lr={value}"])
    for value in ["-0.1", "nan", "inf"]:
        cases.append([f"--weight-decay={value}"])
    for value in ["1", "1.5", "-0.1", "nan"]:
        cases.append([f"--dropout={value}"])
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("keep me")
    cases += [
        ["--d-model", "30", "--num-heads", "4"],
        ["--d-model", "7", "--num-heads", "1"],
        ["--seq-len", "513"],
        ["--vocab-size", "1"],
        ["--num-classes", "1"],
        ["--attn-layers", "2"],
        ["--attn-layers", "x"],
        ["--attn-layers", "-1"],
        ["--attn-layers", ""],
        ["--recipe", "nonsense"],
        ["--device", "tpu"],
        ["--no-such-option"],
        ["positional"],
        ["--out-dir", str(a_file)],
        ["--out-dir", str(a_file / "below")],
        ["--out-dir", ""],
        ["--out-dir", str(tmp_path / "has_folder")],
        ["--train-size", "1000000", "--seq-len", "40"],
        [
            "--d-model",
            "1024",
            "--num-heads",
            "1",
            "--num-layers",
            "24",
            "--ffn-dim",
            "4096",
            "--batch-size",
            "8192",
            "--seq-len",
            "512",
            "--train-size",
            "8192",
            "--val-size",
            "8192",
        ],  # fmt: skip
        ["--ep", "1"],  # no abbreviations
    ]
    (tmp_path / "has_folder" / "metrics.json").mkdir(parents=True)
    return cases


def test_every_invalid_command_line_exits_2_with_one_line(tmp_path, capsys):
    cases = invalid_command_lines(tmp_path)
    assert len(cases) > 80
    out_dir = tmp_path / "never"
    for argv in cases:
        with pytest.raises(SystemExit) as raised:
            tsm.main([*TINY, "--out-dir", str(out_dir), *argv])
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert raised.value.code == 2, argv
        assert len(lines) == 1 and "error" in lines[0], (argv, captured.err)
        assert "Traceback" not in captured.err and captured.out == "", argv
        assert not out_dir.exists(), argv
    assert (tmp_path / "a_file.txt").read_text() == "keep me"
    assert [p.name for p in (tmp_path / "has_folder").iterdir()] == ["metrics.json"]


def test_bad_option_from_the_shell_names_parameter_and_rule(tmp_path):
    result = run_script(["--num-heads", "3", "--out-dir", str(tmp_path / "o")])
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--d-model (64) must be divisible by --num-heads (3)" in result.stderr
    assert not (tmp_path / "o").exists()


def test_bad_options_name_the_parameter_and_the_rule(tmp_path, capsys):
    cases = {
        ("--lr", "nan"): "--lr must be a finite number above 0",
        ("--epochs", "0"): "argument --epochs: must be a positive integer",
        ("--dropout", "1"): "--dropout must be in [0, 1)",
        ("--seq-len", "600"): "--seq-len must be at most 512",
        ("--d-model", "9", "--num-heads", "1"): "--d-model must be even",
    }
    for argv, rule in cases.items():
        with pytest.raises(SystemExit):
            tsm.main([*argv, "--out-dir", str(tmp_path / "o")])
        assert rule in capsys.readouterr().err, argv


def test_absent_device_is_a_usage_error(tiny_args, capsys, monkeypatch):
    monkeypatch.setattr(tsm.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as raised:
        tsm.main([*tiny_args, "--device", "cuda"])
    assert raised.value.code == 2
    assert "--device cuda" in capsys.readouterr().err


# Warnings, interruption, divergence, determinism


def test_a_run_under_warnings_as_errors_prints_no_warning(tmp_path):
    out_dir = tmp_path / "w"
    # The task's real sizes; batches of 8 make 16 steps, so a curriculum
    # check (every 13 steps) runs too.
    args = [*TINY, "--seq-len", "16", "--vocab-size", "100", "--batch-size", "8",
            "--out-dir", str(out_dir)]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-W", "error", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "final held-out accuracy" in result.stdout
    assert len(read_metrics(out_dir)["history"]) == 1


def test_ctrl_c_saves_what_was_trained_and_exits_130(tmp_path):
    out_dir = tmp_path / "interrupted"
    args = [*TINY, "--epochs", "50", "--train-size", "1024", "--out-dir", str(out_dir)]
    process = subprocess.Popen(
        [sys.executable, "-u", str(SCRIPT), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stdout:  # wait until training is under way
        if line.startswith("epoch"):
            break
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    metrics = read_metrics(out_dir)
    assert metrics["final"]["interrupted"] is True
    assert 1 <= len(metrics["history"]) < 50
    for name in FIGURES:
        assert (out_dir / name).stat().st_size > 0
    assert str(out_dir) in stdout


def test_second_ctrl_c_raises_and_a_half_written_file_is_removed(tmp_path):
    stopper = tsm.StopOnInterrupt()
    stopper(signal.SIGINT, None)  # first: only asks training to stop
    assert stopper.requested
    target = tmp_path / "metrics.json"
    target.write_text("earlier run")

    def interrupted_write(path):
        Path(path).write_text("half")
        stopper(signal.SIGINT, None)  # second Ctrl-C while writing

    with pytest.raises(KeyboardInterrupt):
        tsm.replace_file(target, interrupted_write)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    assert target.read_text() == "earlier run"


def test_divergence_stops_with_one_line_keeps_finite_results(
    tiny_args, tmp_path, capsys
):
    results = tsm.main([*tiny_args, "--lr", "1e30", "--epochs", "3"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "non-finite" in lines[0] and "--lr" in lines[0]
    assert "epoch" in lines[0] and "Traceback" not in lines[0]
    assert tsm.exit_status(results) == 1
    metrics = read_metrics(tmp_path / "out")  # finite, so it loads
    assert metrics["final"]["diverged"]["step"] >= 1
    assert len(metrics["history"]) < 3
    for name in FIGURES:
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_same_seed_same_history(tmp_path):
    histories = []
    for name in ("a", "b"):
        argv = [*TINY, "--epochs", "2", "--seed", "5", "--out-dir",
                str(tmp_path / name)]  # fmt: skip
        histories.append(tsm.main(argv)["history"])
    without_time = [
        [{k: v for k, v in row.items() if k != "seconds"} for row in history]
        for history in histories
    ]
    assert without_time[0] == without_time[1]
    # Another seed trains differently (checked without the plots, for speed).
    cfg = tsm.parse_config([*TINY, "--epochs", "2", "--seed", "6"])
    tsm.seed_everything(cfg.seed)
    other = tsm.train(tsm.build_model(cfg), cfg, tsm.torch.device("cpu"),
                      log=lambda line: None)["history"]  # fmt: skip
    assert other[-1]["train_loss"] != histories[0][-1]["train_loss"]


def test_rerun_replaces_only_its_own_files_and_says_so(tiny_args, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("mine")
    for name in FIGURES + ["metrics.json"]:  # as if from an earlier run
        (out_dir / name).write_text("old")
    results = tsm.main(tiny_args)
    assert "replacing 5 files" in capsys.readouterr().out
    assert (out_dir / "notes.txt").read_text() == "mine"
    (out_dir / "notes.txt").unlink()
    assert_complete_outputs(out_dir, results, epochs=1)


def test_importing_trains_nothing(capsys):
    # Load the file as a second, separate module: its top level must only
    # define things, never train or print.
    spec = importlib.util.spec_from_file_location("tutorial_copy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["tutorial_copy"] = module  # dataclasses look the module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["tutorial_copy"]
    assert capsys.readouterr() == ("", "")
    assert callable(module.main)


def test_show_without_a_display_says_so_instead_of_hanging(tiny_args, capsys):
    tsm.plt.switch_backend("agg")  # what matplotlib falls back to headless
    results = tsm.main([*tiny_args, "--show"])
    assert "no display available" in capsys.readouterr().out
    assert tsm.exit_status(results) == 0
