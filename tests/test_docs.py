"""The README stays true to the code and to CI."""

import re

from conftest import ROOT

import transformer_sum_mod as tsm

README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    test_command = ci_lines[-1]
    assert "pytest" in test_command and "ruff check" in test_command
    assert test_command in README


def test_readme_lists_every_option_with_its_default():
    defaults = tsm.Config()
    for flag, field, _, _ in tsm.OPTIONS:
        row = next(
            line for line in README.splitlines() if line.startswith(f"| `{flag}`")
        )
        assert f"`{getattr(defaults, field)}`" in row, row


def test_requirements_pin_every_runtime_package_exactly():
    pins = dict(
        re.match(r"([\w-]+)==([\w.+]+)$", line).groups()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    expected = {"torch", "numpy", "matplotlib", "seaborn", "scikit-learn", "pandas"}
    assert set(pins) == expected
    assert pins["torch"] == "2.13.0"
