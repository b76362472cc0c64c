"""Fuzzing a package: random byte flips, truncations, key deletions and type changes of its
manifest, tokenizer and weights, and of paged expert files while a Runtime runs. Every case is
either refused with one clear error line (a ManifestError or a ValueError subclass; a
PackageFileError while paging) or generates the reference tokens; no other exception, no hang,
and no file opened outside the package."""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import pytest
import yaml
from test_package_safety import OpensOutside, relist

from spac.runtime import ManifestError, PackageFileError, Runtime

FAMILY = "qwen3_moe"
CASES = 160
EXPERT_CASES = 80
SEED = 20240601
PROMPT = [5, 17, 42, 99, 3, 250]
NEW_TOKENS = 4
CASE_SECONDS = 20  # a generous bound on a busy machine; a case takes well under a second
TOKENIZER = "tokenizer/tokenizer.json"
EXPERT_DATA = "target/experts/L001/E0005.data"
ODD_VALUES = ["text", 7, -1, 0, 3.5, None, [], {}, True, "../x", "/etc/passwd", 10**12, [1, 2], {"a": 1}]


def flip_bytes(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def truncate(rng: random.Random, data: bytes) -> bytes:
    return data[:rng.randrange(len(data))]


def random_node(rng: random.Random, manifest: dict):
    """(container, key) of a random node, reached by a random walk from the top."""
    container, key = manifest, rng.choice(list(manifest))
    while isinstance(container[key], (dict, list)) and container[key] and rng.random() < 0.75:
        container = container[key]
        key = rng.choice(list(container)) if isinstance(container, dict) else rng.randrange(len(container))
    return container, key


def edit_manifest(rng: random.Random, data: bytes, kind: str) -> bytes:
    manifest = yaml.safe_load(data)
    container, key = random_node(rng, manifest)
    if kind == "delete":
        del container[key]
    else:
        container[key] = rng.choice(ODD_VALUES)
    return yaml.safe_dump(manifest, sort_keys=False).encode()


def mutate(rng: random.Random, package: Path) -> str:
    """Tamper with one file of the package; returns what was done."""
    # Most cases stop at the manifest; those that load the whole package (~0.2 s) are fewer.
    kind = rng.choice(["flip", "flip", "flip", "truncate", "delete", "delete", "retype", "retype", "tokenizer",
                       "tokenizer-relisted", "expert"])
    manifest = package / "manifest.yaml"
    if kind in ("flip", "truncate"):
        manifest.write_bytes((flip_bytes if kind == "flip" else truncate)(rng, manifest.read_bytes()))
    elif kind in ("delete", "retype"):
        manifest.write_bytes(edit_manifest(rng, manifest.read_bytes(), kind))
    elif kind.startswith("tokenizer"):
        path = package / TOKENIZER
        path.write_bytes(rng.choice([flip_bytes, truncate])(rng, path.read_bytes()))
        if kind == "tokenizer-relisted":  # its hash updated too: the parser itself meets the bad bytes
            relist(package, TOKENIZER)
    else:
        (package / EXPERT_DATA).write_bytes(flip_bytes(rng, (package / EXPERT_DATA).read_bytes()))
    return kind


@pytest.fixture(scope="module")
def pristine(exported, tmp_path_factory):
    """The package and the tokens it generates untampered."""
    package = Path(shutil.copytree(exported(FAMILY).output, tmp_path_factory.mktemp("fuzz") / "pristine"))
    with Runtime(package) as runtime:
        return package, runtime.generate(PROMPT, max_new_tokens=NEW_TOKENS).token_ids


def run_case(package: Path) -> list[int] | None:
    """The tokens generated, or None when the package was refused cleanly."""
    try:
        with Runtime(package) as runtime:
            return runtime.generate(PROMPT, max_new_tokens=NEW_TOKENS).token_ids
    except (ManifestError, ValueError) as error:
        assert "\n" not in str(error), f"a refusal of more than one line: {error}"
        return None


@pytest.mark.timeout(600, func_only=True)
def test_tampered_packages_are_refused_cleanly_or_generate_the_reference(pristine, tmp_path):
    source, reference = pristine
    package = tmp_path / "package"
    originals = {name: (source / name).read_bytes() for name in ("manifest.yaml", TOKENIZER, EXPERT_DATA)}
    shutil.copytree(source, package)
    rng = random.Random(SEED)
    outcomes = {"refused": 0, "generated": 0}
    with OpensOutside(package) as opens:
        for case in range(CASES):
            for name, data in originals.items():
                (package / name).write_bytes(data)
            kind = mutate(rng, package)
            started = time.monotonic()
            tokens = run_case(package)
            assert time.monotonic() - started < CASE_SECONDS, f"case {case} ({kind}) took too long"
            if tokens is not None:
                # The manifest's eos ids and context are its own statements, not covered by a hash:
                # changing them may stop generation early, never change a token.
                assert tokens == reference[:len(tokens)] and tokens, f"case {case} ({kind}): {tokens} != {reference}"
            outcomes["refused" if tokens is None else "generated"] += 1
            assert not opens.opened, f"case {case} ({kind}) opened {opens.opened}"
    assert outcomes["refused"] > CASES // 2 and outcomes["generated"] > 0, outcomes


def tamper_expert(rng: random.Random, path: Path) -> str:
    """Change one expert file behind a running Runtime's back; returns what was done."""
    kind = rng.choice(["flip", "flip-mtime-kept", "truncate", "replace"])
    data, before = path.read_bytes(), path.stat()
    changed = truncate(rng, data) if kind == "truncate" else flip_bytes(rng, data)
    if kind == "replace":  # a new inode with other bytes of the same size
        fresh = path.with_name(path.name + ".new")
        fresh.write_bytes(changed)
        os.replace(fresh, path)
        return kind
    with open(path, "r+b") as handle:
        handle.truncate(len(changed))
        handle.seek(0)
        handle.write(changed)
    if kind == "flip-mtime-kept":  # same inode, size and mtime: only the bytes tell
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    return kind


@pytest.mark.timeout(300, func_only=True)
def test_expert_files_tampered_while_paging_are_refused_cleanly_or_generate_the_reference(pristine, tmp_path):
    source, reference = pristine
    package = Path(shutil.copytree(source, tmp_path / "package"))
    experts = sorted((package / "target" / "experts").rglob("*.data"))
    originals = {path: path.read_bytes() for path in experts}
    rng = random.Random(SEED + 1)
    outcomes = {"refused": 0, "generated": 0}
    # Host budget 0: every routed expert is read from its file on every use.
    with OpensOutside(package) as opens, Runtime(package, host_budget=0.0) as runtime:
        assert runtime.generate(PROMPT, max_new_tokens=NEW_TOKENS).token_ids == reference
        for case in range(EXPERT_CASES):
            path = rng.choice(experts)
            kind = tamper_expert(rng, path)
            started = time.monotonic()
            try:
                tokens = runtime.generate(PROMPT, max_new_tokens=NEW_TOKENS).token_ids
            except PackageFileError as error:
                message = str(error)
                assert "\n" not in message and str(path) in message, f"case {case} ({kind}): {message}"
                tokens = None
            assert time.monotonic() - started < CASE_SECONDS, f"case {case} ({kind}) took too long"
            # A file the prompt does not route to is never read: the reference, untouched.
            assert tokens is None or tokens == reference, f"case {case} ({kind}): {tokens} != {reference}"
            outcomes["refused" if tokens is None else "generated"] += 1
            path.write_bytes(originals[path])  # restored (a new mtime: hashed again, and passes)
        assert not opens.opened, opens.opened
    assert outcomes["refused"] > EXPERT_CASES // 2, outcomes
