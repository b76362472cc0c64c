"""Routing counts: recorded by a run (spac-run --save-routing, Runtime.count_routing), given to
the static policy of a later one (--routing, Runtime(static_frequencies=...)), and a stranger's
routing file refused in one line."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest

from spac.runtime import Runtime, cli
from spac.runtime.manifest import ManifestError, load_manifest
from spac.runtime.routing import FORMAT, VERSION, RoutingFileError, load_routing
from test_cli_run import spac_run

FAMILY = "qwen3_moe"
PROMPT = "def fibonacci(n):\n    "
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def package(exported):
    return exported(FAMILY).output


@pytest.fixture(scope="module")
def reference(package):
    """Greedy tokens with every expert resident, and the routing counts of that generation."""
    with Runtime(package) as runtime:
        counts = runtime.count_routing()
        result = runtime.generate(PROMPT, max_new_tokens=NEW_TOKENS, speculative=False)
        moe = runtime.manifest.target
        fed = len(runtime.tokenizer.encode_prompt(PROMPT)) + len(result.token_ids) - 1
        return result.token_ids, counts.counts.copy(), moe, fed


def routing_file(path, counts) -> str:
    layers, experts = counts.shape
    path.write_text(json.dumps({"format": FORMAT, "version": VERSION, "num_layers": layers, "num_experts": experts,
                                "counts": counts.tolist()}))
    return str(path)


def test_counts_hold_every_routed_token_of_every_moe_layer(reference):
    _, counts, moe, fed = reference
    top_k = moe.dims["top_k"]
    for layer in range(moe.dims["num_layers"]):
        # without SD every token is one pass through each layer: fed tokens x top-k picks
        assert counts[layer].sum() == (fed * top_k if layer in moe.moe_layers else 0), layer


def test_save_routing_adds_to_the_file_run_after_run(tmp_path, package, reference):
    tokens, counts, _, _ = reference
    path = tmp_path / "routing.json"
    for runs in (1, 2):
        done = spac_run("--package", package, "--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS,
                        "--no-speculative", "--json", "--save-routing", path)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["token_ids"] == tokens
        assert (load_routing(path, load_manifest(package)).counts == runs * counts).all()


@pytest.mark.parametrize("speculative", (False, True))
def test_static_keeps_the_most_routed_experts_and_stays_lossless(tmp_path, package, reference, speculative):
    tokens, counts, moe, _ = reference
    path = routing_file(tmp_path / "routing.json", counts)
    with Runtime(package, policy="static", host_budget=0.25, static_frequencies=path) as runtime:
        kept = set(runtime.experts.host.slots)
        result = runtime.generate(PROMPT, max_new_tokens=NEW_TOKENS, speculative=speculative)
    assert result.token_ids == tokens
    ranked = sorted(((layer, expert) for layer in moe.moe_layers for expert in range(moe.dims["num_experts"])),
                    key=lambda key: -counts[key])
    floor = counts[ranked[len(kept) - 1]]
    assert len(kept) > 0 and all(counts[key] >= floor for key in kept)  # ties may go either way
    assert sum(counts[key] for key in kept) == sum(counts[key] for key in ranked[:len(kept)])


def test_the_routing_flag_reaches_the_static_policy(tmp_path, package, reference):
    tokens, counts, _, _ = reference
    path = routing_file(tmp_path / "routing.json", counts)
    done = spac_run("--package", package, "--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS, "--no-speculative",
                    "--host-budget", "25%", "--routing", path, "--json")
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert payload["token_ids"] == tokens
    done = spac_run("--package", package, "--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS, "--no-speculative",
                    "--host-budget", "25%", "--policy", "static", "--json")
    assert done.returncode == 0, done.stderr
    assert "--save-routing" in done.stderr  # static without counts warns how to get them
    # the counts are this very generation's, so the set they choose misses less than the default one
    assert payload["stats"]["expert_hit_rate"] > json.loads(done.stdout)["stats"]["expert_hit_rate"]


def test_static_without_counts_says_how_to_get_them(package, caplog):
    with caplog.at_level(logging.WARNING, logger="spac"):
        Runtime(package, policy="static", host_budget=0.25).close()
    assert any("--save-routing" in record.getMessage() for record in caplog.records)


def bad_files(counts):
    layers, experts = counts.shape
    good = {"format": FORMAT, "version": VERSION, "num_layers": layers, "num_experts": experts,
            "counts": counts.tolist()}

    def changed(**fields):
        return json.dumps({**good, **fields})

    row = counts[1].tolist()
    return {  # name -> (file text, fragments of the one error line)
        "not JSON": ("counts: many", ["not JSON", "--save-routing"]),
        "not UTF-8": (b"\xff\xfe", ["not JSON"]),
        "other JSON": ('{"policy": "static"}', ["format", "spac-routing"]),
        "a list": ("[[1, 2], [3, 4]]", ["format", "spac-routing"]),
        "other version": (changed(version=2), ["version", "expected 1", "2"]),
        "other model": (changed(num_experts=experts + 1), ["num_experts", f"has {experts}", str(experts + 1)]),
        "layers as bool": (changed(num_layers=True), ["num_layers"]),
        "short counts": (changed(counts=good["counts"][:-1]), ["counts", f"{layers} rows"]),
        "short row": (changed(counts=[good["counts"][0], row[:-1], *good["counts"][2:]]), ["counts[1]", str(experts)]),
        "negative": (changed(counts=[good["counts"][0], [-1, *row[1:]], *good["counts"][2:]]), ["counts[1]", "-1"]),
        "fraction": (changed(counts=[good["counts"][0], [0.5, *row[1:]], *good["counts"][2:]]), ["counts[1]", "0.5"]),
        "bool": (changed(counts=[good["counts"][0], [True, *row[1:]], *good["counts"][2:]]), ["counts[1]", "True"]),
        "huge": (changed(counts=[good["counts"][0], [2**64, *row[1:]], *good["counts"][2:]]), ["counts[1]", "2^53"]),
        "NaN": (changed(counts=[good["counts"][0], [float("nan"), *row[1:]], *good["counts"][2:]]), ["not JSON", "NaN"]),
    }


def test_bad_routing_files_are_refused_in_one_line(tmp_path, package, reference, capsys):
    counts = reference[1]
    for name, (text, fragments) in bad_files(counts).items():
        path = tmp_path / f"{name}.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        assert cli.main(["--package", str(package), "--prompt", PROMPT, "--routing", str(path)]) == 2, name
        captured = capsys.readouterr()
        errors = captured.err.splitlines()
        assert captured.out == "" and len(errors) == 1, (name, errors)
        assert errors[0].startswith(f"spac-run: error: routing file {path}: "), (name, errors)
        for fragment in fragments:
            assert fragment in errors[0], (name, errors[0])


def test_unreadable_routing_files_are_refused_in_one_line(tmp_path, package, capsys, monkeypatch):
    from spac.runtime import routing

    big = tmp_path / "big.json"
    big.write_text(" " * 2048)
    monkeypatch.setattr(routing, "MAX_FILE_BYTES", 1024)
    for path, fragment in ((tmp_path / "absent.json", "cannot be read"), (tmp_path, "cannot be read"),
                           (big, "larger than")):
        assert cli.main(["--package", str(package), "--prompt", PROMPT, "--routing", str(path)]) == 2
        errors = capsys.readouterr().err.splitlines()
        assert len(errors) == 1 and fragment in errors[0] and str(path) in errors[0], errors


def test_routing_with_another_policy_is_refused(tmp_path, package, reference, capsys):
    path = routing_file(tmp_path / "routing.json", reference[1])
    assert cli.main(["--package", str(package), "--prompt", PROMPT, "--routing", path, "--policy", "lru"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and "--routing" in errors[0] and "--policy lru" in errors[0], errors


def test_save_routing_never_overwrites_a_file_that_is_not_one(tmp_path, package, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    assert cli.main(["--package", str(package), "--prompt", PROMPT, "--save-routing", str(notes)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1 and str(notes) in captured.err
    assert notes.read_text() == "my notes\n"
    missing = tmp_path / "no-such-folder" / "routing.json"
    assert cli.main(["--package", str(package), "--prompt", PROMPT, "--save-routing", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("program", ["spac-run", "spac-serve"])
def test_save_routing_is_checked_before_the_runtime_loads(tmp_path, package, capsys, program):
    """A wrong --save-routing file is refused before the runtime loads anything: here the
    package's embed graph is corrupt (loading would fail its hash), yet the error is the file's."""
    from spac.runtime import server

    broken = shutil.copytree(package, tmp_path / "package")
    embed = broken / "target" / "embed.onnx"
    embed.write_bytes(bytes(embed.stat().st_size))
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    main = cli.main if program == "spac-run" else server.main
    extra = ["--prompt", PROMPT] if program == "spac-run" else []
    assert main(["--package", str(broken), *extra, "--save-routing", str(notes)]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"{program}: error: routing file {notes}: not JSON"), errors
    assert notes.read_text() == "my notes\n"
    with pytest.raises(ManifestError, match="sha256"):  # what loading would have said
        Runtime(broken)


def test_save_routing_loads_the_manifest_once(tmp_path, package, monkeypatch):
    """The record checks its file against the manifest the runtime then runs from: a DeepSeek-V3
    sized manifest (29,696 files) takes about 2 s to load and check."""
    from spac.runtime import runtime as runtime_module

    loads = []
    real = load_manifest

    def counted(folder):  # the real loader, counted
        loads.append(folder)
        return real(folder)

    monkeypatch.setattr(cli, "load_manifest", counted)
    monkeypatch.setattr(runtime_module, "load_manifest", counted)
    path = tmp_path / "routing.json"
    assert cli.main(["--package", str(package), "--prompt", PROMPT, "--max-new-tokens", "2",
                     "--save-routing", str(path)]) == 0
    assert len(loads) == 1 and path.exists()


def test_a_failed_save_keeps_the_old_counts(tmp_path, package, reference, capsys, monkeypatch):
    path = routing_file(tmp_path / "routing.json", reference[1])
    before = open(path).read()

    def full_disk(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    code = cli.main(["--package", str(package), "--prompt", PROMPT, "--max-new-tokens", "4", "--save-routing", path])
    captured = capsys.readouterr()
    assert code == 2 and captured.out  # the text was generated and printed
    assert "cannot be written" in captured.err and "No space left" in captured.err
    assert open(path).read() == before and os.listdir(tmp_path) == ["routing.json"]  # no temp file left


def test_frequencies_of_the_wrong_shape_are_refused(package, reference):
    counts = reference[1]
    for wrong in (counts[:, :-1], counts.reshape(-1), -counts, np.full(counts.shape, np.nan)):
        with pytest.raises(ValueError, match="static_frequencies"):
            Runtime(package, policy="static", host_budget=0.25, static_frequencies=wrong)
    with pytest.raises(RoutingFileError):
        Runtime(package, policy="static", host_budget=0.25, static_frequencies="/no/such/routing.json")


def test_serve_refuses_a_bad_routing_file_before_listening(tmp_path, package, capsys):
    from spac.runtime import server

    path = tmp_path / "routing.json"
    path.write_text('{"format": "spac-routing", "version": 1}')
    assert server.main(["--package", str(package), "--routing", str(path)]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"spac-serve: error: routing file {path}: num_layers"), errors
