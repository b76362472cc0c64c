"""A memory testbed: a trained MoE model widened so that its experts have realistic bytes and
FLOPs while everything it computes stays the same.

A small model trained here has real routing and a draft that is really accepted, but its experts
are a fraction of a megabyte: paging them says little about a device streaming 10 MB experts
from flash. `widen_experts` grows every routed expert's intermediate dimension from I to I' by
appending I' - I neurons whose gate and up weights are random (so reading and multiplying them
costs what a real expert of that width costs) and whose down-projection weights are zero. A
new neuron's output, silu(gate) * up, is multiplied by those zeros, so each expert returns what
it returned before, up to the order the wider matrix product adds its (zero) terms in: tokens,
routing and draft acceptance are the trained model's (the tests compare greedy tokens with
transformers). It is a testbed for memory and bandwidth, not a model with more capacity.

Only the fused `gate_up` expert layout (gate_up_proj [E, 2I, H], down_proj [E, H, I]: Qwen3-MoE,
Qwen2-MoE, OLMoE, ...) is supported.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

INTERMEDIATE_FIELDS = ("moe_intermediate_size", "intermediate_size")  # first present wins
WEIGHT_FILES = (".safetensors", ".bin", ".index.json")  # the old weights and their shard index stay behind


class WideningError(ValueError):
    """A model this widening does not apply to."""


def _intermediate_field(config) -> str:
    for name in INTERMEDIATE_FIELDS:
        if getattr(config, name, None):
            return name
    raise WideningError(f"config {config.model_type!r} has none of {', '.join(INTERMEDIATE_FIELDS)}")


def _widen_pair(gate_up: torch.Tensor, down: torch.Tensor, width: int, generator: torch.Generator):
    """gate_up [E, 2I, H], down [E, H, I] -> [E, 2I', H], [E, H, I']: new neurons appended after
    the old ones in both the gate and the up half, their down columns zero."""
    experts, double, hidden = gate_up.shape
    old = double // 2
    extra = width - old
    scale = float(gate_up.float().std())  # new neurons look like the trained ones to the kernel
    new_rows = torch.randn(experts, 2, extra, hidden, generator=generator, dtype=torch.float32) * scale
    gate, up = gate_up.reshape(experts, 2, old, hidden).unbind(1)
    wide_gate_up = torch.cat([gate, new_rows[:, 0].to(gate.dtype), up, new_rows[:, 1].to(up.dtype)], dim=1)
    wide_down = torch.cat([down, down.new_zeros(experts, down.shape[1], extra)], dim=2)
    return wide_gate_up.contiguous(), wide_down.contiguous()


@dataclass(frozen=True)
class Widened:
    path: Path
    experts: int  # routed experts in the model (layers x experts per layer)
    expert_bytes: int  # one widened expert's weights


def widen_experts(model_dir, out_dir, width: int, seed: int = 0) -> Widened:
    """Write `model_dir` with every routed expert widened to `width` neurons into `out_dir`
    (a normal Hugging Face model directory, save_pretrained; built beside it and renamed into
    place, so an existing `out_dir` must be empty or absent)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    field = _intermediate_field(model.config)
    old = getattr(model.config, field)
    if width <= old:
        raise WideningError(f"width {width} must exceed the model's {field} of {old}")
    state = model.state_dict()
    expert_prefixes = [name.removesuffix(".gate_up_proj") for name, tensor in state.items()
                       if name.endswith("experts.gate_up_proj") and tensor.dim() == 3]
    if not expert_prefixes:
        raise WideningError(f"{model_dir}: no fused experts.gate_up_proj [E, 2I, H] tensors; only that layout "
                           "can be widened")
    generator = torch.Generator().manual_seed(seed)
    for prefix in expert_prefixes:
        gate_up, down = state[prefix + ".gate_up_proj"], state[prefix + ".down_proj"]
        if gate_up.shape[1] != 2 * old or down.shape[2] != old:
            raise WideningError(f"{prefix}: gate_up_proj {tuple(gate_up.shape)} / down_proj {tuple(down.shape)} "
                               f"do not match {field}={old} in the [E, 2I, H] / [E, H, I] layout")
        state[prefix + ".gate_up_proj"], state[prefix + ".down_proj"] = _widen_pair(gate_up, down, width, generator)
    config = AutoConfig.from_pretrained(model_dir)
    setattr(config, field, width)
    wide = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    wide.load_state_dict(state, strict=True)
    wide.generation_config = model.generation_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    os.chmod(partial, 0o755)  # a model folder, not a secret
    try:
        wide.save_pretrained(partial)
        for source in model_dir.iterdir():  # the tokenizer and anything else save_pretrained does not write
            if source.is_file() and not source.name.endswith(WEIGHT_FILES) and not (partial / source.name).exists():
                shutil.copy2(source, partial / source.name)
        os.replace(partial, out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    experts = sum(state[prefix + ".gate_up_proj"].shape[0] for prefix in expert_prefixes)
    one = sum(state[prefix + name][0].numel() * state[prefix + name].element_size()
              for name in (".gate_up_proj", ".down_proj") for prefix in expert_prefixes[:1])
    return Widened(out_dir, experts, one)
