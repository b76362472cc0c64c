"""The package manifest: what spac-export wrote and the runtime reads.

manifest.yaml holds the schema version, the source models, dtype and opset, the tokenizer, one
section per model (target, draft) with its dims, trunk graphs and layers, the routed-expert
layout, and for every file its sha256 and byte size. It is written atomically (temp + rename).

A package may come from a stranger, so nothing in it is trusted before it is checked. Loading
checks every field's type and range, that every path the runtime will open is a relative name
inside the package listed under files (every expert's .onnx and .data included), and that each
listed file is a regular file (no link, FIFO or device) of its recorded size inside the package;
no package file but the manifest is opened. verify_file checks a file's sha256 before its first
use, and that a graph is ONNX agreeing with the manifest, its external data in listed files.
The manifest itself is read with a size bound and without YAML aliases (read_bounded,
load_plain_yaml), which profiles and routing files use too.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import string
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from spac.ops.expert_graph import DTYPES, expert_matrices, expert_tensors
from spac.ops.quantization import BITS, BLOCK_SIZES, BlockQuantization, from_dict
from spac.ops.storage import PackageFileError

# 2: MoE layer graphs output the router's logits; 3: expert tensors name their dtype, experts
# and trunk may be block-quantized
SCHEMA_VERSION = 3
MANIFEST = "manifest.yaml"
PRODUCER = "moe-spac"  # what a manifest written by spac-export names as its producer
# DeepSeek-V3's 14,848 routed experts list 29,696 files: 3.9 MB of manifest
MAX_MANIFEST_BYTES = 64 << 20
MAX_NESTING = 16  # a manifest nests seven levels deep, a profile three
EXCERPT_CHARS = 80  # of a value echoed in an error


class ManifestError(PackageFileError):
    """The package is missing, malformed or corrupt; the message names the file and field."""


@dataclass(frozen=True)
class Layer:
    index: int
    kind: str  # "moe" or "dense"
    file: str
    sliding_window: int | None
    kv_shapes: tuple[tuple[int, ...], ...]
    post_experts: str | None = None  # post-norm families: the graph ending a MoE layer


@dataclass(frozen=True)
class Experts:
    spec: dict  # variant and its constants, as ops.expert_graph takes them
    tensors: tuple[dict, ...]
    bytes_per_expert: int
    file_pattern: str  # format string with {layer} and {expert}, without extension
    quantization: BlockQuantization | None = None  # None: weights in the package dtype

    def path(self, layer: int, expert: int, suffix: str) -> str:
        return self.file_pattern.format(layer=layer, expert=expert) + suffix


@dataclass(frozen=True)
class ModelSection:
    architecture: str
    model_type: str
    dims: dict
    embed: str
    head: str
    layers: tuple[Layer, ...]
    experts: Experts | None
    trunk_quantization: BlockQuantization | None = None  # the target's trunk matmuls (informational)
    # A block-quantized copy of every routed expert, in fewer bytes than `experts`, that a
    # self-draft holds in memory and drafts with (spac-export --draft-experts; spac.ops.self_draft)
    draft_experts: Experts | None = None

    @property
    def moe_layers(self) -> list[int]:
        return [layer.index for layer in self.layers if layer.kind == "moe"]

    @property
    def graphs(self) -> list[str]:
        return section_graphs(self.embed, self.head, self.layers)


def section_graphs(embed: str, head: str, layers: tuple[Layer, ...]) -> list[str]:
    """A section's graphs: its embedding, its head, each layer's and each layer's post_experts."""
    return [embed, head, *(layer.file for layer in layers), *filter(None, (layer.post_experts for layer in layers))]


@dataclass(frozen=True)
class Manifest:
    root: Path
    raw: dict
    target: ModelSection
    draft: ModelSection | None
    expert_data: frozenset[str]  # the routed experts' .data files, which the pager reads itself
    draft_expert_data: frozenset[str] = frozenset()  # the draft copies' .data files (target.draft_experts)

    @property
    def dtype(self) -> str:
        return self.raw["dtype"]

    @property
    def files(self) -> dict:
        return self.raw["files"]

    @property
    def tokenizer(self) -> dict:
        return self.raw["tokenizer"]

    def expert_bytes_total(self) -> int:
        experts = self.target.experts
        return experts.bytes_per_expert * len(self.target.moe_layers) * self.target.dims["num_experts"]

    def trunk_bytes(self) -> int:
        """Bytes of everything but the routed experts' weights and their draft copies (always
        resident)."""
        return sum(entry["bytes"] for name, entry in self.files.items()
                   if name not in self.expert_data and name not in self.draft_expert_data)

    def draft_copies(self) -> "Manifest":
        """This package as if the draft copies of the experts were its experts: what an expert
        stack (spac.ops.experts.ResidentExperts) loads them from."""
        target = replace(self.target, experts=self.target.draft_experts, draft_experts=None)
        return replace(self, target=target, expert_data=self.draft_expert_data, draft_expert_data=frozenset())


DIMS = ("hidden_size", "vocab_size", "num_layers", "max_position_embeddings")
MOE_DIMS = ("num_experts", "top_k", "expert_intermediate_size")
TOKENIZER_JSON = "tokenizer/tokenizer.json"
SMALL_FILE_BYTES = 256 << 20  # the most of a small package file (the tokenizer) read whole
EXPERT_VARIANTS = {"swiglu": (), "swiglu_oss": ("limit", "alpha")}  # each variant's numeric constants
SUFFIXES = (".onnx", ".data")  # of each expert's graph and weights
REQUIRED = {
    "": {"schema_version": int, "dtype": str, "opset": int, "source": dict, "tokenizer": dict,
         "target": dict, "files": dict},
    "target": {"architecture": str, "model_type": str, "dims": dict, "embed": str, "head": str, "layers": list,
               "experts": dict},
    "draft": {"architecture": str, "model_type": str, "dims": dict, "embed": str, "head": str, "layers": list},
    "layer": {"index": int, "kind": str, "file": str, "kv_shapes": list},
    "experts": {"spec": dict, "tensors": list, "bytes_per_expert": int, "file_pattern": str},
    "tokenizer": {"files": list, "eos_token_ids": list},
    "file": {"sha256": str, "bytes": int},
}
KIND_NAMES = {dict: "a mapping", list: "a list"}
SHA256 = re.compile(r"[0-9a-f]{64}")
PATTERN_SPEC = re.compile(r"0?[0-9]{0,2}d?")  # "03d": zero-padded decimal, nothing else


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def escapes_package(name: str) -> bool:
    """True unless `name` is a plain relative POSIX path that cannot leave the package."""
    return (not name or name.startswith("/") or "\\" in name or not name.isprintable()
            or any(part in ("", ".", "..") for part in name.split("/")))


class _Reader:
    """Reads manifest fields; each refusal is one line naming the manifest, the field and what
    would be valid."""

    def __init__(self, path: Path):
        self.path = path
        self.files: dict = {}

    def fail(self, field: str, problem: str):
        raise ManifestError(f"{self.path}: {field} {problem}")

    def require(self, data, schema: str, where: str) -> None:
        if not isinstance(data, dict):
            self.fail(where or "the top level", f"must be a mapping, got {type(data).__name__}")
        for key, kind in REQUIRED[schema].items():
            field = f"{where}.{key}" if where else key
            if key not in data:
                raise ManifestError(f"{self.path}: missing field {field}")
            if not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool)):
                self.fail(f"field {field}", f"must be {KIND_NAMES.get(kind, kind.__name__)}, "
                                            f"got {type(data[key]).__name__}")

    def integer(self, value, field: str, minimum: int = 0) -> None:
        if not _is_int(value) or value < minimum:
            self.fail(field, f"must be an integer >= {minimum}, got {value!r:.80}")

    def optional(self, data: dict, key: str, where: str, kinds: tuple):
        value = data.get(key)
        if value is not None and not isinstance(value, kinds):
            self.fail(f"{where}.{key}", f"must be null or {' or '.join(k.__name__ for k in kinds)}, "
                                        f"got {type(value).__name__}")
        return value

    def inside(self, name, field: str) -> str:
        if not isinstance(name, str) or escapes_package(name):
            self.fail(field, f"is {name!r:.200}: a package file must be a relative path inside the package "
                             "('folder/file.onnx': no leading '/', no '..', no backslash or control characters)")
        return name

    def listed(self, name, field: str) -> str:
        self.inside(name, field)
        if name not in self.files:
            self.fail(field, f"names {name!r}, which is not listed under files (every file the runtime opens "
                             "is listed there with its sha256)")
        return name

    def file_table(self, files: dict) -> None:
        for name, entry in files.items():
            where = f"files[{name!r:.200}]"
            self.inside(name, where)
            self.require(entry, "file", where)
            if not SHA256.fullmatch(entry["sha256"]):
                self.fail(f"{where}.sha256", f"must be 64 lowercase hex digits, got {entry['sha256']!r:.80}")
            self.integer(entry["bytes"], f"{where}.bytes")
        self.files = files

    def tokenizer(self, data: dict, vocab_size: int) -> None:
        self.require(data, "tokenizer", "tokenizer")
        for i, name in enumerate(data["files"]):
            self.listed(name, f"tokenizer.files[{i}]")
        if TOKENIZER_JSON not in data["files"]:
            self.fail("tokenizer.files", f"lacks {TOKENIZER_JSON}, which the runtime reads")
        for i, token in enumerate(data["eos_token_ids"]):
            if not _is_int(token) or not 0 <= token < vocab_size:
                self.fail(f"tokenizer.eos_token_ids[{i}]", f"is {token!r:.80}; valid: a token id 0..{vocab_size - 1}")
        for key in ("chat_template", "bos_token", "eos_token"):
            self.optional(data, key, "tokenizer", (str,))

    def section(self, data, name: str, dtype: str) -> ModelSection:
        self.require(data, name, name)
        dims = data["dims"]
        for key in DIMS + (MOE_DIMS if name == "target" else ()):
            self.integer(dims.get(key), f"{name}.dims.{key}", minimum=1)
        if name == "target" and dims["top_k"] > dims["num_experts"]:
            self.fail(f"{name}.dims.top_k", f"is {dims['top_k']}, more than num_experts ({dims['num_experts']})")
        entries = data["layers"]
        if len(entries) != dims["num_layers"]:
            self.fail(f"{name}.layers", f"has {len(entries)} entries; {name}.dims.num_layers says {dims['num_layers']} "
                                        "(a model has at least one layer)")
        layers = tuple(self.layer(entry, i, f"{name}.layers[{i}]", moe_allowed=name == "target")
                       for i, entry in enumerate(entries))
        experts = trunk_quantization = draft_experts = None
        if name == "target":
            if not any(layer.kind == "moe" for layer in layers):
                self.fail("target.layers", "has no 'moe' layer; the target is a Mixture-of-Experts model")
            moe_layers = [layer.index for layer in layers if layer.kind == "moe"]
            experts = self.experts(data["experts"], dims, dtype, moe_layers, "target.experts")
            trunk_quantization = self.quantization(data.get("trunk_quantization"), "target.trunk_quantization", {})
            draft_experts = self.optional(data, "draft_experts", "target", (dict,))
            if draft_experts is not None:
                draft_experts = self.draft_experts(draft_experts, experts, dims, dtype, moe_layers)
        self.distinct_graphs(name, data["embed"], data["head"], layers)
        return ModelSection(data["architecture"], data["model_type"], dims,
                            self.listed(data["embed"], f"{name}.embed"), self.listed(data["head"], f"{name}.head"),
                            layers, experts, trunk_quantization, draft_experts)

    def draft_experts(self, raw: dict, experts: Experts, dims: dict, dtype: str, moe_layers: list[int]) -> Experts:
        """The draft copies: the experts' layout, block-quantized to fewer bytes than the
        experts, in files of their own."""
        copies = self.experts(raw, dims, dtype, moe_layers, "target.draft_experts")
        if copies.quantization is None or copies.bytes_per_expert >= experts.bytes_per_expert:
            form = "float" if copies.quantization is None else copies.quantization.name
            self.fail("target.draft_experts", f"take {copies.bytes_per_expert} bytes an expert ({form}); draft copies "
                                              "must be block-quantized to fewer bytes than the experts' "
                                              f"{experts.bytes_per_expert}")
        if copies.spec != experts.spec:
            self.fail("target.draft_experts.spec", f"is {copies.spec!r:.120}; it must be the experts' "
                                                   f"{experts.spec!r:.120}")
        if copies.file_pattern == experts.file_pattern:
            self.fail("target.draft_experts.file_pattern", "names the experts' own files; draft copies need their own")
        return copies

    def quantization(self, raw, field: str, matrices: dict) -> BlockQuantization | None:
        """null (float weights) or {bits, block_size, symmetric} whose blocks divide every input
        dimension of `matrices` ({name: (K, N)})."""
        if raw is None:
            return None
        if not isinstance(raw, dict) or set(raw) != {"bits", "block_size", "symmetric"}:
            self.fail(field, f"must be null or a mapping of bits, block_size and symmetric, got {raw!r:.120}")
        if not _is_int(raw["bits"]) or raw["bits"] not in BITS:
            self.fail(f"{field}.bits", f"is {raw['bits']!r:.80}; valid: {', '.join(map(str, BITS))}")
        if not _is_int(raw["block_size"]) or raw["block_size"] not in BLOCK_SIZES:
            self.fail(f"{field}.block_size", f"is {raw['block_size']!r:.80}; valid: {', '.join(map(str, BLOCK_SIZES))}")
        if not isinstance(raw["symmetric"], bool):
            self.fail(f"{field}.symmetric", f"must be true or false, got {raw['symmetric']!r:.80}")
        quantization = from_dict(raw)
        for matrix, (k, _) in matrices.items():
            refusal = quantization.refusal(k)
            if refusal:
                self.fail(f"{field}.block_size", f"does not fit {matrix}: {refusal}")
        return quantization

    def distinct_graphs(self, name: str, embed: str, head: str, layers: tuple[Layer, ...]) -> None:
        """Each graph has one role: its inputs and outputs are checked against that role."""
        graphs = section_graphs(embed, head, layers)
        repeated = next((graph for graph in graphs if graphs.count(graph) > 1), None)
        if repeated is not None:
            self.fail(f"{name}", f"names the graph {repeated!r:.200} for more than one role (embed, head, a layer, "
                                 "a layer's post_experts); each graph has one")

    def layer(self, entry, i: int, where: str, moe_allowed: bool) -> Layer:
        self.require(entry, "layer", where)
        if entry["index"] != i:
            self.fail(f"{where}.index", f"is {entry['index']}; layers are listed in order, so it must be {i}")
        kinds = ("moe", "dense") if moe_allowed else ("dense",)
        if entry["kind"] not in kinds:
            self.fail(f"{where}.kind", f"is {entry['kind']!r:.80}; valid: {', '.join(map(repr, kinds))}")
        window = self.optional(entry, "sliding_window", where, (int,))
        if window is not None and (isinstance(window, bool) or window < 1):
            self.fail(f"{where}.sliding_window", f"must be null or an integer >= 1, got {window!r}")
        shapes = entry["kv_shapes"]
        if not (len(shapes) == 2 and all(isinstance(s, list) and len(s) == 4 and all(_is_int(d) and d >= 0 for d in s)
                                         and s[0] == 1 and s[2] == 0 for s in shapes)):
            self.fail(f"{where}.kv_shapes", f"must be two shapes [1, heads, 0, dim] of integers, got {shapes!r:.120}")
        post = self.optional(entry, "post_experts", where, (str,))
        if post is not None:
            if entry["kind"] != "moe":
                self.fail(f"{where}.post_experts", "is set on a dense layer; only MoE layers have one")
            post = self.listed(post, f"{where}.post_experts")
        return Layer(i, entry["kind"], self.listed(entry["file"], f"{where}.file"), window,
                     tuple(tuple(s) for s in shapes), post)

    def experts(self, raw, dims: dict, dtype: str, moe_layers: list[int], where: str) -> Experts:
        self.require(raw, "experts", where)
        spec = raw["spec"]
        variant = spec.get("variant")
        if variant not in EXPERT_VARIANTS:
            self.fail(f"{where}.spec.variant", f"is {variant!r:.80}; valid: {', '.join(EXPERT_VARIANTS)}")
        for key in EXPERT_VARIANTS[variant]:
            if isinstance(spec.get(key), bool) or not isinstance(spec.get(key), (int, float)):
                self.fail(f"{where}.spec.{key}", f"must be a number for variant {variant}, "
                                                 f"got {spec.get(key)!r:.80}")
        hidden, intermediate = dims["hidden_size"], dims["expert_intermediate_size"]
        quantization = self.quantization(raw.get("quantization"), f"{where}.quantization",
                                         expert_matrices(hidden, intermediate))
        layout = expert_tensors(variant, hidden, intermediate, dtype, quantization)
        expected = [t.manifest_entry() for t in layout]
        if raw["tensors"] != expected:
            form = f"{dtype}" + (f", {quantization.name} blocks of {quantization.block_size}" if quantization else "")
            self.fail(f"{where}.tensors", f"do not match the {variant} layout of hidden_size {hidden} and "
                                         f"expert_intermediate_size {intermediate} in {form}: expected {expected}")
        total = sum(t.nbytes for t in layout)
        if raw["bytes_per_expert"] != total:
            self.fail(f"{where}.bytes_per_expert", f"is {raw['bytes_per_expert']}; the tensors take {total}")
        pattern = self.file_pattern(raw["file_pattern"], where)
        experts = Experts(spec, tuple(raw["tensors"]), total, pattern, quantization)
        self.expert_files(experts, moe_layers, dims["num_experts"], where)
        return experts

    def file_pattern(self, pattern: str, where: str) -> str:
        """Only {layer} and {expert}, zero-padded at most: a format string from a stranger could
        otherwise reach attributes ({layer.__class__})."""
        try:
            fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(pattern)
                      if name is not None]
        except ValueError as error:
            self.fail(f"{where}.file_pattern", f"is not a valid pattern ({error}): {pattern!r:.200}")
        if sorted(name for name, _, _ in fields) != ["expert", "layer"] or any(
                conversion or not PATTERN_SPEC.fullmatch(spec) for _, spec, conversion in fields):
            self.fail(f"{where}.file_pattern", f"is {pattern!r:.200}; it must hold {{layer}} and {{expert}} "
                                              "once each, with at most a zero-padded width like {layer:03d}")
        return pattern

    def expert_files(self, experts: Experts, moe_layers: list[int], num_experts: int, where: str) -> None:
        """Every (MoE layer, expert) has its .onnx and .data listed, and no other file matches the
        pattern: num_experts and the MoE layers agree with what was exported."""
        expected = set()
        for layer in moe_layers:
            for expert in range(num_experts):
                for suffix in SUFFIXES:
                    name = self.inside(experts.path(layer, expert, suffix), f"{where}.file_pattern")
                    if name not in self.files:
                        self.fail(where, f"lack layer {layer} expert {expert}: {name} is not listed under "
                                         f"files (target.dims.num_experts is {num_experts})")
                    expected.add(name)
        matching = re.compile("".join(re.escape(text) + (r"\d+" if name else "")
                                      for text, name, _, _ in string.Formatter().parse(experts.file_pattern))
                              + r"\.(onnx|data)")
        stray = sorted(name for name in self.files if matching.fullmatch(name) and name not in expected)
        if stray:
            self.fail("target.dims.num_experts", f"is {num_experts} and the MoE layers (kind 'moe') are {moe_layers}, "
                                                 f"but files "
                                                 f"also lists {stray[0]}: they must match the exported experts")


def load_manifest(package: str | os.PathLike) -> Manifest:
    """Read and check manifest.yaml, and check that every listed file is a regular file of its
    recorded size inside the package; no package file but the manifest is opened."""
    root = Path(package)
    path = root / MANIFEST
    if not root.is_dir():
        raise ManifestError(f"package {root} does not exist or is not a directory (make one with spac-export)")
    if not os.path.lexists(path):
        raise ManifestError(f"{path} is missing: {root} is not a spac package (make one with spac-export)")
    _regular_file(root, MANIFEST)
    raw = read_bounded(path, MAX_MANIFEST_BYTES, ManifestError, str(path), "a manifest lists a package's files")
    try:
        data = load_plain_yaml(raw.decode("utf-8"))
    except (yaml.YAMLError, ValueError) as error:  # ValueError: bad dates, bad UTF-8
        raise ManifestError(f"{path} is not valid YAML{yaml_problem(error)}") from None
    reader = _Reader(path)
    reader.require(data, "", "")
    if data["schema_version"] != SCHEMA_VERSION:
        raise ManifestError(f"{path}: schema_version {data['schema_version']} is not supported; this runtime "
                            f"reads version {SCHEMA_VERSION} (re-export the package with this spac-export)")
    if data["dtype"] not in DTYPES:
        reader.fail("dtype", f"is {data['dtype']!r:.80}; valid: {', '.join(DTYPES)}")
    reader.file_table(data["files"])
    target = reader.section(data["target"], "target", data["dtype"])
    draft = reader.section(data["draft"], "draft", data["dtype"]) if data.get("draft") is not None else None
    reader.tokenizer(data["tokenizer"], target.dims["vocab_size"])
    manifest = Manifest(root, data, target, draft, data_files(target, target.experts),
                        data_files(target, target.draft_experts))
    for name in manifest.files:
        _check_size(manifest, name, _regular_file(root, name).st_size)
    return manifest


def data_files(target: ModelSection, experts: Experts | None) -> frozenset[str]:
    """The .data files of every MoE layer's experts (none without `experts`)."""
    if experts is None:
        return frozenset()
    return frozenset(experts.path(layer, expert, ".data") for layer in target.moe_layers
                     for expert in range(target.dims["num_experts"]))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _regular_file(root: Path, name: str) -> os.stat_result:
    """The file's lstat, once it is known to be a regular file, not a link, inside the package."""
    path = root / name
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise ManifestError(f"package file {path} is missing") from None
    except OSError as error:
        raise ManifestError(f"package file {path} cannot be read: {error.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise ManifestError(f"package file {path} is a symbolic link; a package holds its files itself")
    if not stat.S_ISREG(info.st_mode):
        raise ManifestError(f"package file {path} is not a regular file (a folder, FIFO or device)")
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, real_root]) != real_root:
        raise ManifestError(f"package file {path} lies outside the package (a folder on its path is a symbolic "
                            f"link to {os.path.dirname(real)})")
    return info


def _check_size(manifest: Manifest, name: str, size: int) -> None:
    expected = manifest.files[name]["bytes"]
    if size != expected:
        raise ManifestError(f"package file {manifest.root / name} has {size} bytes, the manifest says {expected}: "
                            "the package is corrupt or incomplete (re-export it)")


def verify_file(manifest: Manifest, name: str, data: bytes | None = None) -> None:
    """Check one package file before its first use: listed, a regular file inside the package,
    of its recorded size and sha256 (from `data` when the caller already read it, so paging in
    an expert hashes the bytes it read instead of reading twice); a graph must also be ONNX that
    agrees with the manifest and keeps its external data in listed package files."""
    if name not in manifest.files:
        raise ManifestError(f"{manifest.root / MANIFEST}: file {name} is not listed under files")
    info = _regular_file(manifest.root, name)
    _check_size(manifest, name, info.st_size if data is None else len(data))
    digest = sha256_file(manifest.root / name) if data is None else hashlib.sha256(data).hexdigest()
    if digest != manifest.files[name]["sha256"]:
        raise ManifestError(f"package file {manifest.root / name} fails its sha256 check: the package is corrupt "
                            "(re-export it)")
    if name.endswith(".onnx"):
        from .graphs import check_graph  # onnx is parsed only where a graph is verified

        check_graph(manifest, name, data)


def read_verified(manifest: Manifest, name: str) -> bytes:
    """A small package file's bytes, verified: what is parsed is exactly what was hashed. Read
    whole, so never past SMALL_FILE_BYTES nor past the size the manifest lists (a sparse file of
    any size costs a stranger nothing to ship)."""
    if name not in manifest.files:
        raise ManifestError(f"{manifest.root / MANIFEST}: file {name} is not listed under files")
    _check_size(manifest, name, _regular_file(manifest.root, name).st_size)
    path, listed = manifest.root / name, manifest.files[name]["bytes"]
    if listed > SMALL_FILE_BYTES:
        raise ManifestError(f"package file {path} is listed at {listed} bytes, larger than {SMALL_FILE_BYTES >> 20} "
                            "MiB; a tokenizer.json is a few MB (Qwen3's: 11 MB)")
    # (a file that grew after the size check above is refused, not read on)
    data = read_bounded(path, listed, ManifestError, f"package file {path}", f"the manifest lists {listed} bytes")
    verify_file(manifest, name, data)
    return data


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# libyaml's parser where PyYAML has it: a DeepSeek-V3-sized manifest (29,696 files) loads in 2.0
# against 6.5 s with the pure-Python one, the check of its events included
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_OPENS, _CLOSES = (yaml.MappingStartEvent, yaml.SequenceStartEvent), (yaml.MappingEndEvent, yaml.SequenceEndEvent)


def load_plain_yaml(text: str):
    """YAML from a stranger (a manifest, a profile), safely loaded once its events show no alias
    and no nesting deeper than MAX_NESTING: neither needs them, and an alias lets a few lines
    expand into billions of nodes ("billion laughs"), whose repr in an error message never
    ends; deep nesting overflows the composer's recursion. Raises yaml.YAMLError."""
    depth = 0
    for event in yaml.parse(text, Loader=_YAML_LOADER):
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed here", event.start_mark)
        if isinstance(event, _OPENS):
            depth += 1
            if depth > MAX_NESTING:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_NESTING} levels",
                                                  event.start_mark)
        elif isinstance(event, _CLOSES):
            depth -= 1
    return yaml.load(text, Loader=_YAML_LOADER)


def yaml_problem(error: Exception) -> str:
    """Where a YAML error is and what, for the end of a one-line message: " at line 3, column
    10: aliases (*name) are not allowed here"."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{where}: {excerpt(getattr(error, 'problem', None) or str(error))}"


def excerpt(text: str) -> str:
    """``text`` on one line, cut to EXCERPT_CHARS: an error must not echo a megabyte back."""
    text = " ".join(text.split())
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS - 1] + "…"


class _PlainYamlDumper(yaml.SafeDumper):
    """Writes an object the data holds twice in full, where SafeDumper would write an alias that
    load_plain_yaml refuses."""

    def ignore_aliases(self, data) -> bool:
        return True


def read_bounded(path: str | os.PathLike, limit: int, error: type[Exception], label: str, expected: str) -> bytes:
    """A stranger's small file, read whole but never past `limit` bytes (it may be endless, as
    /dev/zero is): one `error` naming `label` where it cannot be read or is larger; `expected`
    says what such a file is."""
    try:
        with open(path, "rb") as file:
            raw = file.read(limit + 1)
    except OSError as exc:
        raise error(f"{label}: cannot be read: {exc.strerror}") from None
    if len(raw) > limit:
        bound = f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit} bytes"
        raise error(f"{label}: larger than {bound}; {expected}")
    return raw


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temp file in the same folder and rename, so readers never see half a file."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(handle, 0o666 & ~current_umask())  # mkstemp makes it private; a plain file is not
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_manifest(package: str | os.PathLike, data: dict) -> None:
    write_atomic(Path(package) / MANIFEST, yaml.dump(data, Dumper=_PlainYamlDumper, sort_keys=False).encode())


# Where a routed expert's files live in a package, without the extension (.onnx, .data).
EXPERT_FILE_PATTERN = "target/experts/L{layer:03d}/E{expert:04d}"
DRAFT_EXPERT_FILE_PATTERN = "target/draft_experts/L{layer:03d}/E{expert:04d}"  # their draft copies


def file_table(root: str | os.PathLike) -> dict:
    """Every file under `root`: its sha256 and byte size, by path relative to `root`."""
    root = Path(root)
    return {path.relative_to(root).as_posix(): {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            for path in sorted(p for p in root.rglob("*") if p.is_file())}


def write_package_manifest(package: str | os.PathLike, source: dict, dtype: str, tokenizer: dict,
                           target: dict, draft: dict) -> dict:
    """Write the manifest of the package whose every other file is in place under `package`,
    from its sections (`source`: the model and draft names; `tokenizer`, `target`, `draft` as
    the runtime reads them) and the table of those files; returns the mapping written."""
    from spac.ops.expert_graph import OPSET  # the graphs' opset (onnx is loaded by any exporter)

    data = {"schema_version": SCHEMA_VERSION, "producer": PRODUCER, "source": source, "dtype": dtype,
            "opset": OPSET, "tokenizer": tokenizer, "target": target, "draft": draft,
            "files": file_table(package)}
    write_manifest(package, data)
    return data
