"""What differs between model families: where the router and shared experts sit, how routed
expert weights are laid out, and which layers use a sliding attention window.

Everything else (attention, norms, rotary embeddings) is the model's own module and is exported
as it is. Adding a family means adding one `Family` entry here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .attention import NAME as ATTENTION


class ExportError(Exception):
    """Bad input to the exporter: the message says what is wrong and what would be valid."""


@dataclass(frozen=True)
class Family:
    model_type: str
    router_attr: str = "gate"
    # Expert weights stored [E, H, 2I] with gate/up interleaved, biases, clamped SwiGLU (GPT-OSS).
    oss_experts: bool = False
    # Layer types come from config.layer_types, or every layer uses config.sliding_window.
    window_from_layer_types: bool = False
    window_for_all_layers: bool = False
    moe: bool = True
    # The attention implementation the trunk is exported with: spac's grouped eager attention
    # (reads the cache once per key/value head, see attention.py) or transformers' "eager", for
    # GPT-OSS's attention sinks.
    attention: str = ATTENTION
    notes: str = field(default="", compare=False)

    def is_moe_layer(self, layer: nn.Module) -> bool:
        return hasattr(layer.mlp, "experts")

    def router(self, mlp: nn.Module) -> nn.Module:
        return getattr(mlp, self.router_attr)

    def route(self, router: nn.Module, flat: torch.Tensor):
        """Top-k expert ids and weights [T, k], exactly as the model's router computes them."""
        _, weights, ids = router(flat)
        return ids, weights

    def shared_modules(self, mlp: nn.Module) -> nn.ModuleDict:
        """The always-on experts of a MoE block, empty when the family has none."""
        parts = {name: getattr(mlp, name) for name in ("shared_expert", "shared_expert_gate", "shared_experts")
                 if hasattr(mlp, name)}
        return nn.ModuleDict(parts)

    @staticmethod
    def shared_output(shared: nn.ModuleDict, flat: torch.Tensor) -> torch.Tensor:
        if "shared_experts" in shared:  # DeepSeek
            return shared["shared_experts"](flat)
        # Qwen2-MoE: a sigmoid-gated shared expert
        return torch.sigmoid(shared["shared_expert_gate"](flat)) * shared["shared_expert"](flat)

    def sliding_window(self, config, index: int) -> int | None:
        if self.window_from_layer_types and getattr(config, "layer_types", None):
            return config.sliding_window if config.layer_types[index] == "sliding_attention" else None
        if self.window_for_all_layers:
            return getattr(config, "sliding_window", None)
        return None

    def expert_weights(self, experts: nn.Module, expert: int) -> dict[str, np.ndarray]:
        """One expert's tensors in the layout of spac.ops.expert_graph: x @ w_gate_up -> [gate | up],
        then act(gate) * up @ w_down. Views where possible: no copy of the layer is made."""
        if self.oss_experts:
            gate_up = experts.gate_up_proj[expert]  # [H, 2I], gate and up interleaved by column
            bias = experts.gate_up_proj_bias[expert]
            return {
                "w_gate_up": _numpy(torch.cat([gate_up[:, ::2], gate_up[:, 1::2]], dim=1)),
                "b_gate_up": _numpy(torch.cat([bias[::2], bias[1::2]])),
                "w_down": _numpy(experts.down_proj[expert]),
                "b_down": _numpy(experts.down_proj_bias[expert]),
            }
        return {
            "w_gate_up": _numpy(experts.gate_up_proj[expert].T),
            "w_down": _numpy(experts.down_proj[expert].T),
        }

    def expert_spec(self, config) -> dict:
        """The expert graph's variant and constants, as recorded in the manifest."""
        if self.oss_experts:
            return {"variant": "swiglu_oss", "limit": float(config.swiglu_limit), "alpha": float(config.swiglu_alpha)}
        if config.hidden_act != "silu":
            raise ExportError(f"hidden_act {config.hidden_act!r} is not supported for routed experts; valid: 'silu'")
        return {"variant": "swiglu"}

    def moe_dims(self, config) -> dict:
        num_experts = next(getattr(config, name) for name in ("num_local_experts", "num_experts", "n_routed_experts")
                           if getattr(config, name, None))
        intermediate = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        return {"num_experts": int(num_experts), "top_k": int(config.num_experts_per_tok),
                "expert_intermediate_size": int(intermediate)}


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().numpy())


FAMILIES: dict[str, Family] = {
    "mixtral": Family("mixtral", window_for_all_layers=True),
    "qwen2_moe": Family("qwen2_moe", window_from_layer_types=True),
    "qwen3_moe": Family("qwen3_moe", window_for_all_layers=True),
    "olmoe": Family("olmoe"),
    "deepseek_v3": Family("deepseek_v3"),
    "gpt_oss": Family("gpt_oss", router_attr="router", oss_experts=True, window_from_layer_types=True,
                      attention="eager"),
}

DRAFT_FAMILIES: dict[str, Family] = {
    "llama": Family("llama", moe=False),
    "qwen2": Family("qwen2", moe=False, window_from_layer_types=True),
    "qwen3": Family("qwen3", moe=False, window_from_layer_types=True),
    "mistral": Family("mistral", moe=False, window_for_all_layers=True),
}


def family_for(config, *, draft: bool) -> Family:
    table = DRAFT_FAMILIES if draft else FAMILIES
    family = table.get(config.model_type)
    if family is not None:
        return family
    role = "draft (a dense causal LM)" if draft else "target (a Mixture-of-Experts causal LM)"
    if not draft and config.model_type in DRAFT_FAMILIES:
        raise ExportError(f"model_type {config.model_type!r} is a dense model, not a Mixture-of-Experts model; "
                          f"supported MoE families: {', '.join(FAMILIES)}")
    raise ExportError(f"unsupported architecture {config.model_type!r} for the {role}; "
                      f"supported: {', '.join(table)}")
