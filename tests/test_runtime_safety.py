"""A Runtime under misuse and hostile files: several threads at once, expert files that change
or turn into FIFOs while it runs, a dropped Runtime, Ctrl-C during a stuck read. Each either
gives exactly the single-threaded tokens or one clear error; nothing hangs or leaks threads."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from spac.runtime import Runtime

FAMILY = "qwen3_moe"
PROMPTS = ([5, 17, 42, 99, 3, 250], [7, 8, 9, 10, 11])
NEW_TOKENS = 16
PAGED = 0.3  # host budget: a share of the expert bytes, so experts are read from the package
MODES = {"resident": None, "paged": PAGED}


@pytest.fixture(scope="module")
def package(exported) -> Path:
    return exported(FAMILY).output


@pytest.mark.parametrize("mode", MODES)
def test_two_threads_on_one_runtime_get_their_single_threaded_tokens(package, mode):
    with Runtime(package, host_budget=MODES[mode]) as runtime:
        alone = [runtime.generate(prompt, max_new_tokens=NEW_TOKENS).token_ids for prompt in PROMPTS]
        for trial in range(3):
            results, errors = [None, None], []

            def generate(i):
                try:
                    results[i] = runtime.generate(PROMPTS[i], max_new_tokens=NEW_TOKENS)
                except Exception as error:  # noqa: BLE001 - reported by the assertion below
                    errors.append(error)

            threads = [threading.Thread(target=generate, args=(i,)) for i in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
            assert not errors, f"trial {trial}: {errors}"
            assert [result.token_ids for result in results] == alone, f"trial {trial}"
            assert results[0] is not results[1]
