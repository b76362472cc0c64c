"""spac-export never deletes what is not a spac package, and cleans up after killed exports.

`--force` replaces only a spac package (a folder whose manifest.yaml says `producer: moe-spac`
with a schema_version), an empty folder or nothing; never the model or draft directory or a folder
holding them. Every refusal comes before any model is loaded (loading is made to fail here) and
touches nothing. A killed export's temporary folders carry its pid and are removed by the next
export once that process is gone.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest

from spac.export import cli, package
from spac.export.families import ExportError
from spac.runtime.manifest import MANIFEST, write_atomic

SPAC_EXPORT = Path(sysconfig.get_path("scripts")) / "spac-export"


@pytest.fixture
def work(tmp_path, model_pair):
    """A user's folder: copies of a model and its draft, and an unrelated file."""
    model, draft = model_pair("qwen3_moe")
    root = tmp_path / "work"
    shutil.copytree(model, root / "model")
    shutil.copytree(draft, root / "draft")
    (root / "notes.txt").write_text("the user's own file")
    return root


@pytest.fixture
def no_loading(monkeypatch):
    def load_model(*args):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr(package, "load_model", load_model)


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


def export(root: Path, output: Path, *flags) -> int:
    return cli.main([str(root / "model"), "--draft", str(root / "draft"), "-o", str(output), "--quiet", *flags])


def fake_package(path: Path) -> Path:
    path.mkdir()
    (path / MANIFEST).write_text("schema_version: 1\nproducer: moe-spac\n")
    (path / "target").mkdir()
    return path


def refuse(root: Path, output: Path, capsys, *flags) -> str:
    """Run a refused export: exit 2, one error line, nothing under root touched."""
    before = snapshot(root)
    assert export(root, output, *flags) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("spac-export: error: "), errors
    assert snapshot(root) == before
    return errors[0]


@pytest.mark.parametrize("target, words", [
    ("model", ["is the model directory"]),
    ("draft", ["is the draft directory"]),
    (".", ["contains the model directory"]),
])
def test_force_never_replaces_the_model_the_draft_or_a_folder_holding_them(target, words, work, no_loading, capsys):
    error = refuse(work, work / target, capsys, "--force")
    for word in words:
        assert word in error, error


def test_force_replaces_only_a_spac_package(work, no_loading, capsys):
    (work / "photos").mkdir()
    (work / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    error = refuse(work, work / "photos", capsys, "--force")
    assert "not a spac package" in error and "manifest.yaml" in error and "producer: moe-spac" in error

    (work / "k8s").mkdir()
    (work / "k8s" / MANIFEST).write_text("apiVersion: v1\nkind: Pod\n")
    assert "not a spac package" in refuse(work, work / "k8s", capsys, "--force")

    (work / "bomb").mkdir()
    (work / "bomb" / MANIFEST).write_text("producer: moe-spac\nschema_version: [" * 5000 + "\n")
    assert "not a spac package" in refuse(work, work / "bomb", capsys, "--force")


def test_a_file_or_a_link_at_the_output_path_is_refused(work, no_loading, capsys):
    for flags in ((), ("--force",)):
        assert "is a file" in refuse(work, work / "notes.txt", capsys, *flags)
    fake_package(work / "pkg")
    (work / "link").symlink_to(work / "pkg")
    assert "symbolic link" in refuse(work, work / "link", capsys, "--force")
    assert "no folder name" in refuse(work, Path("/"), capsys, "--force")


def test_force_accepts_a_real_package_an_empty_folder_and_a_new_folder_inside_the_model(work, exported):
    model, draft = work / "model", work / "draft"
    shutil.copytree(exported("qwen3_moe").output, work / "real")
    (work / "empty").mkdir()
    for output in (work / "real", work / "empty", fake_package(work / "pkg")):
        package.check_output(output, True, model, draft)
    package.check_output(model / "pkg", False, model, draft)  # beside the weights, not over them
    with pytest.raises(ExportError, match="already exists"):
        package.check_output(work / "real", False, model, draft)


def test_manifest_gets_the_package_files_mode(tmp_path, exported):
    root = exported("qwen3_moe").output
    assert (root / MANIFEST).stat().st_mode & 0o777 == (root / "tokenizer" / "tokenizer.json").stat().st_mode & 0o777
    previous = os.umask(0o027)
    try:
        write_atomic(tmp_path / "m.yaml", b"x: 1\n")
    finally:
        os.umask(previous)
    assert (tmp_path / "m.yaml").stat().st_mode & 0o777 == 0o640


def start_export(root: Path, output: Path) -> tuple[subprocess.Popen, Path]:
    """A real spac-export, returned once it has made its temporary folder."""
    process = subprocess.Popen([str(SPAC_EXPORT), str(root / "model"), "--draft", str(root / "draft"),
                                "-o", str(output), "--quiet", "--force"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        partial = list(output.parent.glob(f".{output.name}.partial-*"))
        if partial:
            time.sleep(0.3)
            return process, partial[0]
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"spac-export made no temporary folder: {process.stderr.read().decode()[-2000:]}")


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.mark.timeout(600)
def test_killed_exports_are_cleaned_up(work, monkeypatch, capsys, caplog):
    output = fake_package(work / "pkg")

    process, partial = start_export(work, output)  # SIGTERM: the export removes its own folder
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    assert not partial.exists()

    process, partial = start_export(work, output)  # SIGKILL: the folder stays, with the pid in its name
    process.kill()
    process.wait(timeout=60)
    assert partial.exists() and f".pkg.partial-{process.pid}-" in partial.name
    swap = work / f".pkg.old-{dead_pid()}"
    swap.mkdir()
    live = work / f".pkg.partial-{os.getpid()}-running"  # a running export's: left alone
    live.mkdir()
    other = work / f".other.partial-{dead_pid()}-x"  # another output's: not this export's business
    other.mkdir()

    def load_model(*args):
        raise ExportError("stopped by the test once the output was prepared")

    monkeypatch.setattr(package, "load_model", load_model)
    assert export(work, output, "--force") == 2
    assert "stopped by the test" in capsys.readouterr().err
    notes = [record.getMessage() for record in caplog.records if "killed exports" in record.getMessage()]
    assert len(notes) == 1 and "removed 2 folders left by killed exports of pkg" in notes[0], notes
    assert partial.name in notes[0] and swap.name in notes[0]
    assert not partial.exists() and not swap.exists() and live.exists() and other.exists()
    assert (output / MANIFEST).is_file()  # the failed export left the old package as it was
