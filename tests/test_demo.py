"""scripts/demo.py, the README's main command: each step prints its command, generation under the
host budget pages experts, and spac-serve's greedy answer is spac-run's token for token."""

from __future__ import annotations

import argparse

import pytest

import demo

FAMILY = "qwen3_moe"


def assert_commands_shown(output: str, programs: list[str]) -> None:
    """One '$ command' line per program, in order."""
    shown = [line for line in output.splitlines() if line.startswith("$ ")]
    assert len(shown) == len(programs) and all(program in line for program, line in zip(programs, shown)), shown


def assert_paged_and_served_alike(local: dict, served: dict) -> None:
    for stats in (local["stats"], served["stats"]):
        assert stats["bytes_paged"] > 0 and stats["expert_hit_rate"] < 1
    assert served["token_ids"] == local["token_ids"] and len(local["token_ids"]) > 0
    assert served["text"] == local["text"]


def test_generate_and_serve_steps(exported, capsys):
    """Steps 3 and 4 on the shared tiny package (random weights, so nothing is said of acceptance)."""
    package = exported(FAMILY).output
    args = argparse.Namespace(prompt="def add(a, b):", max_new_tokens=12, host_budget="25%")
    local = demo.generate(args, package)
    served = demo.serve_and_ask(args, package)
    assert_paged_and_served_alike(local, served)
    output = capsys.readouterr().out
    assert_commands_shown(output, ["spac-run", "spac-serve"])
    assert demo.stats_line(local["stats"]) in output and demo.stats_line(served["stats"]) in output


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_demo_end_to_end(tmp_path, capsys):
    """The whole demo with --quick training: the trained draft is accepted, experts are paged."""
    result = demo.main(["--quick", "--work", str(tmp_path), "--max-new-tokens", "24"])
    assert result["local"]["stats"]["acceptance_rate"] > 0
    assert_paged_and_served_alike(result["local"], result["served"])
    output = capsys.readouterr().out
    assert_commands_shown(output, ["train_small_moe.py --quick", "spac-export", "spac-run", "spac-serve"])
    assert "the same tokens" in output
