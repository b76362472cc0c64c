"""A package from a stranger: every file the runtime opens is inside it, listed and hashed first;
a malformed manifest, graph or tokenizer is one clear ManifestError, never a traceback."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

import onnx
import pytest
import yaml

from spac.runtime import ManifestError, Runtime
from spac.runtime.manifest import load_manifest, write_manifest

FAMILY = "qwen3_moe"


@pytest.fixture
def package(exported, tmp_path):
    """A private copy of a package, free to tamper with."""
    return Path(shutil.copytree(exported(FAMILY).output, tmp_path / "package"))


def edit_manifest(package: Path, edit) -> Path:
    path = package / "manifest.yaml"
    manifest = yaml.safe_load(path.read_text())
    edit(manifest)
    write_manifest(package, manifest)  # an object held twice is written out twice, not as an alias
    return path


def relist(package: Path, name: str, manifest_name: str | None = None) -> None:
    """Record a tampered file's true hash and size, as an attacker would."""
    data = (package / name).read_bytes()

    def edit(manifest):
        manifest["files"][manifest_name or name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    edit_manifest(package, edit)


class OpensOutside:
    """Records every file opened outside the package and the Python install (an audit hook)."""

    def __init__(self, package: Path):
        self.package = str(package.resolve())
        self.allowed = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix, *map(str, sys.path)} - {""})
        self.opened: list[str] = []
        sys.addaudithook(self.hook)
        self.active = True

    def hook(self, event, args):
        if self.active and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(args[0]))
            if not path.startswith((self.package, *self.allowed, "/proc", "/sys", "/dev/null")):
                self.opened.append(path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.active = False  # audit hooks cannot be removed


def one_line_error(package: Path) -> str:
    with pytest.raises(ManifestError) as error:
        Runtime(package)
    message = str(error.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------
# Paths outside the package


@pytest.fixture
def outside(package, tmp_path):
    """A copy of the package's embed graph outside the package (same bytes: a hash would pass)."""
    copy = tmp_path / "outside" / "embed.onnx"
    copy.parent.mkdir()
    shutil.copyfile(package / "target" / "embed.onnx", copy)
    return copy


@pytest.mark.parametrize("field", ["absolute", "dotdot", "layer", "pattern", "backslash", "nul"])
def test_trunk_paths_outside_the_package_are_refused(package, outside, field):
    def edit(manifest):
        target = manifest["target"]
        if field == "absolute":
            target["embed"] = str(outside)
        elif field == "dotdot":
            target["embed"] = "../outside/embed.onnx"
        elif field == "layer":
            target["layers"][0]["file"] = "target/../../outside/embed.onnx"
        elif field == "pattern":
            target["experts"]["file_pattern"] = "../outside/L{layer:03d}/E{expert:04d}"
        elif field == "backslash":
            target["embed"] = "target\\embed.onnx"
        else:
            target["embed"] = "target/embed.onnx\0"

    path = edit_manifest(package, edit)
    with OpensOutside(package) as opens:
        message = one_line_error(package)
    assert str(path) in message and "inside the package" in message, message
    assert not opens.opened


def test_file_table_entry_outside_the_package_is_not_opened(package):
    edit_manifest(package, lambda m: m["files"].__setitem__("/etc/shadow", {"sha256": "0" * 64, "bytes": 1}))
    with OpensOutside(package) as opens:
        message = one_line_error(package)
    assert "'/etc/shadow'" in message and "inside the package" in message, message
    assert not opens.opened


@pytest.mark.parametrize("name", ["target/embed.onnx", "target/experts/L001/E0007.data", "tokenizer/tokenizer.json"])
def test_symlink_out_of_the_package_is_refused(package, tmp_path, name):
    copy = tmp_path / "elsewhere"
    shutil.copyfile(package / name, copy)
    (package / name).unlink()
    (package / name).symlink_to(copy)
    with OpensOutside(package) as opens:
        message = one_line_error(package)
    assert name in message and "symbolic link" in message, message
    assert not opens.opened


def test_symlinked_folder_out_of_the_package_is_refused(package, tmp_path):
    folder = package / "target" / "experts" / "L000"
    shutil.move(folder, tmp_path / "L000")
    folder.symlink_to(tmp_path / "L000")
    with OpensOutside(package) as opens:
        message = one_line_error(package)
    assert "outside the package" in message, message
    assert not opens.opened


@pytest.mark.timeout(60, func_only=True)
def test_fifo_is_refused_without_hanging(package):
    name = package / "target" / "experts" / "L000" / "E0003.data"
    name.unlink()
    os.mkfifo(name)
    assert "not a regular file" in one_line_error(package)


@pytest.mark.timeout(60, func_only=True)
def test_a_manifest_alias_bomb_is_refused_at_once(package):
    """Nine lines of YAML aliases are a billion nodes: where a refusal would echo such a value
    (the first eos token id here), its repr would never end."""
    path = package / "manifest.yaml"
    manifest = yaml.safe_load(path.read_text())
    manifest["tokenizer"]["eos_token_ids"] = ["BOMB"]
    bomb = ["laughs:", "- &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    bomb += [f"- &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path.write_text("\n".join(bomb) + "\n" + yaml.safe_dump(manifest, sort_keys=False).replace("BOMB", "*a8"))
    message = one_line_error(package)
    assert str(path) in message and "aliases" in message and "line 3" in message, message


@pytest.mark.timeout(60, func_only=True)
def test_an_oversized_manifest_is_refused_unread(package):
    path = package / "manifest.yaml"
    with open(path, "a") as file:
        file.write(("# padding\n" * 1024) * 6600)  # 66 MB of comments
    message = one_line_error(package)
    assert str(path) in message and "larger than 64 MiB" in message, message


def test_written_manifests_hold_no_aliases(package):
    """The writer spells out an object the data holds twice, which the reader would refuse as an alias."""
    path = package / "manifest.yaml"
    manifest = yaml.safe_load(path.read_text())
    shared = manifest["target"]["layers"][0]["kv_shapes"]
    manifest["target"]["layers"][1]["kv_shapes"] = shared
    write_manifest(package, manifest)
    assert "&id" not in path.read_text()
    assert load_manifest(package).target.layers[1].kv_shapes == load_manifest(package).target.layers[0].kv_shapes


def test_tokenizer_must_be_listed_and_hashed(package):
    edit_manifest(package, lambda m: m["files"].pop("tokenizer/tokenizer.json"))
    assert "tokenizer/tokenizer.json" in one_line_error(package)


# ---------------------------------------------------------------------------------------------
# External data of a graph


@pytest.mark.parametrize("location", ["absolute", "../../../../outside.data", "E0001.data/../../L001/E0000.data",
                                      "E9999.data", "offset"])
def test_external_data_must_be_a_listed_package_file(package, tmp_path, location):
    name = "target/experts/L000/E0000.onnx"
    secret = tmp_path / "outside.data"
    shutil.copyfile(package / "target/experts/L000/E0000.data", secret)
    model = onnx.load(package / name, load_external_data=False)
    for entry in model.graph.initializer[-1].external_data:
        if entry.key == "location" and location != "offset":
            entry.value = str(secret) if location == "absolute" else location
        if entry.key == "offset" and location == "offset":
            entry.value = str(10**6)
    onnx.save(model, package / name)
    relist(package, name)
    with OpensOutside(package) as opens:
        message = one_line_error(package)
    assert name in message and "external data" in message, message
    assert not opens.opened


# ---------------------------------------------------------------------------------------------
# Malformed files


def test_graph_that_is_not_onnx_is_refused(package):
    (package / "target" / "head.onnx").write_bytes(b"\x08\x07not a graph at all" * 50)
    relist(package, "target/head.onnx")
    message = one_line_error(package)
    assert "target/head.onnx" in message and "ONNX" in message, message


def test_graph_that_disagrees_with_the_manifest_is_refused(package):
    def edit(manifest):  # swap two roles: each graph is valid, neither is what the runtime feeds
        manifest["target"]["embed"], manifest["target"]["head"] = manifest["target"]["head"], manifest["target"]["embed"]

    edit_manifest(package, edit)
    assert "target/" in one_line_error(package)


def test_tokenizer_that_is_not_json_is_refused(package):
    (package / "tokenizer" / "tokenizer.json").write_text("{not json")
    relist(package, "tokenizer/tokenizer.json")
    message = one_line_error(package)
    assert "tokenizer/tokenizer.json" in message and "tokenizer" in message, message


def test_a_huge_tokenizer_is_refused_unread(package):
    """A sparse file costs a stranger nothing to ship: a tokenizer.json listed at 4 GiB (of its
    true size: only the hash is wrong, and it is checked once the bytes are read) was read whole."""
    name = "tokenizer/tokenizer.json"
    with open(package / name, "r+b") as file:
        file.truncate(4 << 30)
    edit_manifest(package, lambda m: m["files"][name].update(bytes=4 << 30))
    started = time.monotonic()
    message = one_line_error(package)
    assert name in message and "larger than 256 MiB" in message, message
    assert time.monotonic() - started < 30  # (reading 4 GiB of zeros and hashing them takes longer here)


def _set(path: str | tuple, value):
    """An edit setting the field at `path` ("a.0.b", or a tuple of keys) to value (KeyError: delete it)."""
    def edit(manifest):
        *parents, last = path.split(".") if isinstance(path, str) else path
        node = manifest
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is KeyError:
            del node[last]
        else:
            node[int(last) if isinstance(node, list) else last] = value

    return edit


EXPERT_DATA = "target/experts/L000/E0000.data"
MALFORMED = {
    "sha256-missing": (_set(("files", EXPERT_DATA, "sha256"), KeyError), "sha256"),
    "sha256-not-hex": (_set(("files", EXPERT_DATA, "sha256"), "xyz"), "sha256"),
    "bytes-string": (_set(("files", EXPERT_DATA, "bytes"), "24576"), "bytes"),
    "bytes-negative": (_set(("files", EXPERT_DATA, "bytes"), -1), "bytes"),
    "entry-not-mapping": (_set(("files", EXPERT_DATA), "24576"), "mapping"),
    "files-not-mapping": (_set("files", ["a"]), "files"),
    "dtype": (_set("dtype", "int4"), "dtype"),
    "layers-empty": (_set("target.layers", []), "layers"),
    "layers-count": (lambda m: m["target"]["layers"].pop(), "num_layers"),
    "layer-index": (_set("target.layers.1.index", 0), "index"),
    "layer-not-mapping": (_set("target.layers.0", 3), "mapping"),
    "kv-not-list": (_set("target.layers.0.kv_shapes", 5), "kv_shapes"),
    "kv-negative": (_set("target.layers.0.kv_shapes.0.3", -16), "kv_shapes"),
    "kv-rank": (_set("target.layers.0.kv_shapes.0", [1, 2, 0]), "kv_shapes"),
    "kv-disagrees": (_set("target.layers.0.kv_shapes.1.3", 17), "past_second"),
    "kv-past": (_set("target.layers.0.kv_shapes.0.2", 4), "kv_shapes"),
    "sliding-window": (_set("target.layers.0.sliding_window", "wide"), "sliding_window"),
    "num-experts-more": (_set("target.dims.num_experts", 9), "num_experts"),
    "num-experts-fewer": (_set("target.dims.num_experts", 7), "num_experts"),
    "top-k": (_set("target.dims.top_k", 9), "top_k"),
    "top-k-disagrees": (_set("target.dims.top_k", 3), "topk_ids"),
    "hidden-size": (_set("target.dims.hidden_size", 65), "hidden_size"),
    "vocab-zero": (_set("target.dims.vocab_size", 0), "vocab_size"),
    "vocab-disagrees": (_set("target.dims.vocab_size", 511), "logits"),
    "kind": (_set("target.layers.0.kind", "dense"), "kind"),
    "post-experts-unlisted": (_set("target.layers.0.post_experts", "target/post.onnx"), "post_experts"),
    "post-experts-twice": (_set("target.layers.0.post_experts", "target/head.onnx"), "more than one role"),
    "post-experts-wrong-graph": (_set("target.layers.0.post_experts", "target/experts/L000/E0000.onnx"), "residual"),
    "variant": (_set("target.experts.spec.variant", "relu"), "variant"),
    "tensors": (_set("target.experts.tensors.0.offset", 8), "tensors"),
    "bytes-per-expert": (_set("target.experts.bytes_per_expert", 100), "bytes_per_expert"),
    "pattern-attribute": (_set("target.experts.file_pattern", "target/experts/L{layer.real}/E{expert:04d}"),
                          "file_pattern"),
    "pattern-no-expert": (_set("target.experts.file_pattern", "target/experts/L{layer:03d}/E0000"), "file_pattern"),
    "eos-out-of-vocab": (_set("tokenizer.eos_token_ids", [10**6]), "eos_token_ids"),
    "template-not-text": (_set("tokenizer.chat_template", ["x"]), "chat_template"),
    "tokenizer-files": (_set("tokenizer.files", ["../x"]), "tokenizer.files"),
    "draft-not-mapping": (_set("draft", "yes"), "draft"),
    "top-level-list": (lambda m: (m.clear(), m.update({"x": 1})), "schema_version"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_manifest_is_one_clear_line(package, name):
    edit, field = MALFORMED[name]
    path = edit_manifest(package, edit)
    message = one_line_error(package)
    assert field in message, message
    assert str(path) in message or "package file" in message, message


def test_size_mismatch_names_both_sizes(package):
    edit_manifest(package, _set(("files", EXPERT_DATA, "bytes"), 24575))
    message = one_line_error(package)
    assert "has 24576 bytes, the manifest says 24575" in message, message


def test_untampered_package_still_loads(package):
    manifest = load_manifest(package)
    assert manifest.expert_data == {name for name in manifest.files if "/experts/" in name and name.endswith(".data")}
    with Runtime(package) as runtime:
        assert runtime.generate("hello", max_new_tokens=2).token_ids


def test_trunk_weights_beside_a_graph_are_hashed_when_experts_are_paged(package):
    """A trunk graph past protobuf's cap keeps its weights in NAME.onnx.data: that file is not an
    expert's, so it is hashed at load even when the pager reads (and hashes) the experts itself."""
    name = "target/head.onnx"
    onnx.save(onnx.load(package / name), package / name, save_as_external_data=True,
              location="head.onnx.data", size_threshold=0)
    relist(package, name)
    relist(package, f"{name}.data")
    data = bytearray((package / f"{name}.data").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (package / f"{name}.data").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"head\.onnx\.data fails its sha256 check"):
        Runtime(package, host_budget=0.5)


# ---------------------------------------------------------------------------------------------
# Draft copies of the experts (spac-export --draft-experts)


@pytest.fixture
def copies_package(exported, tmp_path):
    """A private copy of a package with int4 draft copies of its experts."""
    return Path(shutil.copytree(exported(FAMILY, draft_experts="int4").output, tmp_path / "package"))


COPY_DATA = "target/draft_experts/L000/E0000.data"
MALFORMED_COPIES = {
    "not-mapping": (_set("target.draft_experts", 3), "target.draft_experts"),
    "float": (_set("target.draft_experts.quantization", None), "target.draft_experts.tensors"),
    "experts-own-files": (_set("target.draft_experts.file_pattern", "target/experts/L{layer:03d}/E{expert:04d}"),
                          "target.draft_experts"),
    "pattern-attribute": (_set("target.draft_experts.file_pattern", "target/draft_experts/L{layer.real}/E{expert}"),
                          "target.draft_experts.file_pattern"),
    "variant": (_set("target.draft_experts.spec.variant", "relu"), "target.draft_experts.spec.variant"),
    "unlisted": (_set(("files", COPY_DATA), KeyError), "target.draft_experts lack layer 0 expert 0"),
}


@pytest.mark.parametrize("name", MALFORMED_COPIES)
def test_malformed_draft_copies_are_one_clear_line(copies_package, name):
    edit, field = MALFORMED_COPIES[name]
    edit_manifest(copies_package, edit)
    message = one_line_error(copies_package)
    assert field in message, message


def test_draft_copies_no_smaller_than_the_experts_are_refused(copies_package):
    """Copies as wide as the experts (here: the experts' own float layout under the copies'
    files) would only take memory."""
    def edit(manifest):
        copies, experts = manifest["target"]["draft_experts"], manifest["target"]["experts"]
        copies.update(tensors=experts["tensors"], bytes_per_expert=experts["bytes_per_expert"], quantization=None)
    edit_manifest(copies_package, edit)
    message = one_line_error(copies_package)
    assert "draft copies must be block-quantized to fewer bytes than the experts'" in message, message


def test_tampered_draft_copy_fails_its_hash_only_where_it_is_loaded(copies_package):
    data = bytearray((copies_package / COPY_DATA).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copies_package / COPY_DATA).write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"draft_experts/L000/E0000\.data fails its sha256 check"):
        Runtime(copies_package, draft="self", host_budget=0.5)
    with Runtime(copies_package, draft="none", host_budget=0.5) as runtime:  # the copies are not read
        assert runtime.generate("hello", max_new_tokens=2).token_ids
