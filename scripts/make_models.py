#!/usr/bin/env python3
"""Build tiny random-weight Hugging Face models (MoE targets and dense drafts) for tests, demos
and benchmarks. No model hub is needed: every model comes from a config and is saved with
`save_pretrained`, so it loads from its directory (`from_pretrained`) exactly like a user's model.

    python scripts/make_models.py --family mixtral --out models/mixtral --draft-family qwen3 --draft-out models/draft

From Python (this folder on sys.path):

    from make_models import make_model, make_pair, build_tokenizer, FAMILIES, DRAFT_FAMILIES

Family names are the Hugging Face `model_type` strings, so `AutoConfig.for_model(family)` builds
each config. Random initialisation leaves routers near zero, so every expert scores the same and
routing is arbitrary; `_make_routing_decisive` scales router weights up so that routing is
decisive and varies from token to token. Constant-initialised tensors (biases, norm weights,
attention sinks, DeepSeek's score-correction bias) are randomised too: an exporter that drops or
misplaces one of them then gives different logits instead of passing by luck.

On disk, transformers 5 writes the Hub's original tensor layout, not its in-memory fused one:
per-expert `experts.{i}.{gate,up,down}_proj.weight` (Mixtral: `block_sparse_moe.experts.{i}.w1/w2/w3`);
GPT-OSS alone stores fused `experts.gate_up_proj` / `down_proj` (+ biases).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

BOS_EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (BOS_EOS_TOKEN, "<|im_start|>", "<|im_end|>", PAD_TOKEN)

# ChatML, the format of Qwen's chat models.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# transformers' Qwen2Tokenizer splits words with this regex (GPT-4's, one digit per token).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Standard-library modules that make the default tokenizer corpus (about 300 KB): named, not
# globbed, so the corpus is the same on every machine with the same Python version.
CORPUS_MODULES = (
    "abc.py", "bisect.py", "calendar.py", "contextlib.py", "copy.py", "csv.py", "fnmatch.py",
    "functools.py", "heapq.py", "json/decoder.py", "json/encoder.py", "keyword.py", "operator.py",
    "queue.py", "shlex.py", "string.py", "textwrap.py", "tokenize.py", "weakref.py",
)

# Router weights get std ROUTER_LOGIT_STD / sqrt(hidden): the router's input is RMS-normalised,
# so its logits then have std ≈ ROUTER_LOGIT_STD whatever the hidden size (0.5 at hidden 64).
ROUTER_LOGIT_STD = 4.0
# Std of the random values given to tensors that initialise to a constant. Biases stay below
# the weights' init std (0.02): larger ones would swamp a random model's tiny activations, so
# every token's hidden state would look alike and route alike. DeepSeek's correction bias is
# added to sigmoid scores in (0, 1); GPT-OSS's sinks are attention logits.
BIAS_STD = 0.01
SCORE_CORRECTION_STD = 0.1
SINK_STD = 1.0
NORM_WEIGHT_STD = 0.1  # around 1

_MOE_COMMON = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
    num_experts_per_tok=2,
)
_DRAFT_COMMON = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)

# Per-family config fields on top of the common ones (the field names differ between families).
MOE_CONFIGS = {
    "mixtral": dict(num_local_experts=8, intermediate_size=32),
    "qwen2_moe": dict(
        num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=64,
        intermediate_size=128, decoder_sparse_step=1,
    ),
    "qwen3_moe": dict(
        num_experts=8, moe_intermediate_size=32, intermediate_size=128, norm_topk_prob=True,
    ),
    "olmoe": dict(num_experts=8, intermediate_size=32),
    # OLMo-2's post-norm layers: a norm after attention and after the routed experts' sum. Its
    # routers see the un-normed residual stream, in which at the default init std the tokens'
    # embeddings are small beside the normed attention output, so tokens would route alike.
    "flex_olmo": dict(num_experts=8, intermediate_size=32, initializer_range=0.1),
    "deepseek_v3": dict(
        # Multi-head latent attention: no GQA, per-head dims set by the q/k/v fields below.
        num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        # The rotary embedding is sized by head_dim, which a kwarg would override: it must
        # equal qk_rope_head_dim (the config derives it only when head_dim is not passed).
        head_dim=8,
        # Layer 0 is a dense MLP (intermediate_size), layers 1-2 are MoE with one shared expert.
        num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=128,
        n_routed_experts=8, moe_intermediate_size=32, n_shared_experts=1,
        # Two groups of four experts, each token may use one group: grouped routing matters.
        n_group=2, topk_group=1,
    ),
    "gpt_oss": dict(
        num_local_experts=8, intermediate_size=32,
        # A window of 8 makes sliding attention differ from full attention in short tests.
        layer_types=["sliding_attention", "full_attention"], sliding_window=8,
        # Small enough that the clamp in the expert activation bites on random weights.
        swiglu_limit=0.2,
        # GPT-OSS's YaRN RoPE, with a pre-YaRN context that matches max_position_embeddings.
        rope_parameters=dict(
            rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0,
            truncate=False, original_max_position_embeddings=64,
        ),
    ),
    "deepseek_v2": dict(
        # DeepSeek-V2-Lite's attention: MLA without a query LoRA, rotary as complex numbers.
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, head_dim=8,
        num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=128,
        n_routed_experts=8, moe_intermediate_size=32, n_shared_experts=1,
        # Softmax scores, the best group of two kept, scaled.
        topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=1.5,
    ),
    "dots1": dict(
        # DeepSeek-V3's router and shared expert with q/k norms; a sliding layer with a window of 8.
        num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=128,
        n_routed_experts=8, moe_intermediate_size=32, n_shared_experts=1,
        n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.5,
        layer_types=["full_attention", "sliding_attention", "full_attention"], sliding_window=8,
    ),
    "hunyuan_v1_moe": dict(
        # An ungated shared MLP beside the routed experts; q/k norms after rotary.
        num_experts=8, intermediate_size=32,
    ),
    "llama4_text": dict(
        # Llama 4's text model: top-1 sigmoid routing that scales the expert's input, one shared
        # expert, MoE every second layer (1, 3), rotary as complex numbers with an L2 q/k norm,
        # chunked attention (chunks of 8) on rotary layers and a no-rotary full-attention layer
        # 3 whose attention temperature grows with the position (floor_scale 4 makes it bite).
        num_local_experts=8, num_experts_per_tok=1, intermediate_size=32, intermediate_size_mlp=128,
        num_hidden_layers=4, interleave_moe_layer_step=2, attention_chunk_size=8, floor_scale=4,
    ),
    "glm4_moe": dict(
        # Not a table entry: the exporter recognises its parts. Half the head dims rotate.
        num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=128,
        n_routed_experts=8, moe_intermediate_size=32, n_shared_experts=1,
        n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.5,
        partial_rotary_factor=0.5, use_qk_norm=True,
    ),
    "ernie4_5_moe": dict(
        # Recognised too: softmax top-k chosen on bias-corrected scores, a shared expert, layer 0 dense.
        moe_num_experts=8, moe_k=2, moe_intermediate_size=32, intermediate_size=128,
        moe_layer_start_index=1, moe_num_shared_experts=1, num_hidden_layers=3,
    ),
}
DRAFT_CONFIGS = {
    "qwen3": dict(head_dim=8),
    "qwen2": dict(),
    "llama": dict(head_dim=8),
}
FAMILIES = tuple(MOE_CONFIGS)
DRAFT_FAMILIES = tuple(DRAFT_CONFIGS)


def moe_block(layer: torch.nn.Module) -> torch.nn.Module:
    """A decoder layer's MoE block or dense MLP (Llama 4 calls it feed_forward)."""
    return getattr(layer, "mlp", None) or layer.feed_forward


def default_corpus_files() -> list[Path]:
    """The standard-library sources that make the default tokenizer corpus, sorted."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(stdlib / name for name in CORPUS_MODULES if (stdlib / name).is_file())


@functools.lru_cache(maxsize=4)
def _train_tokenizer_json(vocab_size: int, corpus_files: tuple[str, ...]) -> str:
    """Train byte-level BPE and return it as JSON (a string, so the cached value is immutable)."""
    tokenizer = Tokenizer(models.BPE())
    # Exactly Qwen2's pipeline: transformers loads any "qwen2" model's tokenizer as
    # Qwen2Tokenizer, which rebuilds this pipeline whatever tokenizer.json says, so anything
    # else would tokenize differently in transformers than in the tokenizers library.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
        show_progress=False,
    )
    texts = [Path(f).read_text(encoding="utf-8") for f in corpus_files]
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer.to_str()


def build_tokenizer(out_dir, vocab_size: int = 512, corpus_files=None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer and save it to out_dir.

    Both `tokenizers.Tokenizer.from_file(out_dir / "tokenizer.json")` and
    `transformers.AutoTokenizer.from_pretrained(out_dir)` load the result; tokenizer_config.json
    carries a ChatML chat template. The same inputs give the same files.
    """
    files = tuple(str(f) for f in (corpus_files or default_corpus_files()))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_train_tokenizer_json(vocab_size, files)),
        bos_token=BOS_EOS_TOKEN,
        eos_token=BOS_EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )
    # save_jinja_files=False keeps the template inside tokenizer_config.json, where a runtime
    # without transformers finds it next to the other tokenizer settings.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    return tokenizer


def _make_routing_decisive(model: torch.nn.Module) -> None:
    """Scale router (and Qwen2-MoE shared-expert gate) weights so routing is decisive and varied."""
    for name, module in model.named_modules():
        # Routers are "...Router" or "...Gate" modules (Hunyuan's holds its weight in a child `wg`).
        is_router = type(module).__name__.lower().endswith(("router", "gate"))
        if is_router or name.endswith("shared_expert_gate"):
            weight = next(param for param_name, param in module.named_parameters() if param_name.endswith("weight"))
            torch.nn.init.normal_(weight, std=ROUTER_LOGIT_STD / math.sqrt(weight.shape[-1]))


def _randomize_constant_inits(model: torch.nn.Module) -> None:
    """Give biases, sinks, DeepSeek's e_score_correction_bias and norm weights random values."""
    stds = {"sinks": SINK_STD, "e_score_correction_bias": SCORE_CORRECTION_STD}
    for module in model.modules():
        # (transformers 5.25's Llama 4 has weightless RMS norms)
        if type(module).__name__.endswith("RMSNorm") and getattr(module, "weight", None) is not None:
            torch.nn.init.normal_(module.weight, mean=1.0, std=NORM_WEIGHT_STD)
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if name in stds or name.endswith("bias"):
                torch.nn.init.normal_(tensor, std=stds.get(name, BIAS_STD))


def make_model(family: str, out_dir, seed: int = 0, **overrides) -> Path:
    """Build a tiny random-weight model of `family`, save it and the tokenizer to out_dir.

    `overrides` replace config fields, e.g. for a larger model:
    make_model("qwen3_moe", out, hidden_size=2048, num_experts=128, moe_intermediate_size=768,
               num_experts_per_tok=8, num_hidden_layers=2).
    """
    if family in MOE_CONFIGS:
        fields = {**_MOE_COMMON, **MOE_CONFIGS[family]}
    elif family in DRAFT_CONFIGS:
        fields = {**_DRAFT_COMMON, **DRAFT_CONFIGS[family]}
    else:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES + DRAFT_FAMILIES}")
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(out_dir)
    special_ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = AutoConfig.for_model(family, **{"vocab_size": len(tokenizer), **special_ids, **fields, **overrides})

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        _make_routing_decisive(model)
        _randomize_constant_inits(model)
    # Explicit ids make greedy generate() run without "setting pad_token_id" warnings.
    model.generation_config = GenerationConfig(**special_ids, do_sample=False)
    save_without_progress_bar(model, out_dir)
    return out_dir


def save_without_progress_bar(model, out_dir) -> None:
    """save_pretrained, without its "Writing model shards" bar on stderr: a tiny model's is noise,
    and it lands in the output of whichever command or test built the model first."""
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir)
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


def make_streamed_model(family: str, out_dir, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                        tensors_per_shard: int = 64, **overrides) -> Path:
    """Like make_model, but the weights are written shard by shard from random tensors with the
    safetensors library, never held whole: for checkpoints larger than memory (Qwen3-30B-A3B's
    layer shape, ≈ 1.2 GB of bf16 experts per layer). The names and shapes are those
    save_pretrained writes (transformers' reverse conversion of the model's meta state dict);
    values are normal with std 0.02 (norm weights around 1), not the model's own initialisation.
    Shards hold `tensors_per_shard` tensors each, listed in model.safetensors.index.json."""
    from safetensors.torch import save_file
    from transformers.core_model_loading import revert_weight_conversion

    fields = {**_MOE_COMMON, **MOE_CONFIGS[family]} if family in MOE_CONFIGS else {**_DRAFT_COMMON, **DRAFT_CONFIGS[family]}
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(out_dir)
    special_ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model(family, **{"vocab_size": len(tokenizer), **special_ids, **fields, **overrides})
    config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    config.dtype = dtype
    config.save_pretrained(out_dir)
    GenerationConfig(**special_ids, do_sample=False).save_pretrained(out_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    on_disk = revert_weight_conversion(model, model.state_dict())
    names = sorted(name for name in on_disk if name not in model.all_tied_weights_keys)
    generator = torch.Generator().manual_seed(seed)
    weight_map, shards = {}, [names[i:i + tensors_per_shard] for i in range(0, len(names), tensors_per_shard)]
    for number, shard in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _random_tensor(name, on_disk[name].shape, dtype, generator) for name in shard}
        save_file(tensors, out_dir / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        del tensors
    index = {"metadata": {}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out_dir


def _random_tensor(name: str, shape, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    tensor = torch.randn(shape, generator=generator, dtype=torch.float32) * 0.02
    if name.endswith("norm.weight"):
        tensor += 1.0
    return tensor.to(dtype)


def _recipe_hash(**args) -> str:
    """Identifies a cached build: this file's code plus the arguments it was built with."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(json.dumps(args, sort_keys=True).encode())
    return digest.hexdigest()


def make_pair(family: str, root, draft_family: str = "qwen3", seed: int = 0) -> tuple[Path, Path]:
    """Build (or reuse) a target model and a draft sharing one tokenizer under root.

    Returns (model_dir, draft_dir). A build goes into a temporary folder that is renamed into
    place once complete, so an interrupted or concurrent build never leaves a half-written
    model that a later call would reuse; a marker records what was built, so a change to this
    file or to the arguments triggers a rebuild.
    """
    root = Path(root)
    final = root / f"{family}-{draft_family}-seed{seed}"
    marker = ".complete"
    recipe = _recipe_hash(family=family, draft_family=draft_family, seed=seed)
    pair = (final / "model", final / "draft")
    if (final / marker).is_file() and (final / marker).read_text() == recipe:
        return pair

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        make_model(family, tmp / "model", seed=seed)
        make_model(draft_family, tmp / "draft", seed=seed)
        (tmp / marker).write_text(recipe)
        if final.exists():  # a stale build: move it aside, then replace it
            stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.stale.", dir=root))
            os.replace(final, stale / "old")
            shutil.rmtree(stale)
        os.replace(tmp, final)
    except OSError:
        # A concurrent build won the rename: use its result if it is the same recipe.
        if not ((final / marker).is_file() and (final / marker).read_text() == recipe):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return pair


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", required=True, choices=FAMILIES + DRAFT_FAMILIES)
    parser.add_argument("--out", required=True, type=Path, help="directory to write the model to")
    parser.add_argument("--draft-family", choices=DRAFT_FAMILIES, help="also build a draft model")
    parser.add_argument("--draft-out", type=Path, help="directory for the draft (with --draft-family)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if bool(args.draft_family) != bool(args.draft_out):
        parser.error("--draft-family and --draft-out go together")

    builds = [(args.family, args.out)]
    if args.draft_family:
        builds.append((args.draft_family, args.draft_out))
    for family, out in builds:
        make_model(family, out, seed=args.seed)
        files = ", ".join(sorted(p.name for p in out.iterdir()))
        print(f"{family}: wrote {out} ({files})")


if __name__ == "__main__":
    main()
