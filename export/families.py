"""What differs between model families, as a description made of known parts.

The trunk graphs run the model's own modules (attention, norms, rotary embedding, router, shared
experts), so most parts only say where a module sits and how its tensors are laid out:

  mlp         the decoder layer's attribute holding its MoE block or dense MLP ("feed_forward"
              in Llama 4); dense layers are those whose block has no `experts`.
  router      the MoE block's attribute holding it. Every supported router (softmax, sigmoid,
              grouped, bias-corrected; normalised or scaled top-k) is the model's own module
              returning (logits, top-k weights, top-k ids), so its arithmetic is the model's.
  scales      what the router's weight scales: "output" (each expert's output, as the runtime
              combines them) or "input" (Llama 4: a sigmoid of the top-1 logit scales the expert's
              input; the trunk then hands the runtime the scaled input and a weight of 1, so only
              top-1 routing is supported).
  experts     the routed experts' weight layout, a key of EXPERT_LAYOUTS: how one expert's
              tensors are sliced into spac.ops.expert_graph's layout and which graph variant
              (activation, biases, clamps) computes it.
  shared      the always-on experts, found by name (SHARED_EXPERTS); a `shared_expert_gate`
              scales them by a sigmoid.
  windows     which layers attend through a sliding window or in chunks: "layer_types"
              (config.layer_types says per layer: config.sliding_window for "sliding_attention",
              config.attention_chunk_size for "chunked_attention"), "all" (config.sliding_window
              for every layer) or None.
  rotary      the rotary embedding's output: "cos_sin" (a pair of real tensors) or one complex
              tensor, carried between graphs as its real and imaginary parts: "complex" for
              queries [B, H, T, D] (DeepSeek-V2), "complex_tokens_first" for [B, T, H, D] (Llama 4).
  attention   the attention function the trunk is exported with: spac's grouped eager attention
              (GQA and MLA alike; sliding windows, q/k norms and partial rotary are the model's
              module) or transformers' "eager", for attention sinks.
  norms       where a layer's norms sit (NORM_PLACEMENTS): "pre", x + attn(norm(x)) then
              x + mlp(norm(x)); or "post" (OLMo-2, FlexOlmo), x + norm(attn(x)) then
              x + norm(mlp(x)), whose norm after the routed experts' sum runs in a graph of its own.

A family in FAMILIES is a table entry. A family not in the table is recognised from its
config and its modules (built on the meta device: no weights are read); a part the exporter does
not know is refused in one line that names it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .attention import NAME as ATTENTION


class ExportError(Exception):
    """Bad input to the exporter: the message says what is wrong and what would be valid."""


SHARED_EXPERTS = ("shared_expert", "shared_expert_gate", "shared_experts", "shared_mlp")
ROUTERS = ("gate", "router")
# Layer types that attend over a KV cache. Others are refused; those that carry a recurrent
# state (gated delta-net, lightning attention, Mamba) would need it rolled back on rejection.
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
RECURRENT_LAYER_TYPES = ("linear_attention", "mamba")
# Where a complex rotary embedding's queries have their heads (see attention.RealComplex).
COMPLEX_ROTARY_HEADS_AXIS = {"complex": 1, "complex_tokens_first": 2}
# Norm placement -> the decoder layer's modules.
NORM_PLACEMENTS = {
    "pre": frozenset({"self_attn", "input_layernorm", "post_attention_layernorm", "mlp"}),
    "post": frozenset({"self_attn", "post_attention_layernorm", "post_feedforward_layernorm", "mlp"}),
}


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().numpy())


def _silu_weights(experts: nn.Module, expert: int) -> dict[str, np.ndarray]:
    # gate_up_proj [E, 2I, H] (gate rows, then up rows) and down_proj [E, H, I], applied as
    # F.linear: transposed into x @ w. Views where possible: no copy of the layer is made.
    return {"w_gate_up": _numpy(experts.gate_up_proj[expert].T), "w_down": _numpy(experts.down_proj[expert].T)}


def _oss_weights(experts: nn.Module, expert: int) -> dict[str, np.ndarray]:
    # GPT-OSS: gate_up_proj [E, H, 2I] with gate and up interleaved by column, and biases.
    gate_up, bias = experts.gate_up_proj[expert], experts.gate_up_proj_bias[expert]
    return {
        "w_gate_up": _numpy(torch.cat([gate_up[:, ::2], gate_up[:, 1::2]], dim=1)),
        "b_gate_up": _numpy(torch.cat([bias[::2], bias[1::2]])),
        "w_down": _numpy(experts.down_proj[expert]),
        "b_down": _numpy(experts.down_proj_bias[expert]),
    }


def _in_out_weights(experts: nn.Module, expert: int) -> dict[str, np.ndarray]:
    # Llama 4: gate_up_proj [E, H, 2I] (gate columns, then up) and down_proj [E, I, H], as x @ w.
    return {"w_gate_up": _numpy(experts.gate_up_proj[expert]), "w_down": _numpy(experts.down_proj[expert])}


def _silu_spec(config) -> dict:
    return {"variant": "swiglu"}


def _oss_spec(config) -> dict:
    return {"variant": "swiglu_oss", "limit": float(config.swiglu_limit), "alpha": float(config.swiglu_alpha)}


# layout -> (one expert's tensors in expert_graph's layout, the expert graph's spec)
EXPERT_LAYOUTS = {
    "gate_up": (_silu_weights, _silu_spec),
    "gate_up_in_out": (_in_out_weights, _silu_spec),
    "gate_up_interleaved_biased": (_oss_weights, _oss_spec),
}


@dataclass(frozen=True)
class Family:
    model_type: str
    mlp: str = "mlp"
    router: str = "gate"
    scales: str = "output"
    experts: str = "gate_up"
    windows: str | None = None
    rotary: str = "cos_sin"
    attention: str = ATTENTION
    norms: str = "pre"
    moe: bool = True

    def mlp_of(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp)

    def is_moe_layer(self, layer: nn.Module) -> bool:
        return hasattr(self.mlp_of(layer), "experts")

    def router_of(self, mlp: nn.Module) -> nn.Module:
        return getattr(mlp, self.router)

    @property
    def complex_rotary_heads_axis(self) -> int | None:
        return COMPLEX_ROTARY_HEADS_AXIS.get(self.rotary)

    def route(self, router: nn.Module, flat: torch.Tensor):
        """(The routed experts' input [T, H], top-k expert ids and weights [T, k], the router's
        logits of every expert [T, E]), exactly as the model's router computes them. The logits
        rank the experts a self-drafting runtime may substitute for one it does not hold."""
        if self.scales == "input":  # Llama 4: scores [T, E], sigmoid of the top-1 logit, else 0
            scores, logits = router(flat)
            ids = torch.topk(logits, 1, dim=1).indices
            weight = scores.gather(1, ids)
            return flat * weight, ids, torch.ones_like(weight), logits
        logits, weights, ids = router(flat)
        return flat, ids, weights, logits

    def unsupported(self, config) -> str | None:
        """Why this config of the family cannot be exported, or None."""
        if self.scales == "input" and config.num_experts_per_tok != 1:
            return (f"num_experts_per_tok {config.num_experts_per_tok}: its router scales each expert's input, "
                    "so only top-1 routing gives every expert the same input (valid: 1)")
        return None

    @property
    def post_norms(self) -> bool:
        return self.norms == "post"

    @staticmethod
    def shared_modules(mlp: nn.Module) -> nn.ModuleDict:
        """The always-on experts of a MoE block, empty when the family has none."""
        # (Ernie 4.5 sets shared_experts to None when it has none)
        return nn.ModuleDict({name: getattr(mlp, name) for name in SHARED_EXPERTS
                              if getattr(mlp, name, None) is not None})

    @staticmethod
    def shared_output(shared: nn.ModuleDict, flat: torch.Tensor) -> torch.Tensor:
        if "shared_expert_gate" in shared:  # Qwen2-MoE: a sigmoid-gated shared expert
            return torch.sigmoid(shared["shared_expert_gate"](flat)) * shared["shared_expert"](flat)
        (expert,) = shared.values()
        return expert(flat)

    def sliding_window(self, config, index: int) -> int | None:
        if self.windows == "layer_types" and getattr(config, "layer_types", None):
            return config.sliding_window if config.layer_types[index] == "sliding_attention" else None
        if self.windows == "all":
            return getattr(config, "sliding_window", None)
        return None

    def attention_chunk(self, config, index: int) -> int | None:
        """The chunk a "chunked_attention" layer attends within (Llama 4), or None."""
        if self.windows == "layer_types" and config.layer_types[index] == "chunked_attention":
            return config.attention_chunk_size
        return None

    def expert_weights(self, experts: nn.Module, expert: int) -> dict[str, np.ndarray]:
        """One expert's tensors in the layout of spac.ops.expert_graph: x @ w_gate_up -> [gate | up],
        then act(gate) * up @ w_down."""
        return EXPERT_LAYOUTS[self.experts][0](experts, expert)

    def expert_spec(self, config) -> dict:
        """The expert graph's variant and constants, as recorded in the manifest."""
        spec = EXPERT_LAYOUTS[self.experts][1](config)
        if spec["variant"] == "swiglu" and config.hidden_act != "silu":
            raise ExportError(f"hidden_act {config.hidden_act!r} is not supported for routed experts; valid: 'silu'")
        return spec

    @staticmethod
    def moe_dims(config) -> dict:
        num_experts = next(getattr(config, name) for name in ("num_local_experts", "num_experts", "n_routed_experts")
                           if getattr(config, name, None))
        intermediate = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        return {"num_experts": int(num_experts), "top_k": int(config.num_experts_per_tok),
                "expert_intermediate_size": int(intermediate)}


FAMILIES: dict[str, Family] = {
    "mixtral": Family("mixtral", windows="all"),
    "qwen2_moe": Family("qwen2_moe", windows="layer_types"),
    "qwen3_moe": Family("qwen3_moe", windows="all"),
    "olmoe": Family("olmoe"),
    "flex_olmo": Family("flex_olmo", norms="post"),
    "deepseek_v2": Family("deepseek_v2", rotary="complex"),
    "deepseek_v3": Family("deepseek_v3"),
    "dots1": Family("dots1", windows="layer_types"),
    "hunyuan_v1_moe": Family("hunyuan_v1_moe"),
    "llama4_text": Family("llama4_text", mlp="feed_forward", router="router", scales="input",
                          experts="gate_up_in_out", windows="layer_types", rotary="complex_tokens_first"),
    "gpt_oss": Family("gpt_oss", router="router", experts="gate_up_interleaved_biased", windows="layer_types",
                      attention="eager"),
}

DRAFT_FAMILIES: dict[str, Family] = {
    "llama": Family("llama", moe=False),
    "qwen2": Family("qwen2", moe=False, windows="layer_types"),
    "qwen3": Family("qwen3", moe=False, windows="layer_types"),
    "mistral": Family("mistral", moe=False, windows="all"),
}


def family_for(config, *, draft: bool) -> Family:
    """The family of a model, from the table or recognised from its parts; ExportError otherwise."""
    table = DRAFT_FAMILIES if draft else FAMILIES
    model_type = config.model_type
    if not draft and model_type in DRAFT_FAMILIES:
        raise ExportError(f"model_type {model_type!r} is a dense model, not a Mixture-of-Experts model; "
                          f"supported MoE families: {', '.join(FAMILIES)}")
    refusal = _unsupported_layer_type(config)
    if refusal is None and model_type in table:
        refusal = table[model_type].unsupported(config)
        if refusal is None:
            return table[model_type]
    role = "draft (a dense causal LM)" if draft else "target (a Mixture-of-Experts causal LM)"
    if refusal is None and not draft:
        family, refusal = recognise(config)
        if family is not None:
            return family
    reason = f": {refusal}" if refusal else ""
    raise ExportError(f"unsupported architecture {model_type!r} for the {role}{reason}; supported: {', '.join(table)}")


def _unsupported_layer_type(config) -> str | None:
    """Why the config's layers are not all attention over a KV cache, or None if they are."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None) or []
    for index, layer_type in enumerate(types):
        if layer_type not in ATTENTION_LAYER_TYPES:
            why = (", whose recurrent state speculative decoding would have to roll back on rejection"
                   if layer_type in RECURRENT_LAYER_TYPES else "")
            return (f"layer {index} is a {layer_type!r} layer{why} (supported layer types: "
                    f"{', '.join(ATTENTION_LAYER_TYPES)})")
    return None


class UnknownPart(Exception):
    """A part of a model the exporter does not know; the message names it in a few words."""


def recognise(config) -> tuple[Family | None, str | None]:
    """A family not in the table, recognised from its config and its modules on the meta device:
    (the family, None), (None, the unknown part), or (None, None) if transformers builds no causal LM."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError):
        return None, None
    try:
        return _parts(model, config), None
    except UnknownPart as unknown:
        return None, str(unknown)


def _parts(model, config) -> Family:
    if getattr(config, "sliding_window", None) and not getattr(config, "layer_types", None):
        raise UnknownPart("config.sliding_window is set without config.layer_types, so which layers slide is unknown")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise UnknownPart("the model has no `model.layers` decoder stack")
    (norms, *others) = {_norm_placement(layer) for layer in layers}
    if others:
        raise UnknownPart("decoder layers mix pre-norm and post-norm placements")
    moe = [layer for layer in layers if hasattr(layer.mlp, "experts")]
    if not moe:
        raise UnknownPart("no decoder layer has an `mlp` with routed `experts`")
    routers = {_router_part(layer.mlp, config) for layer in moe}
    if norms == "post" and any(Family.shared_modules(layer.mlp) for layer in moe):
        raise UnknownPart("shared experts in a post-norm layer (their output would enter the norm after the "
                          "routed experts' sum)")
    for layer in moe:
        _check_experts(layer.mlp.experts)
    attention = "eager" if any(hasattr(layer.self_attn, "sinks") for layer in layers) else ATTENTION
    windows = "layer_types" if getattr(config, "layer_types", None) else None
    (router,) = routers
    return Family(config.model_type, router=router, windows=windows, rotary=_rotary_part(model), attention=attention,
                  norms=norms)


def _norm_placement(layer: nn.Module) -> str:
    """The layer's key in NORM_PLACEMENTS, known from the modules it holds."""
    children = [name for name, _ in layer.named_children()]
    placement = next((name for name, modules in NORM_PLACEMENTS.items() if set(children) == modules), None)
    if placement is None:
        known = "; ".join(f"{', '.join(sorted(modules))} ({name}-norm)" for name, modules in NORM_PLACEMENTS.items())
        raise UnknownPart(f"unknown decoder layer {type(layer).__name__} (modules: {', '.join(children)}; known: "
                          f"{known})")
    return placement


def _router_part(mlp: nn.Module, config) -> str:
    """The router's attribute, if it returns (logits, weights [T, k], ids [T, k]) as ours do."""
    children = [name for name, _ in mlp.named_children()]
    known = {*ROUTERS, *SHARED_EXPERTS, "experts"}
    name = next((name for name in ROUTERS if name in children), None)
    if name is None or not known.issuperset(children):
        raise UnknownPart(f"unknown MoE block {type(mlp).__name__} (modules: {', '.join(children)}; "
                          f"known: {', '.join(sorted(known))})")
    router = getattr(mlp, name)
    try:
        out = router(torch.zeros(3, config.hidden_size, device="meta"))
    except Exception as error:  # noqa: BLE001 - any failure means the router is not of a known kind
        raise UnknownPart(f"unknown router {type(router).__name__} ({type(error).__name__} on a [tokens, hidden] "
                          "input)") from None
    k = getattr(config, "num_experts_per_tok", None)
    if not (isinstance(out, tuple) and len(out) == 3 and all(t.shape == (3, k) for t in out[1:])):
        raise UnknownPart(f"unknown router {type(router).__name__}: it does not return (logits, top-k weights, "
                          "top-k ids)")
    return name


def _check_experts(experts: nn.Module) -> None:
    """The "gate_up" layout: gate_up_proj [E, 2I, H] and down_proj [E, H, I], SiLU, no biases."""
    params = dict(experts.named_parameters())
    gate_up, down = params.get("gate_up_proj"), params.get("down_proj")
    act = type(getattr(experts, "act_fn", None)).__name__
    if (set(params) == {"gate_up_proj", "down_proj"} and gate_up.dim() == down.dim() == 3
            and gate_up.shape[1] == 2 * down.shape[2] and gate_up.shape[2] == down.shape[1] and "SiLU" in act):
        return
    shapes = ", ".join(f"{name} {list(param.shape)}" for name, param in params.items())
    raise UnknownPart(f"unknown routed-expert layout {type(experts).__name__} ({shapes}; activation {act}); "
                      "known: gate_up_proj [E, 2I, H] + down_proj [E, H, I] with SiLU")


def _rotary_part(model) -> str:
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is None:
        raise UnknownPart("unknown rotary embedding: the model has no `model.rotary_emb`")
    out = rotary(torch.zeros(1, 2, model.config.hidden_size, device="meta"),
                 torch.zeros(1, 2, dtype=torch.long, device="meta"))
    if isinstance(out, tuple) and len(out) == 2:
        return "cos_sin"
    if isinstance(out, torch.Tensor) and out.is_complex():
        return "complex"
    raise UnknownPart(f"unknown rotary embedding {type(rotary).__name__}")
