"""Tests for the spac-run command line, run as a subprocess like a user runs it."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spac.runtime import Runtime

FAMILY = "qwen3_moe"
PROMPT = "def fibonacci(n):\n    "
STATS_KEYS = ("tokens_per_second", "prefill_seconds", "decode_seconds", "acceptance_rate",
              "mean_accepted_per_round", "expert_calls", "expert_hit_rate", "bytes_paged")


def spac_run_command() -> list[str]:
    script = Path(sys.executable).parent / "spac-run"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "spac.runtime.cli"]


def spac_run(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([*spac_run_command(), *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def package(exported):
    return exported(FAMILY).output


@pytest.fixture(scope="module")
def python_result(package):
    """result(max_new_tokens) -> the Python API's greedy result for PROMPT."""
    results = {}
    with Runtime(package) as runtime:
        for count in (12, 240):
            results[count] = runtime.generate(PROMPT, max_new_tokens=count, speculative=count < 100)
    return results


def test_help_mentions_options():
    done = spac_run("--help", timeout=60)
    assert done.returncode == 0
    for option in ("--draft-len", "--json", "--package", "--profile", "--no-speculative", "--strict"):
        assert option in done.stdout


def test_json_output(package, python_result):
    done = spac_run("--package", package, "--profile", "cpu-only", "--prompt", PROMPT,
                    "--max-new-tokens", 12, "--json")
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)  # exactly one JSON object, nothing else on stdout
    assert payload["text"] == python_result[12].text
    assert payload["token_ids"] == python_result[12].token_ids
    for key in STATS_KEYS:
        assert key in payload["stats"], key
    assert payload["stats"]["expert_calls"].get("cpu", 0) > 0
    assert payload["stats"]["new_tokens"] == 12
    assert payload["interrupted"] is False


def test_text_output_and_stats_line(package, python_result):
    done = spac_run("--package", package, "--prompt", PROMPT, "--max-new-tokens", 12, "--draft-len", 2)
    assert done.returncode == 0, done.stderr
    assert done.stdout == python_result[12].text + "\n"
    stats = [line for line in done.stderr.splitlines() if "tok/s" in line]
    assert len(stats) == 1 and "acceptance" in stats[0] and "γ=2" in stats[0]


def test_no_speculative(package, python_result):
    done = spac_run("--package", package, "--prompt", PROMPT, "--max-new-tokens", 12, "--no-speculative", "--json")
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert payload["token_ids"] == python_result[12].token_ids
    assert payload["stats"]["rounds"] == 0


def test_errors_exit_2(tmp_path, package):
    done = spac_run("--package", tmp_path / "missing", "--prompt", PROMPT, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("spac-run: error:") and "missing" in done.stderr
    assert "Traceback" not in done.stderr

    done = spac_run("--package", package, "--profile", "no-such-device", "--prompt", PROMPT, timeout=60)
    assert done.returncode == 2 and "spac-run: error:" in done.stderr and "cpu-only" in done.stderr

    done = spac_run("--package", package, "--prompt", PROMPT, "--max-new-tokens", 0)
    assert done.returncode == 2 and "spac-run: error:" in done.stderr and "--max-new-tokens" in done.stderr
    assert "Traceback" not in done.stderr


def test_strict_cuda_without_cuda(package):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA is available here")
    done = spac_run("--package", package, "--prompt", PROMPT, "--providers", "cuda", "--strict", timeout=60)
    assert done.returncode == 2 and "spac-run: error:" in done.stderr and "CUDA" in done.stderr
    done = spac_run("--package", package, "--prompt", PROMPT, "--providers", "cuda", "--max-new-tokens", 2)
    assert done.returncode == 0 and "CUDA" in done.stderr and "CPU" in done.stderr


def default_sigint() -> None:
    """A child's SIGINT as a terminal's: a shell without job control starts background commands
    with it ignored, which Python then keeps, and Ctrl-C would do nothing (Popen's preexec_fn)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_prints_partial_text_and_exits_130(package, python_result):
    full = python_result[240]
    assert len(full.token_ids) >= 150  # long enough that the interrupt lands mid-generation
    process = subprocess.Popen([*spac_run_command(), "--package", str(package), "--prompt", PROMPT,
                                "--max-new-tokens", "240"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
    try:
        # Wait for the first streamed bytes: generation is under way, the handler is Python's.
        ready, _, _ = select.select([process.stdout], [], [], 120)
        assert ready, "spac-run printed nothing within 120 s"
        first = os.read(process.stdout.fileno(), 1 << 16)
        assert first
        time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        rest, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    out, err = (first + rest).decode(), err.decode()
    assert process.returncode == 130, err
    assert "interrupted" in err and "tok/s" in err
    assert "Traceback" not in err
    printed = out.removesuffix("\n")
    assert printed and full.text.startswith(printed) and len(printed) < len(full.text)


def test_ctrl_c_while_printing_in_process(package, python_result, monkeypatch, capsys):
    """The interrupt can land in the CLI's own code (printing a piece), outside the generator: the
    result still counts as interrupted, with its stats, and the exit code is 130."""
    from spac.runtime import cli

    printed = []

    def interrupted_print(*args, **kwargs):
        if kwargs.get("end") == "":
            printed.append(args[0])
            if len(printed) == 2:
                raise KeyboardInterrupt
        return print(*args, **kwargs)

    monkeypatch.setattr(cli, "print", interrupted_print, raising=False)
    code = cli.main(["--package", str(package), "--prompt", PROMPT, "--max-new-tokens", "240"])
    assert code == 130
    out, err = capsys.readouterr()
    assert out == printed[0] + "\n" and python_result[240].text.startswith(printed[0])
    assert "[spac] interrupted" in err and "tok/s" in err


# name -> (arguments, fragments of the one error line)
BAD_VALUES = {
    "temperature nan": (["--temperature", "nan"], ["--temperature", "finite number ≥ 0"]),
    "temperature inf": (["--temperature", "inf"], ["--temperature", "finite number ≥ 0"]),
    "temperature negative": (["--temperature", "-1"], ["--temperature", "finite number ≥ 0", "'-1'"]),
    "top-p nan": (["--top-p", "nan"], ["--top-p", "(0, 1]"]),
    "top-p zero": (["--top-p", "0"], ["--top-p", "(0, 1]"]),
    "seed negative": (["--seed", "-1"], ["--seed", "integer from 0"]),
    "host budget nan": (["--host-budget", "nan"], ["--host-budget", "'nan'", "8GiB", "17%"]),
    "host budget inf": (["--host-budget", "inf"], ["--host-budget", "'inf'", "8GiB", "17%"]),
    "host budget negative": (["--host-budget=-5%"], ["--host-budget", "negative"]),
    "host budget past 100%": (["--host-budget", "150%"], ["--host-budget", "100%"]),
    "draft length negative": (["--draft-len", "-1"], ["--draft-len", "integer from 0 to 64"]),
    "no new tokens": (["--max-new-tokens", "0"], ["--max-new-tokens", "integer ≥ 1"]),
    "tokens not a number": (["--max-new-tokens", "ten"], ["--max-new-tokens", "'ten'"]),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_bad_values_give_one_error_line_naming_the_flag(case, tmp_path, capsys):
    from spac.runtime import cli

    arguments, fragments = BAD_VALUES[case]
    with pytest.raises(SystemExit) as exit:  # refused while parsing: no package is opened
        cli.main(["--package", str(tmp_path / "never-read"), "--prompt", PROMPT, *arguments])
    assert exit.value.code == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("spac-run: error: argument "), errors
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_a_prompt_that_is_not_utf8_is_refused_in_one_line(tmp_path):
    for flag in ("--prompt", "--stop"):
        arguments = [PROMPT.encode(), b"--stop", b"\n\n"]
        arguments[0 if flag == "--prompt" else 2] = b"caf\xe9"
        done = subprocess.run([*spac_run_command(), "--package", str(tmp_path), "--prompt", *arguments],
                              capture_output=True, timeout=60)
        errors = done.stderr.decode(errors="replace").splitlines()
        assert done.returncode == 2, errors
        assert len(errors) == 1 and errors[0].startswith(f"spac-run: error: argument {flag}: not valid UTF-8"), errors
        assert "0xe9" in errors[0]


def test_global_thread_pool_falls_back_where_onnxruntime_lacks_it(package, python_result, monkeypatch, capsys,
                                                                   caplog):
    """ONNX Runtime 1.20 (JetPack 6's) has no set_global_thread_pool_sizes: the command's default
    --thread-pool global says so once and runs with a pool per session, with the same output."""
    import onnxruntime

    from spac.ops import sessions
    from spac.runtime import cli

    monkeypatch.delattr(onnxruntime.capi._pybind_state, "set_global_thread_pool_sizes", raising=False)
    monkeypatch.setattr(sessions, "_global_pool_threads", None)
    assert cli.main(["--package", str(package), "--prompt", PROMPT, "--max-new-tokens", "12", "--json"],
                    thread_pool="global") == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == python_result[12].token_ids
    notes = [r.getMessage() for r in caplog.records if "thread pool" in r.getMessage()]
    assert len(notes) == 1 and "a pool per session" in notes[0], notes
