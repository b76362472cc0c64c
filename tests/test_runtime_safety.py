"""A Runtime under misuse and hostile files: several threads at once, expert files that change
or turn into FIFOs while it runs, a dropped Runtime, Ctrl-C during a stuck read. Each either
gives exactly the single-threaded tokens or one clear error; nothing hangs or leaks threads."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_cli_run import default_sigint

from spac.runtime import ExpertFileError, PackageFileError, Runtime

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


# ---------------------------------------------------------------------------------------------
# Expert files that change while the runtime runs (paged mode reads them again and again)

EVERY_READ = 0.0  # host budget 0: every routed expert is read from its file on every use


@pytest.fixture
def package_copy(package, tmp_path) -> Path:
    """A private copy of the package, free to tamper with."""
    return Path(shutil.copytree(package, tmp_path / "package"))


def expert_data_files(package: Path) -> list[Path]:
    return sorted((package / "target" / "experts").rglob("*.data"))


def corrupt(data: bytes) -> bytes:
    """The bytes with a float's exponent bit flipped in the middle: a real change of a weight."""
    data = bytearray(data)
    data[len(data) // 2 + 3] ^= 0x40
    return bytes(data)


def rewrite_in_place(path: Path, data: bytes, keep_mtime: bool) -> None:
    """Write over the file's bytes (same inode), with its mtime put back when asked."""
    before = path.stat()
    with open(path, "r+b") as handle:
        handle.write(data)
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def replace(path: Path, data: bytes) -> None:
    """A new file (new inode) in the old one's place, as an editor or a copy would leave it."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_bytes(data)
    os.replace(fresh, path)


def assert_one_line_refusal(error: BaseException, *fragments: str) -> None:
    message = str(error)
    assert isinstance(error, PackageFileError), f"{type(error).__name__}: {message}"
    assert "\n" not in message and all(fragment in message for fragment in fragments), message


@pytest.mark.parametrize("direct_io", [False, True], ids=["pread", "o-direct"])
@pytest.mark.parametrize("keep_mtime", [True, False], ids=["mtime-kept", "mtime-changed"])
def test_expert_file_changed_after_its_first_read_is_refused(package_copy, keep_mtime, direct_io):
    with Runtime(package_copy, host_budget=EVERY_READ, direct_io=direct_io) as runtime:
        runtime.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS)
        assert not direct_io or runtime.experts.files.reader.direct  # the O_DIRECT buffers were checked
        for path in expert_data_files(package_copy):
            rewrite_in_place(path, corrupt(path.read_bytes()), keep_mtime)
        with pytest.raises(Exception) as raised:
            runtime.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS)
    # Same inode, size and mtime: the crc32 of the verified bytes catches it; a changed mtime
    # makes the runtime hash the file again.
    assert_one_line_refusal(raised.value, "/experts/", "changed after it was verified" if keep_mtime else "sha256")


def test_expert_file_replaced_by_the_same_bytes_is_still_used(package_copy):
    with Runtime(package_copy, host_budget=EVERY_READ) as runtime:
        first = runtime.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS).token_ids
        for path in expert_data_files(package_copy):
            replace(path, path.read_bytes())
        assert runtime.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS).token_ids == first


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["fifo", "symlink", "missing"])
def test_expert_file_that_is_no_longer_a_regular_file_is_refused_without_hanging(package_copy, tmp_path, kind):
    outside = tmp_path / "outside.data"
    with Runtime(package_copy, host_budget=EVERY_READ) as runtime:
        for path in expert_data_files(package_copy):  # after the load checked them
            shutil.copyfile(path, outside)
            path.unlink()
            if kind == "fifo":
                os.mkfifo(path)
            elif kind == "symlink":
                path.symlink_to(outside)
        with pytest.raises(Exception) as raised:
            runtime.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS)
    expected = {"fifo": "no longer a regular file", "symlink": "symbolic link", "missing": "No such file"}[kind]
    assert_one_line_refusal(raised.value, "/experts/", expected)


def test_a_prefetch_that_meets_a_bad_file_is_one_clear_error(package_copy):
    with Runtime(package_copy, policy="spac", host_budget=PAGED) as runtime:
        runtime.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS)
        for path in expert_data_files(package_copy):
            replace(path, corrupt(path.read_bytes()))
        with pytest.raises(Exception) as raised:
            runtime.generate(PROMPTS[1], max_new_tokens=NEW_TOKENS)
    assert_one_line_refusal(raised.value, "/experts/", "sha256")


def test_a_hung_read_becomes_a_clear_error(package, monkeypatch):
    from spac.ops import read_pool
    from spac.ops.storage import ExpertFiles

    monkeypatch.setattr(read_pool, "READ_TIMEOUT_S", 0.5)
    hung = threading.Event()
    with Runtime(package, host_budget=EVERY_READ) as runtime:
        monkeypatch.setattr(ExpertFiles, "read", lambda files, layer, expert, into=None: hung.wait(60))  # a hung disk
        try:
            with pytest.raises(ExpertFileError, match=r"took more than 0\.5 s") as raised:
                runtime.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS)
            assert "/experts/" in str(raised.value)
        finally:
            hung.set()


# ---------------------------------------------------------------------------------------------
# Threads end with the Runtime; Ctrl-C ends spac-run even during a hung read




def wait_for(condition, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("ending", ["close", "drop"])
def test_reader_and_prefetch_threads_end_with_the_runtime(package, ending):
    before = set(threading.enumerate())
    runtime = Runtime(package, policy="spac", host_budget=PAGED)
    runtime.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS)
    started = set(threading.enumerate()) - before
    assert {thread.name for thread in started} >= {"spac-read-0", "spac-prefetch"}, started
    if ending == "close":
        runtime.close()
    else:  # dropped without close()
        del runtime
        gc.collect()
    assert wait_for(lambda: not any(thread.is_alive() for thread in started)), [t for t in started if t.is_alive()]


STUCK_READ = """
import sys, threading
from spac.ops.storage import ExpertFiles

def stuck(files, layer, expert, into=None):  # a read that never returns, as on a dead network file system
    print("reading", file=sys.stderr, flush=True)
    threading.Event().wait()

ExpertFiles.read = stuck
from spac.runtime import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_ctrl_c_ends_spac_run_during_a_hung_read(package):
    process = subprocess.Popen([sys.executable, "-c", STUCK_READ, "--package", str(package), "--host-budget", "0",
                                "--prompt", "hello", "--max-new-tokens", "4"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        assert "reading" in process.stderr.readline()  # the runtime has loaded and a read hangs
        process.send_signal(signal.SIGINT)
        process.wait(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
            pytest.fail("spac-run did not end within 15 s of Ctrl-C")
    assert process.returncode == 130, process.stderr.read()


def test_spac_run_refuses_a_bad_expert_file_in_one_line(package_copy):
    for path in expert_data_files(package_copy):  # the size is right: the load passes, the first read not
        path.write_bytes(corrupt(path.read_bytes()))
    done = subprocess.run([sys.executable, "-m", "spac.runtime.cli", "--package", str(package_copy),
                           "--host-budget", "0", "--prompt", "hello", "--max-new-tokens", "4"],
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("spac-run: error: ") and "/experts/" in lines[0] and "sha256" in lines[0], lines


def test_spac_serve_answers_a_bad_expert_file_with_one_error_and_keeps_serving(package_copy, caplog):
    import httpx

    from spac.runtime.server import BackgroundServer, Server

    originals = {path: path.read_bytes() for path in expert_data_files(package_copy)}
    with Runtime(package_copy, host_budget=EVERY_READ) as runtime:
        live = BackgroundServer(Server(runtime, "tiny"))
        try:
            for path, data in originals.items():
                path.write_bytes(corrupt(data))
            request = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
            reply = httpx.post(f"{live.url}/v1/completions", json=request, timeout=120)
            assert reply.status_code == 500, reply.text
            message = reply.json()["error"]["message"]
            assert "/experts/" in message and "sha256" in message and "\n" not in message, message
            failures = [record for record in caplog.records if record.name == "spac.server"]
            assert failures and all(record.exc_info is None for record in failures), "a traceback was logged"
            for path, data in originals.items():
                path.write_bytes(data)
            assert httpx.post(f"{live.url}/v1/completions", json=request, timeout=120).status_code == 200
        finally:
            live.stop()
