"""Build a spac package from a Hugging Face MoE model directory and a draft directory.

Everything is written into a temporary folder beside the output and renamed into place at the
end, so a failed export leaves nothing behind and an existing package is replaced whole. Only a
spac package (or an empty folder) is ever replaced, and never the model or draft directory or a
folder holding them. The temporary folders carry the exporting process's pid, so a later export
can tell the ones a killed export left behind from those of an export still running.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

from spac.ops.expert_graph import build_expert_graph, expert_matrices, expert_tensors
from spac.ops.quantization import DEFAULT_BLOCK_SIZE, BlockQuantization
from spac.runtime.manifest import (DRAFT_EXPERT_FILE_PATTERN, EXPERT_FILE_PATTERN, MANIFEST, PRODUCER, current_umask,
                                  write_package_manifest)

from .checkpoint import StreamedModel, refuse_quantized
from .families import ExportError, Family, family_for
from .quantize import KINDS, expert_arrays, fake_quantize_experts, fake_quantize_trunk, quantization_for
from .trunk import export_trunk

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
log = logging.getLogger("spac.export")


@dataclass
class ExportOptions:
    model_dir: Path
    draft_dir: Path | None  # None: a package without a draft model
    output: Path
    dtype: str = "float32"
    force: bool = False
    verify: bool = True
    progress: bool = True
    experts: str = "float"  # or "int8", "int4": the routed experts' weights (spac.export.quantize)
    trunk: str = "float"  # the same for the target's trunk matmuls
    block_size: int = DEFAULT_BLOCK_SIZE
    symmetric: bool = False
    draft_experts: str | None = None  # "int4", "int8": also a copy of every expert so quantized, to self-draft with


@dataclass
class ExportResult:
    output: Path
    manifest: dict
    seconds: float
    verification: dict = field(default_factory=dict)


def read_config(path: Path, role: str):
    """The model's config, or one clear ExportError saying why it cannot be used."""
    from transformers import AutoConfig

    if not path.exists():
        raise ExportError(f"{role} directory {path} does not exist")
    if not path.is_dir() or not os.access(path, os.R_OK | os.X_OK):
        raise ExportError(f"{role} path {path} is not a readable directory")
    if not (path / "config.json").is_file():
        raise ExportError(f"{role} directory {path} has no config.json: expected a Hugging Face model "
                          "directory saved with save_pretrained")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, OSError, json.JSONDecodeError) as error:
        model_type = _declared_model_type(path)
        if model_type is not None:  # a model_type transformers does not know: name the supported ones
            family_for(SimpleNamespace(model_type=model_type), draft=role == "draft")
        raise ExportError(f"{path / 'config.json'} cannot be read as a transformers config: {error}") from None
    architectures = getattr(config, "architectures", None) or []
    if not any(name.endswith("ForCausalLM") for name in architectures):
        raise ExportError(f"{role} {path} is not a causal language model (architectures: {architectures or 'none'}); "
                          "expected a *ForCausalLM architecture")
    return config


def _declared_model_type(path: Path) -> str | None:
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (ValueError, OSError, AttributeError):
        return None
    return model_type if isinstance(model_type, str) else None


def check_output(output: Path, force: bool, model_dir: Path, draft_dir: Path | None) -> None:
    """Refuse an output the export must not create or replace; `output` is absolute."""
    if not output.name:
        raise ExportError(f"output {output} has no folder name; give the package folder to create, "
                          "e.g. -o packages/NAME")
    if output.is_symlink():
        raise ExportError(f"output {output} is a symbolic link; give the folder itself")
    resolved = output.resolve()
    for role, source in (("model", model_dir), ("draft", draft_dir)):
        if source is None:
            continue
        source = source.resolve()
        if source == resolved or resolved in source.parents:
            relation = "is" if source == resolved else "contains"
            raise ExportError(f"output {output} {relation} the {role} directory {source}; the output is replaced "
                              "whole, so choose another -o")
    if output.exists():
        if not output.is_dir():
            raise ExportError(f"output {output} is a file, not a folder; choose another -o")
        if not force:
            raise ExportError(f"output {output} already exists; pass --force to replace it")
        if any(output.iterdir()) and not _is_spac_package(output):
            raise ExportError(f"output {output} is not a spac package (no {MANIFEST} with producer: {PRODUCER} "
                              "and a schema_version); --force replaces only a package spac-export wrote, "
                              "so choose another -o")
    parent = output.parent
    if not parent.is_dir():
        raise ExportError(f"output folder {parent} " + ("is not a directory" if parent.exists() else "does not exist"))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"output folder {parent} is not writable")


def _is_spac_package(folder: Path) -> bool:
    """Whether `folder` holds a manifest written by spac-export, of any schema version."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        with open(manifest, "rb") as file:
            data = yaml.load(file, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, ValueError, RecursionError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and data.get("producer") == PRODUCER and isinstance(data.get("schema_version"), int)


def remove_stale_exports(output: Path) -> list[str]:
    """Remove the folders killed exports of `output` left beside it (`.NAME.partial-PID-*` and
    `.NAME.old-PID`) whose process is gone; returns their names."""
    pattern = re.compile(rf"\.{re.escape(output.name)}\.(?:partial-([0-9]{{1,10}})-.+|old-([0-9]{{1,10}}))")
    removed = []
    for entry in sorted(output.parent.iterdir()):
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _running(int(match[1] or match[2])):
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed.append(entry.name)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or not a pid this system has
        return True
    return True


def check_vocabularies(model_dir: Path, draft_dir: Path, config, draft_config) -> None:
    if config.vocab_size != draft_config.vocab_size:
        raise ExportError(f"the draft's vocabulary ({draft_config.vocab_size} tokens, {draft_dir}) differs from the "
                          f"target's ({config.vocab_size} tokens, {model_dir}); the draft must share the tokenizer")
    vocabularies = [_tokenizer_vocab(d) for d in (model_dir, draft_dir)]
    if None not in vocabularies and vocabularies[0] != vocabularies[1]:
        raise ExportError(f"the draft's tokenizer ({draft_dir}) differs from the target's ({model_dir}): "
                          "speculative decoding needs the same token ids")


def _tokenizer_vocab(path: Path):
    file = path / "tokenizer.json"
    return json.loads(file.read_text())["model"].get("vocab") if file.is_file() else None


def load_model(path: Path, dtype: str, family: Family, config) -> StreamedModel:
    """The model's skeleton, its checkpoint opened and checked; weights are read part by part."""
    refuse_quantized(path, config)
    return StreamedModel(path, config, TORCH_DTYPES[dtype], family)


def load_reference(path: Path, dtype: str, family: Family):
    """The whole model in memory through transformers, for the final comparison."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=TORCH_DTYPES[dtype], attn_implementation=family.attention)
    return model.eval()


def fake_quantize_reference(family: Family, model, moe_layers: list[int], experts: BlockQuantization | None,
                            trunk: BlockQuantization | None) -> None:
    """Give the reference the package's quantized weights (see quantize.py), so the check
    compares the export with what it should compute."""
    if experts:
        fake_quantize_experts(family, model, moe_layers, experts)
    if trunk:
        fake_quantize_trunk(family, model, trunk)


def mismatch(verification: dict) -> str:
    """The failed check's differences and their tolerances, in words."""
    words = (f"max abs difference target {verification['target_max_abs_diff']:.3g} "
             f"(tolerance {verification['target_tolerance']:.2g})")
    if verification["draft_max_abs_diff"] is not None:
        words += f", draft {verification['draft_max_abs_diff']:.3g} (tolerance {verification['tolerance']:g})"
    return words


def model_section(family: Family, model, trunk: dict, prefix: str) -> dict:
    config = model.config
    dims = {"hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
            "num_layers": config.num_hidden_layers, "max_position_embeddings": config.max_position_embeddings}
    if family.moe:
        dims.update(family.moe_dims(config))
    for layer in trunk["layers"]:
        for graph in ("file", "post_experts"):
            if graph in layer:
                layer[graph] = f"{prefix}/{layer[graph]}"
    return {"architecture": config.architectures[0], "model_type": config.model_type, "dims": dims,
            "embed": f"{prefix}/{trunk['embed']}", "head": f"{prefix}/{trunk['head']}", "layers": trunk["layers"]}


def export_experts(family: Family, source: StreamedModel, root: Path, dtype: str, moe_layers: list[int], bar,
                   quantization: BlockQuantization | None = None,
                   draft_quantization: BlockQuantization | None = None) -> tuple[dict, dict | None]:
    """One .onnx + .data pair per routed expert, each read from the checkpoint alone (and
    block-quantized with `quantization`) and written straight out, so memory holds one expert at
    a time. The graph is the same for every expert of a layer: built once per shape, it names
    its own expert's .data file. With `draft_quantization`, each expert read is also written so
    quantized as its draft copy (what a self-draft holds). Returns the manifest's `experts` and
    `draft_experts` entries (None without draft copies)."""
    config = source.config
    dims = family.moe_dims(config)
    spec = family.expert_spec(config)
    hidden, intermediate = config.hidden_size, dims["expert_intermediate_size"]
    forms = {EXPERT_FILE_PATTERN: quantization}
    if draft_quantization is not None:
        forms[DRAFT_EXPERT_FILE_PATTERN] = draft_quantization
    tensors = {pattern: expert_tensors(spec["variant"], hidden, intermediate, dtype, q) for pattern, q in forms.items()}
    for layer in moe_layers:
        for pattern in forms:
            (root / pattern.format(layer=layer, expert=0)).parent.mkdir(parents=True)
        for expert in range(dims["num_experts"]):
            with source.expert(layer, expert) as experts:
                weights = family.expert_weights(experts, 0)
                for pattern, q in forms.items():
                    base = root / pattern.format(layer=layer, expert=expert)
                    arrays = expert_arrays(weights, q)
                    with open(base.with_suffix(".data"), "wb") as out:
                        for tensor in tensors[pattern]:
                            out.write(arrays[tensor.name].astype(tensor.dtype, copy=False).tobytes())
                    graph = build_expert_graph(spec, hidden, intermediate, dtype, data_file=base.name + ".data",
                                               quantization=q)
                    base.with_suffix(".onnx").write_bytes(graph.SerializeToString())
            bar.update(1)
    # Each entry its own mapping: a shared one would be written as a YAML alias
    entries = {pattern: {"spec": dict(spec), "tensors": [t.manifest_entry() for t in tensors[pattern]],
                         "bytes_per_expert": sum(t.nbytes for t in tensors[pattern]), "file_pattern": pattern,
                         "quantization": q.as_dict() if q else None}
               for pattern, q in forms.items()}
    return entries[EXPERT_FILE_PATTERN], entries.get(DRAFT_EXPERT_FILE_PATTERN)


def check_expert_blocks(family: Family, config, quantization: BlockQuantization | None, flag: str) -> None:
    """Refuse, before anything is loaded, a block size that does not divide an expert weight's
    input dimension."""
    if quantization is None:
        return
    matrices = expert_matrices(config.hidden_size, family.moe_dims(config)["expert_intermediate_size"])
    for name, (k, n) in matrices.items():
        refusal = quantization.refusal(k)
        if refusal:
            raise ExportError(f"{flag} {quantization.name} --block-size {quantization.block_size}: the experts' "
                              f"{name} [{k}, {n}] cannot be quantized: {refusal} (valid block sizes divide {k})")


def check_draft_copies(experts: BlockQuantization | None, copies: BlockQuantization | None) -> None:
    """Draft copies are worth holding only in fewer bits than the experts themselves."""
    if copies is not None and experts is not None and copies.bits >= experts.bits:
        narrower = [kind for kind, bits in KINDS.items() if bits < experts.bits]
        raise ExportError(f"--draft-experts {copies.name} is not narrower than --experts {experts.name}: draft copies "
                          f"must take fewer bits than the experts (valid here: {', '.join(narrower) or 'none'})")


def tokenizer_section(model_dir: Path, root: Path, model_config) -> dict:
    files = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    if "tokenizer.json" not in files:
        raise ExportError(f"{model_dir} has no tokenizer.json: the runtime needs a fast (tokenizers) tokenizer")
    (root / "tokenizer").mkdir()
    for name in files:
        shutil.copyfile(model_dir / name, root / "tokenizer" / name)
    config = json.loads((model_dir / "tokenizer_config.json").read_text()) if "tokenizer_config.json" in files else {}
    template = config.get("chat_template")
    if "chat_template.jinja" in files:
        template = (model_dir / "chat_template.jinja").read_text()
    eos = _generation_config(model_dir, model_config).eos_token_id
    eos = eos if eos is not None else model_config.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return {"files": [f"tokenizer/{name}" for name in files], "eos_token_ids": eos_ids,
            "bos_token_id": model_config.bos_token_id, "chat_template": template,
            "bos_token": config.get("bos_token"), "eos_token": config.get("eos_token"),
            "generation": generation_defaults(model_dir)}


def _generation_config(model_dir: Path, config):
    """generation_config.json as from_pretrained reads it, else the one the config implies."""
    from transformers import GenerationConfig

    if (model_dir / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(model_dir)
    return GenerationConfig.from_model_config(config)


# generation_config.json's keys the runtime's sampler reads as its defaults.
GENERATION_KEYS = ("do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_defaults(model_dir: Path) -> dict:
    """The sampling values the model's generation_config.json sets (none when it has no file)."""
    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    return {key: config[key] for key in GENERATION_KEYS if config.get(key) is not None}


@contextmanager
def transformers_progress_bars(enabled: bool):
    """transformers' own bars ("Loading weights" of the reference models) follow the export's
    --quiet, and come back as they were after it."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    (transformers_logging.enable_progress_bar if enabled else transformers_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (transformers_logging.enable_progress_bar if was_enabled else transformers_logging.disable_progress_bar)()


def export_package(options: ExportOptions, verify_fn=None) -> ExportResult:
    """The whole export. `verify_fn(package_dir, model, draft)` returns the verification report.
    Without a draft directory the package has `draft: null` and no draft graphs."""
    from tqdm import tqdm

    started = time.perf_counter()
    model_dir = Path(options.model_dir)
    draft_dir = Path(options.draft_dir) if options.draft_dir is not None else None
    output = Path(os.path.abspath(options.output))  # "-o ." and "-o pkg/.." name their folder
    if options.dtype not in TORCH_DTYPES:
        raise ExportError(f"--dtype {options.dtype!r} is not supported; valid: {', '.join(TORCH_DTYPES)}")
    expert_quantization = quantization_for(options.experts, options.block_size, options.symmetric, "--experts")
    trunk_quantization = quantization_for(options.trunk, options.block_size, options.symmetric, "--trunk")
    draft_quantization = quantization_for(options.draft_experts, options.block_size, options.symmetric,
                                          "--draft-experts")
    check_draft_copies(expert_quantization, draft_quantization)
    check_output(output, options.force, model_dir, draft_dir)
    config = read_config(model_dir, "model")
    family = family_for(config, draft=False)
    if draft_dir is not None:
        draft_config = read_config(draft_dir, "draft")
        draft_family = family_for(draft_config, draft=True)
        check_vocabularies(model_dir, draft_dir, config, draft_config)
    check_expert_blocks(family, config, expert_quantization, "--experts")
    check_expert_blocks(family, config, draft_quantization, "--draft-experts")

    removed = remove_stale_exports(output)
    if removed:
        log.warning("removed %d folders left by killed exports of %s: %s", len(removed), output.name,
                    ", ".join(removed))
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-{os.getpid()}-", dir=output.parent))
    with ExitStack() as sources:
        try:
            sources.enter_context(transformers_progress_bars(options.progress))
            tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the package should not be
            model = sources.enter_context(closing(load_model(model_dir, options.dtype, family, config)))
            draft = (sources.enter_context(closing(load_model(draft_dir, options.dtype, draft_family, draft_config)))
                     if draft_dir is not None else None)
            moe_layers = [i for i, layer in enumerate(model.model.model.layers) if family.is_moe_layer(layer)]
            if not moe_layers:
                raise ExportError(f"{model_dir} has no Mixture-of-Experts layer; spac needs an MoE target model")
            num_experts = family.moe_dims(config)["num_experts"]
            models = [("target", family, model, trunk_quantization)]
            models += [("draft", draft_family, draft, None)] if draft is not None else []
            total = sum(source.config.num_hidden_layers for _, _, source, _ in models) + len(moe_layers) * num_experts
            with tqdm(total=total, desc="export", unit="part", disable=not options.progress) as bar:
                sections = {"draft": None}
                for name, fam, source, quantization in models:
                    (tmp / name).mkdir()
                    trunk = export_trunk(fam, source, tmp / name, lambda label: bar.update(1), quantization)
                    sections[name] = model_section(fam, source.model, trunk, name)
                experts, copies = export_experts(family, model, tmp, options.dtype, moe_layers, bar,
                                                 expert_quantization, draft_quantization)
                sections["target"]["experts"] = experts
                if copies is not None:
                    sections["target"]["draft_experts"] = copies
                sections["target"]["trunk_quantization"] = trunk_quantization.as_dict() if trunk_quantization else None
            tokenizer = tokenizer_section(model_dir, tmp, config)
            source_names = {"model": model_dir.resolve().name, "draft": draft_dir.resolve().name if draft_dir else None}
            manifest = write_package_manifest(tmp, source_names, options.dtype, tokenizer, **sections)
            verification = {}
            if options.verify and verify_fn:
                reference = load_reference(model_dir, options.dtype, family)
                fake_quantize_reference(family, reference, moe_layers, expert_quantization, trunk_quantization)
                verification = verify_fn(tmp, reference,
                                         load_reference(draft_dir, options.dtype, draft_family) if draft_dir else None)
            if verification and not verification["passed"]:
                raise ExportError(f"the exported graphs do not reproduce the model's logits: {mismatch(verification)}; "
                                  "nothing was written")
            _replace(tmp, output)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return ExportResult(output, manifest, time.perf_counter() - started, verification)


def _replace(tmp: Path, output: Path) -> None:
    """Move the finished package into place; an existing one (--force) is swapped out whole."""
    if not output.exists():
        os.rename(tmp, output)
        return
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    os.rename(output, old)
    os.rename(tmp, output)
    shutil.rmtree(old, ignore_errors=True)
