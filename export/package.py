"""Build a spac package from a Hugging Face MoE model directory and a draft directory.

Everything is written into a temporary folder beside the output and renamed into place at the
end, so a failed export leaves nothing behind and an existing package is replaced whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from spac.ops.expert_graph import DTYPES, OPSET, build_expert_graph, expert_tensors
from spac.runtime.manifest import SCHEMA_VERSION, sha256_file, write_manifest

from .families import ExportError, Family, family_for
from .trunk import export_trunk

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass
class ExportOptions:
    model_dir: Path
    draft_dir: Path
    output: Path
    dtype: str = "float32"
    force: bool = False
    verify: bool = True
    progress: bool = True


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


def check_output(output: Path, force: bool) -> None:
    if output.exists() and not force:
        raise ExportError(f"output {output} already exists; pass --force to replace it")
    parent = output.parent
    if not parent.is_dir():
        raise ExportError(f"output folder {parent} " + ("is not a directory" if parent.exists() else "does not exist"))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"output folder {parent} is not writable")


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


def load_model(path: Path, dtype: str, family: Family):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=TORCH_DTYPES[dtype], attn_implementation=family.attention)
    return model.eval()


def model_section(family: Family, model, trunk: dict, prefix: str) -> dict:
    config = model.config
    dims = {"hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
            "num_layers": config.num_hidden_layers, "max_position_embeddings": config.max_position_embeddings}
    if family.moe:
        dims.update(family.moe_dims(config))
    for layer in trunk["layers"]:
        layer["file"] = f"{prefix}/{layer['file']}"
    return {"architecture": config.architectures[0], "model_type": config.model_type, "dims": dims,
            "embed": f"{prefix}/{trunk['embed']}", "head": f"{prefix}/{trunk['head']}", "layers": trunk["layers"]}


def export_experts(family: Family, model, root: Path, dtype: str, moe_layers: list[int], bar) -> dict:
    """One .onnx + .data pair per routed expert. Each expert's weights are sliced from the loaded
    layer (a view) and written straight out, so no second copy of a layer is ever held."""
    config = model.config
    dims = family.moe_dims(config)
    spec = family.expert_spec(config)
    hidden, intermediate = config.hidden_size, dims["expert_intermediate_size"]
    tensors = expert_tensors(spec["variant"], hidden, intermediate, dtype)
    pattern = "target/experts/L{layer:03d}/E{expert:04d}"
    for layer in moe_layers:
        experts = model.model.layers[layer].mlp.experts
        (root / pattern.format(layer=layer, expert=0)).parent.mkdir(parents=True)
        for expert in range(dims["num_experts"]):
            base = root / pattern.format(layer=layer, expert=expert)
            weights = family.expert_weights(experts, expert)
            with open(base.with_suffix(".data"), "wb") as out:
                for tensor in tensors:
                    out.write(weights[tensor.name].astype(DTYPES[dtype][0], copy=False).tobytes())
            graph = build_expert_graph(spec, hidden, intermediate, dtype, data_file=base.name + ".data")
            (base.with_suffix(".onnx")).write_bytes(graph.SerializeToString())
            bar.update(1)
    return {"spec": spec, "tensors": [asdict(t) | {"shape": list(t.shape)} for t in tensors],
            "bytes_per_expert": sum(t.nbytes for t in tensors), "file_pattern": pattern}


def tokenizer_section(model_dir: Path, root: Path, model) -> dict:
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
    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos = eos if eos is not None else model.config.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return {"files": [f"tokenizer/{name}" for name in files], "eos_token_ids": eos_ids,
            "bos_token_id": model.config.bos_token_id, "chat_template": template,
            "bos_token": config.get("bos_token"), "eos_token": config.get("eos_token"),
            "generation": generation_defaults(model_dir)}


# generation_config.json's keys the runtime's sampler reads as its defaults.
GENERATION_KEYS = ("do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_defaults(model_dir: Path) -> dict:
    """The sampling values the model's generation_config.json sets (none when it has no file)."""
    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    return {key: config[key] for key in GENERATION_KEYS if config.get(key) is not None}


def file_table(root: Path) -> dict:
    table = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        table[path.relative_to(root).as_posix()] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return table


def export_package(options: ExportOptions, verify_fn=None) -> ExportResult:
    """The whole export. `verify_fn(package_dir, model, draft)` returns the verification report."""
    from tqdm import tqdm

    started = time.perf_counter()
    model_dir, draft_dir, output = Path(options.model_dir), Path(options.draft_dir), Path(options.output)
    if options.dtype not in TORCH_DTYPES:
        raise ExportError(f"--dtype {options.dtype!r} is not supported; valid: {', '.join(TORCH_DTYPES)}")
    config, draft_config = read_config(model_dir, "model"), read_config(draft_dir, "draft")
    family, draft_family = family_for(config, draft=False), family_for(draft_config, draft=True)
    check_vocabularies(model_dir, draft_dir, config, draft_config)
    check_output(output, options.force)

    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the package should not be
    try:
        model, draft = load_model(model_dir, options.dtype, family), load_model(draft_dir, options.dtype, draft_family)
        moe_layers = [i for i, layer in enumerate(model.model.layers) if family.is_moe_layer(layer)]
        if not moe_layers:
            raise ExportError(f"{model_dir} has no Mixture-of-Experts layer; spac needs an MoE target model")
        num_experts = family.moe_dims(config)["num_experts"]
        total = config.num_hidden_layers + draft_config.num_hidden_layers + len(moe_layers) * num_experts
        with tqdm(total=total, desc="export", unit="part", disable=not options.progress) as bar:
            sections = {}
            for name, fam, mdl in (("target", family, model), ("draft", draft_family, draft)):
                (tmp / name).mkdir()
                trunk = export_trunk(fam, mdl, tmp / name, lambda label: bar.update(1))
                sections[name] = model_section(fam, mdl, trunk, name)
            sections["target"]["experts"] = export_experts(family, model, tmp, options.dtype, moe_layers, bar)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "producer": "moe-spac",
            "source": {"model": model_dir.resolve().name, "draft": draft_dir.resolve().name},
            "dtype": options.dtype,
            "opset": OPSET,
            "tokenizer": tokenizer_section(model_dir, tmp, model),
            **sections,
            "files": file_table(tmp),
        }
        write_manifest(tmp, manifest)
        verification = verify_fn(tmp, model, draft) if (options.verify and verify_fn) else {}
        if verification and not verification["passed"]:
            raise ExportError(f"the exported graphs do not reproduce the model's logits: max abs difference "
                              f"{max(verification['target_max_abs_diff'], verification['draft_max_abs_diff']):.3g} "
                              f"> tolerance {verification['tolerance']:g}; nothing was written")
        _replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(output, manifest, time.perf_counter() - started, verification)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace(tmp: Path, output: Path) -> None:
    """Move the finished package into place; an existing one (--force) is swapped out whole."""
    if not output.exists():
        os.rename(tmp, output)
        return
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    os.rename(output, old)
    os.rename(tmp, output)
    shutil.rmtree(old, ignore_errors=True)
