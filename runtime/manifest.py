"""The package manifest: what spac-export wrote and the runtime reads.

manifest.yaml holds the schema version, the source models, dtype and opset, the tokenizer, one
section per model (target, draft) with its dims, trunk graphs and layers, the routed-expert
layout, and for every file its sha256 and byte size. It is written atomically (temp + rename).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

SCHEMA_VERSION = 1
MANIFEST = "manifest.yaml"
PRODUCER = "moe-spac"  # what a manifest written by spac-export names as its producer


class ManifestError(Exception):
    """The package is missing, malformed or corrupt; the message names the file and field."""


@dataclass(frozen=True)
class Layer:
    index: int
    kind: str  # "moe" or "dense"
    file: str
    sliding_window: int | None
    kv_shapes: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Experts:
    spec: dict  # variant and its constants, as ops.expert_graph takes them
    tensors: tuple[dict, ...]
    bytes_per_expert: int
    file_pattern: str  # format string with {layer} and {expert}, without extension

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

    @property
    def moe_layers(self) -> list[int]:
        return [layer.index for layer in self.layers if layer.kind == "moe"]


@dataclass(frozen=True)
class Manifest:
    root: Path
    raw: dict
    target: ModelSection
    draft: ModelSection | None

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
        """Bytes of everything but the routed experts' weights (always resident)."""
        expert_data = {name for name in self.files if name.endswith(".data")}
        return sum(entry["bytes"] for name, entry in self.files.items() if name not in expert_data)


REQUIRED = {
    "": {"schema_version": int, "dtype": str, "opset": int, "source": dict, "tokenizer": dict,
         "target": dict, "files": dict},
    "target": {"architecture": str, "model_type": str, "dims": dict, "embed": str, "head": str, "layers": list,
               "experts": dict},
    "draft": {"architecture": str, "model_type": str, "dims": dict, "embed": str, "head": str, "layers": list},
    "layer": {"index": int, "kind": str, "file": str, "kv_shapes": list},
    "experts": {"spec": dict, "tensors": list, "bytes_per_expert": int, "file_pattern": str},
    "tokenizer": {"files": list, "eos_token_ids": list},
}
DIMS = ("hidden_size", "vocab_size", "num_layers", "max_position_embeddings")
MOE_DIMS = ("num_experts", "top_k", "expert_intermediate_size")


def _require(data, schema: str, where: str, path: Path) -> None:
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: {where or 'top level'} must be a mapping, got {type(data).__name__}")
    for key, kind in REQUIRED[schema].items():
        if key not in data:
            raise ManifestError(f"{path}: missing field {where + '.' if where else ''}{key}")
        if not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool)):
            raise ManifestError(f"{path}: field {where + '.' if where else ''}{key} must be {kind.__name__}, "
                                f"got {type(data[key]).__name__}")


def _model_section(data: dict, name: str, path: Path) -> ModelSection:
    _require(data, name, name, path)
    needed = DIMS + (MOE_DIMS if name == "target" else ())
    missing = [key for key in needed if not isinstance(data["dims"].get(key), int)]
    if missing:
        raise ManifestError(f"{path}: {name}.dims lacks integer field(s) {', '.join(missing)}")
    layers = []
    for i, entry in enumerate(data["layers"]):
        _require(entry, "layer", f"{name}.layers[{i}]", path)
        if entry["kind"] not in ("moe", "dense"):
            raise ManifestError(f"{path}: {name}.layers[{i}].kind is {entry['kind']!r}; valid: 'moe', 'dense'")
        layers.append(Layer(entry["index"], entry["kind"], entry["file"], entry.get("sliding_window"),
                            tuple(tuple(s) for s in entry["kv_shapes"])))
    experts = None
    if name == "target":
        raw = data["experts"]
        _require(raw, "experts", "target.experts", path)
        experts = Experts(raw["spec"], tuple(raw["tensors"]), raw["bytes_per_expert"], raw["file_pattern"])
    return ModelSection(data["architecture"], data["model_type"], data["dims"], data["embed"], data["head"],
                        tuple(layers), experts)


def load_manifest(package: str | os.PathLike) -> Manifest:
    root = Path(package)
    path = root / MANIFEST
    if not root.is_dir():
        raise ManifestError(f"package {root} does not exist or is not a directory (make one with spac-export)")
    if not path.is_file():
        raise ManifestError(f"{path} is missing: {root} is not a spac package (make one with spac-export)")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path} is not valid YAML: {error}") from None
    _require(data, "", "", path)
    if data["schema_version"] != SCHEMA_VERSION:
        raise ManifestError(f"{path}: schema_version {data['schema_version']} is not supported; this runtime "
                            f"reads version {SCHEMA_VERSION} (re-export the package with this spac-export)")
    _require(data["tokenizer"], "tokenizer", "tokenizer", path)
    draft = _model_section(data["draft"], "draft", path) if data.get("draft") else None
    return Manifest(root, data, _model_section(data["target"], "target", path), draft)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_file(manifest: Manifest, name: str, data: bytes | None = None) -> None:
    """Check one package file against its recorded size and sha256 (from `data` when the caller
    already read it, so paging in an expert hashes the bytes it read instead of reading twice)."""
    entry = manifest.files.get(name)
    if entry is None:
        raise ManifestError(f"{manifest.root / MANIFEST}: file {name} is not listed under files")
    path = manifest.root / name
    if data is None:
        if not path.is_file():
            raise ManifestError(f"package file {path} is missing")
        size = path.stat().st_size
    else:
        size = len(data)
    if size != entry["bytes"]:
        raise ManifestError(f"package file {path} has {size} bytes, the manifest says {entry['bytes']}: "
                            "the package is corrupt or incomplete (re-export it)")
    digest = sha256_file(path) if data is None else hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise ManifestError(f"package file {path} fails its sha256 check: the package is corrupt (re-export it)")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    write_atomic(Path(package) / MANIFEST, yaml.safe_dump(data, sort_keys=False).encode())


# Where a routed expert's files live in a package, without the extension (.onnx, .data).
EXPERT_FILE_PATTERN = "target/experts/L{layer:03d}/E{expert:04d}"


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
