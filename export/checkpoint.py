"""A model directory's weights, read tensor by tensor from its safetensors files into a model
skeleton built without weights, one part (a decoder layer's trunk, one routed expert) at a time.

The skeleton is the transformers model built on the meta device, so it holds the model's own
modules but no memory. A part is filled through transformers' own loading code
(`convert_and_load_state_dict_in_model` with the model's conversion mapping), so checkpoint
layouts transformers converts on load come out as its in-memory modules: per-expert tensors on
disk (`experts.{e}.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.{e}.w1.weight`) are
stacked into the fused `experts.gate_up_proj`, renamed tensors are renamed, and every tensor is
cast from the checkpoint's dtype (bf16, fp16, fp32) to the export's. Routed experts are filled
one at a time: the experts module's fused parameters are given a leading dimension of 1 and fed
that expert's tensors only (a fused tensor on disk, as GPT-OSS stores them, is read as the slice
of that expert), so memory holds one expert, never a layer's experts.

Before any tensor is read the whole checkpoint is checked the same way with meta tensors of the
shapes the safetensors headers declare: a missing tensor, one whose shape differs from what
config.json implies, a shard the index names that is absent, a truncated or corrupt shard, and a
quantized checkpoint are each refused in one line.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .families import ExportError, Family

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FLOAT_DTYPES = ("BF16", "F16", "F32")
log = logging.getLogger("spac.export")


class Checkpoint:
    """The safetensors shards of a model directory: which shard holds each tensor, read lazily."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        self._stack = ExitStack()
        try:
            index = _index(self.dir)
            self._files = {shard: self._open(shard) for shard in sorted(set(index.values()) if index else [SINGLE])}
            self.shard_of = index or dict.fromkeys(self._files[SINGLE].keys(), SINGLE)
            self._check()
        except BaseException:
            self.close()
            raise

    def _open(self, shard: str):
        path = self.dir / shard
        try:
            # pread, not mmap: pages of a mapped checkpoint stay in the process's resident set
            # while it is open, so RSS would grow with every tensor read (page cache, but counted).
            return self._stack.enter_context(safe_open(path, framework="pt", backend="pread"))
        except (SafetensorError, OSError) as error:
            raise ExportError(f"checkpoint shard {path} is truncated or corrupt ({_first_line(error)}); "
                              "download or save the model again") from None

    def _check(self) -> None:
        """Every tensor is where the index says, and of a float dtype."""
        held = {shard: set(file.keys()) for shard, file in self._files.items()}
        for name, shard in self.shard_of.items():
            if name not in held[shard]:
                raise ExportError(f"{self.dir / INDEX} says tensor {name} is in {shard}, which does not hold it; "
                                  "the index and the shards are from different saves")
        for shard, file in self._files.items():
            for name in sorted(held[shard]):
                dtype = file.get_slice(name).get_dtype()
                if dtype not in FLOAT_DTYPES:
                    raise ExportError(f"tensor {name} in {self.dir / shard} is {dtype}; spac exports float "
                                      f"checkpoints ({', '.join(FLOAT_DTYPES)}): dequantize the model first")

    def names(self) -> list[str]:
        return sorted(self.shard_of)

    def slice(self, name: str):
        """The tensor as a lazy safetensors slice: `[...]` or `[a:b]` reads only those bytes."""
        return self._files[self.shard_of[name]].get_slice(name)

    def meta(self, name: str) -> torch.Tensor:
        """A meta tensor of the tensor's shape and dtype, read from the shard's header only."""
        view = self.slice(name)
        return torch.empty(view.get_shape(), dtype=_TORCH_DTYPES[view.get_dtype()], device="meta")

    def close(self) -> None:
        self._stack.close()


_TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _last_line(text) -> str:
    """The error itself from a traceback transformers recorded as text."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


def _index(model_dir: Path) -> dict[str, str] | None:
    """tensor name -> shard file name from model.safetensors.index.json; None for a single
    model.safetensors."""
    index = model_dir / INDEX
    if not index.is_file():
        if not (model_dir / SINGLE).is_file():
            raise ExportError(f"{model_dir} has neither {SINGLE} nor {INDEX}; spac reads safetensors checkpoints "
                              "(save the model with save_pretrained)")
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ExportError(f"{index} is not a safetensors index with a weight_map ({_first_line(error)})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ExportError(f"{index}: weight_map must map tensor names to shard file names")
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise ExportError(f"{index} names shard {shard!r}, which is not a file name in the model directory")
        if not (model_dir / shard).is_file():
            raise ExportError(f"{index} names shard {shard}, which is absent from {model_dir}")
    return dict(weight_map)


def refuse_quantized(model_dir: Path, config) -> None:
    """A checkpoint stored quantized (GPT-OSS as published: MXFP4 experts) is refused in one line."""
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else \
            getattr(quantization, "quant_method", None)
        raise ExportError(f"{model_dir / 'config.json'} has a quantization_config (quant_method {method!r}): "
                          "the checkpoint stores quantized weights (e.g. GPT-OSS's MXFP4 experts as *_blocks and "
                          "*_scales tensors); spac exports float checkpoints (bf16, fp16, fp32): dequantize it first")


class StreamedModel:
    """A transformers causal LM on the meta device whose parts are filled from a Checkpoint on demand.

    `part(prefixes)` fills the modules under those prefixes for the duration of a `with` block and
    returns them to the meta device after, so memory holds one part at a time. `expert(layer, e)`
    yields a stand-in for layer `layer`'s experts module holding expert `e` alone (index 0)."""

    def __init__(self, model_dir: Path, config, dtype: torch.dtype, family: Family):
        from transformers import AutoModelForCausalLM
        from transformers.conversion_mapping import get_model_conversion_mapping

        self.dir = Path(model_dir)
        self.dtype = dtype
        self.family = family
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=family.attention)
        self.model = model.eval()
        _materialize_non_persistent_buffers(model)
        self.checkpoint = Checkpoint(self.dir)
        try:
            self.mapping = get_model_conversion_mapping(model)
            self.sources = self._sources()
            self._check()
        except BaseException:
            self.checkpoint.close()
            raise

    @property
    def config(self):
        return self.model.config

    def close(self) -> None:
        self.checkpoint.close()

    # --- which checkpoint tensors feed which parameter ------------------------------------------

    def _sources(self) -> dict[str, list[tuple[str, str | None]]]:
        """target parameter -> [(checkpoint tensor, converter source pattern or None)]."""
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        renamings = [entry for entry in self.mapping if isinstance(entry, WeightRenaming)]
        converters = [entry for entry in self.mapping if isinstance(entry, WeightConverter)]
        expected = self.model.state_dict()
        sources = defaultdict(list)
        for name in self.checkpoint.names():
            target, pattern = rename_source_key(name, renamings, converters, self.model.base_model_prefix, expected)
            if target not in expected and name in expected:
                target, pattern = name, None
            if target in expected:
                sources[target].append((name, pattern))
            else:
                log.debug("checkpoint tensor %s is not a parameter of the model; ignored", name)
        return dict(sources)

    def _check(self) -> None:
        """Every parameter has its tensors, of the shapes config.json implies: checked with meta
        tensors from the shards' headers, through the same conversion as the real load."""
        names = [name for sources in self.sources.values() for name, _ in sources]
        info = self._load({name: self.checkpoint.meta(name) for name in names}, device="meta")
        if info.conversion_errors:  # e.g. an expert's tensor missing: the experts do not stack
            target, error = sorted(info.conversion_errors.items())[0]
            raise ExportError(f"checkpoint {self.dir}: {target} cannot be built from {self._source_names(target)} "
                              f"({_last_line(error)}); the checkpoint is incomplete or belongs to "
                              "another config")
        if info.mismatched_keys:
            target, got, wanted = sorted(info.mismatched_keys)[0]
            raise ExportError(f"checkpoint {self.dir}: {target} (from {self._source_names(target)}) has shape "
                              f"{list(got)}, config.json implies {list(wanted)}")
        missing = sorted(set(info.missing_keys) - set(self.model.all_tied_weights_keys))
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ExportError(f"checkpoint {self.dir} has no tensor for {missing[0]}{more}; config.json's model "
                              "needs it: the checkpoint is incomplete or belongs to another config")

    def _source_names(self, target: str) -> str:
        names = [name for name, _ in self.sources.get(target, [])]
        return names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "")

    def _load(self, state_dict: dict, device: str = "cpu"):
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        from transformers.utils import logging as transformers_logging

        load_config = LoadStateDictConfig(device_map={"": device}, dtype=self.dtype, weight_mapping=self.mapping)
        bar = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()  # a bar per part would flood the terminal
        try:
            info, _ = convert_and_load_state_dict_in_model(self.model, state_dict, load_config)
        finally:
            if bar:
                transformers_logging.enable_progress_bar()
        return info

    # --- filling parts -------------------------------------------------------------------------

    @contextmanager
    def part(self, *prefixes: str):
        """Fill every parameter under `prefixes` (e.g. "model.layers.3.") except routed experts."""
        experts = self._experts_prefixes()
        targets = [t for t in self.sources
                   if t.startswith(prefixes) and not t.startswith(experts)]
        tied = {target: source for target, source in self.model.all_tied_weights_keys.items()
                if target.startswith(prefixes)}
        for source in tied.values():  # a tied head reads the embedding's tensor
            targets += [source] if source not in targets else []
        self._load({name: self.checkpoint.slice(name) for t in targets for name, _ in self.sources[t]})
        if tied:
            self.model.tie_weights()
        try:
            yield self.model
        finally:
            for prefix in prefixes:
                module = self.model.get_submodule(prefix.rstrip("."))
                module.to("meta")
            for source in tied.values():
                self.model.get_submodule(source.rsplit(".", 1)[0]).to("meta")

    def _experts_prefixes(self) -> tuple[str, ...]:
        return tuple(f"{name}." for name, module in self.model.named_modules()
                     if name.endswith(".experts") and _is_routed_experts(module))

    @contextmanager
    def expert(self, layer: int, expert: int):
        """The experts module of `layer` holding only expert `expert`, as its expert 0."""
        experts = self.family.mlp_of(self.model.model.layers[layer]).experts
        prefix = f"{self._module_name(experts)}."
        shapes = {name: param.shape for name, param in experts.named_parameters(recurse=False)}
        for name, shape in shapes.items():
            setattr(experts, name, nn.Parameter(torch.empty(1, *shape[1:], dtype=self.dtype, device="meta"),
                                                requires_grad=False))
        try:
            self._load(self._expert_tensors(prefix, list(shapes), expert))
            yield experts
        finally:
            for name, shape in shapes.items():
                setattr(experts, name, nn.Parameter(torch.empty(shape, dtype=self.dtype, device="meta"),
                                                    requires_grad=False))

    def _expert_tensors(self, prefix: str, params: list[str], expert: int) -> dict:
        """The checkpoint tensors of one expert: its own per-expert tensors, or its slice of a
        tensor that holds every expert of the layer."""
        tensors = {}
        for param in params:
            for name, pattern in self.sources[prefix + param]:
                if pattern is not None and "*" in pattern:
                    if _expert_index(name, pattern) == expert:
                        tensors[name] = self.checkpoint.slice(name)
                else:
                    tensors[name] = _ExpertSlice(self.checkpoint.slice(name), expert)
        return tensors

    def _module_name(self, module: nn.Module) -> str:
        return next(name for name, candidate in self.model.named_modules() if candidate is module)


class _ExpertSlice:
    """One expert's rows [e:e+1] of a safetensors slice holding every expert, read on `[...]`."""

    def __init__(self, view, expert: int):
        self.view, self.expert = view, expert

    def __getitem__(self, key):
        return self.view[self.expert:self.expert + 1]


def _expert_index(name: str, pattern: str) -> int | None:
    """The expert number where a converter's `*` matches in a per-expert tensor name."""
    regex = re.escape(pattern).replace(r"\*", r"(\d+)")
    match = re.search(regex, name)
    return int(match.group(1)) if match else None


def _is_routed_experts(module: nn.Module) -> bool:
    """A fused experts module: 3-d parameters with one row per expert (not a ModuleList)."""
    params = list(module.parameters(recurse=False))
    return bool(params) and all(param.dim() >= 2 for param in params)


def _materialize_non_persistent_buffers(model) -> None:
    """Buffers no checkpoint holds (rotary inverse frequencies) computed on the CPU, as
    from_pretrained does after loading on the meta device."""
    owners = {name.rsplit(".", 1)[0] if "." in name else "" for name, _ in model.named_non_persistent_buffers()}
    for owner in sorted(owners):
        module = model.get_submodule(owner)
        for name in module._non_persistent_buffers_set:
            buffer = getattr(module, name, None)
            if buffer is not None:
                setattr(module, name, torch.empty_like(buffer, device="cpu"))
        model._init_weights(module)
