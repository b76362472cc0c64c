"""Tests for spac-export: each family's package reproduces its model and matches its manifest,
the CLI runs end to end, and bad input gives one clear error and leaves nothing behind.

Each family is exported once per session (the `exported` fixture, ~30 s each); the CLI tests use
a one-layer model with four experts, the cheapest real export. Bad-input cases must be caught
before any model is loaded, which the tests enforce by making loading fail.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from make_models import FAMILIES, build_tokenizer, make_model, moe_block
from transformers import AutoModelForCausalLM

from spac.export import cli, package
from spac.runtime.manifest import MANIFEST, load_manifest, verify_file

TOLERANCE = 1e-4
SPAC_EXPORT = Path(sysconfig.get_path("scripts")) / "spac-export"


def relative_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def tree(root: Path) -> list[str]:
    """Everything under root (files and folders, hidden ones too), to see what an export left."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def snapshot(root: Path) -> dict:
    """Every path under root with its contents (None for a folder)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


# --- every family's package -------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_package_reproduces_model_logits(family, exported, record_property):
    report = exported(family).verification
    record_property("target_max_abs_diff", report["target_max_abs_diff"])
    record_property("draft_max_abs_diff", report["draft_max_abs_diff"])
    assert (report["prompt_tokens"], report["decode_steps"]) == (16, 8)
    assert report["passed"]
    assert report["target_max_abs_diff"] <= TOLERANCE
    assert report["draft_max_abs_diff"] <= TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_trunk_layers_come_out_fused(family, exported):
    """The export's rewrites took hold in every family: norms fused, q/k/v (or DeepSeek's q and
    latent kv projections) one matmul."""
    manifest = load_manifest(exported(family).output)
    for layer in manifest.target.layers:
        ops = [node.op_type for node in onnx.load(manifest.root / layer.file, load_external_data=False).graph.node]
        assert "Pow" not in ops and "SimplifiedLayerNormalization" in ops, (layer.file, ops)
        assert "Split" in ops, (layer.file, ops)


# Families whose rotary embedding is not transformers' rotate_half form: GPT-OSS splits the
# halves itself, DeepSeek-V3 and ERNIE 4.5 rotate interleaved pairs, DeepSeek-V2 and Llama 4 are
# complex (in real arithmetic, attention.real_rotary).
UNFUSED_ROTARY = {"gpt_oss", "deepseek_v3", "ernie4_5_moe", "deepseek_v2", "llama4_text"}


@pytest.mark.parametrize("family", FAMILIES)
def test_rotate_half_rotary_comes_out_as_one_node_for_queries_and_keys(family, exported):
    """x * cos + rotate_half(x) * sin became one RotaryEmbedding each for the queries and keys
    (fusion.RotaryEmbeddingFusion), none of its Negs left and its constants initializers, in
    every layer of families that rotate halves, and in the draft's; the package still reproduces
    the model (test_package_reproduces_model_logits)."""
    manifest = load_manifest(exported(family).output)
    expected = {layer.file: 0 if family in UNFUSED_ROTARY else 2 for layer in manifest.target.layers}
    expected |= {layer.file: 2 for layer in manifest.draft.layers}
    for file, rotary_nodes in expected.items():
        ops = [node.op_type for node in onnx.load(manifest.root / file, load_external_data=False).graph.node]
        assert ops.count("RotaryEmbedding") == rotary_nodes, (file, ops)
        if rotary_nodes:
            assert "Neg" not in ops and "Constant" not in ops, (file, ops)


# Families whose layers cannot attend in one GroupQueryAttention node: attention sinks (eager) and
# multi-head latent attention (a key and value cache of different shapes).
UNFUSED_ATTENTION = {"gpt_oss", "deepseek_v3", "deepseek_v2"}


def fused_attention_nodes(manifest, layer) -> int:
    graph = onnx.load(manifest.root / layer.file, load_external_data=False).graph
    return sum(node.op_type == "GroupQueryAttention" for node in graph.node)


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_layers_attend_in_one_fused_node_unless_windowed(family, exported, model_pair):
    """A float32 layer under a plain causal mask attends, masks and extends its cache in one
    GroupQueryAttention node (and still reproduces the model: test_package_reproduces_model_logits);
    sliding-window and chunked layers, sinks and MLA keep the eager arithmetic."""
    manifest = load_manifest(exported(family).output)
    config = json.loads((model_pair(family)[0] / "config.json").read_text())
    layer_types = config.get("layer_types") or ["full_attention"] * config["num_hidden_layers"]
    for layer in manifest.target.layers:
        fused = family not in UNFUSED_ATTENTION and layer_types[layer.index] == "full_attention"
        assert fused_attention_nodes(manifest, layer) == int(fused), layer.file


def test_float16_layers_keep_the_eager_attention(exported):
    """float16 keeps the eager arithmetic (softmax in float32, as transformers rounds it), which
    the float16 packages' accuracy was measured with; the fused kernel's float16 path is not."""
    manifest = load_manifest(exported("qwen3_moe", experts="int4", dtype="float16").output)
    assert not any(fused_attention_nodes(manifest, layer) for layer in manifest.target.layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_graphs_tell_nothing_of_the_exporting_machine(family, exported):
    """torch.onnx writes each node's Python stack (this machine's file paths) into the graph; a
    package may be handed to strangers, so none of that may stay in it."""
    machine_paths = [str(Path(package.__file__).resolve().parent), sysconfig.get_paths()["purelib"]]
    output = Path(exported(family).output)
    for graph in output.rglob("*.onnx"):
        data = graph.read_bytes()
        assert not any(path.encode() in data for path in machine_paths), graph.relative_to(output)
        model = onnx.load(graph, load_external_data=False)
        assert not any(node.metadata_props for node in model.graph.node), graph.relative_to(output)


@pytest.mark.parametrize("family", FAMILIES)
def test_package_files_match_manifest(family, exported):
    manifest = load_manifest(exported(family).output)
    target, experts = manifest.target, manifest.target.experts
    expert_ids = [(layer, expert) for layer in target.moe_layers for expert in range(target.dims["num_experts"])]
    assert expert_ids
    expert_files = {experts.path(layer, expert, suffix) for layer, expert in expert_ids for suffix in (".onnx", ".data")}
    on_disk = relative_files(manifest.root)
    assert {name for name in on_disk if name.startswith("target/experts/")} == expert_files
    assert experts.bytes_per_expert == sum(tensor["nbytes"] for tensor in experts.tensors)
    for layer, expert in expert_ids:
        assert manifest.files[experts.path(layer, expert, ".data")]["bytes"] == experts.bytes_per_expert
    assert set(manifest.files) == on_disk - {MANIFEST}
    for name in manifest.files:
        verify_file(manifest, name)


def hf_expert(experts, x: torch.Tensor, expert: int) -> torch.Tensor:
    """The model's own Experts module on x, every token routed to `expert` at weight 1.0."""
    if len(inspect.signature(experts.forward).parameters) > 1:
        return experts(x, torch.full((len(x), 1), expert), torch.ones(len(x), 1))
    # Llama 4: one block of rows per expert, already scaled by the router (zeros for the others)
    rows = torch.zeros(experts.num_experts, *x.shape)
    rows[expert] = x
    return experts(rows.reshape(-1, x.shape[-1])).reshape(rows.shape)[expert]


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_graph_computes_the_hf_expert(family, exported, model_pair):
    """One expert's .onnx, run by plain onnxruntime, against the model's own Experts module with
    every token routed to that expert at weight 1.0 (so the layout, interleaving and biases of
    each family are the module's business, not re-derived here)."""
    manifest = load_manifest(exported(family).output)
    model = AutoModelForCausalLM.from_pretrained(model_pair(family)[0], dtype=torch.float32)
    moe_layers = [index for index, layer in enumerate(model.model.layers) if hasattr(moe_block(layer), "experts")]
    assert manifest.target.moe_layers == moe_layers
    layer, expert = moe_layers[-1], manifest.target.dims["num_experts"] - 1
    # Inputs well above the hidden states' scale, so GPT-OSS's clamp (limit 0.2) bites.
    x = 4 * torch.randn(7, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf_expert(moe_block(model.model.layers[layer]).experts, x, expert).numpy()
    path = manifest.root / manifest.target.experts.path(layer, expert, ".onnx")
    ours = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert np.abs(theirs).max() > 1e-3  # a real output, not zeros
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)


# --- the CLI ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    """A one-layer qwen3_moe with four experts and a one-layer draft sharing its tokenizer."""
    root = tmp_path_factory.mktemp("small")
    return (make_model("qwen3_moe", root / "model", num_hidden_layers=1, num_experts=4),
            make_model("qwen3", root / "draft", num_hidden_layers=1))


def export_args(model, draft, output, *flags) -> list[str]:
    return [str(model), "--draft", str(draft), "-o", str(output), "--quiet", *flags]


@pytest.mark.parametrize("heads,kv_heads,new,past", [(8, 2, 3, 5), (8, 2, 1, 6), (4, 4, 4, 0), (6, 3, 5, 0)])
def test_grouped_attention_equals_eager_attention_with_repeated_cache(heads, kv_heads, new, past):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import eager_attention_forward

    from spac.export.attention import grouped_attention
    from spac.export.trunk import causal_mask

    module = torch.nn.Module().eval()
    module.num_key_value_groups = heads // kv_heads
    gen = torch.Generator().manual_seed(heads * 100 + new)
    query = torch.randn(1, heads, new, 16, generator=gen)
    key, value = (torch.randn(1, kv_heads, past + new, 16, generator=gen) for _ in range(2))
    mask = causal_mask(past, new, window=4, dtype=torch.float32)
    ours, _ = grouped_attention(module, query, key, value, mask, scaling=0.25)
    theirs, _ = eager_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert ours.shape == theirs.shape == (1, new, heads, 16)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_sibling_matmuls_fuse_into_one_with_identical_results():
    from onnx import TensorProto, helper, numpy_helper

    from spac.export.fusion import fuse_sibling_matmuls

    rng = np.random.default_rng(0)
    shapes = {"wq": (16, 32), "wk": (16, 8), "wv": (16, 8), "wo": (32, 16)}
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in shapes.items()]
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
             helper.make_node("Relu", ["q"], ["q_act"]),
             helper.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
             helper.make_node("MatMul", ["q_act", "wo"], ["o"], name="o_proj")]  # another input: stays
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [3, width])
               for name, width in (("k", 8), ("v", 8), ("o", 16))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 16])],
                              outputs, weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    before = model.SerializeToString()

    assert fuse_sibling_matmuls(model) == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node].count("MatMul") == 2
    assert {t.name for t in model.graph.initializer} >= {"wo"} and "wq" not in {t.name for t in model.graph.initializer}
    x = {"x": rng.standard_normal((3, 16)).astype(np.float32)}
    expected = ort.InferenceSession(before, providers=["CPUExecutionProvider"]).run(None, x)
    actual = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)
    for a, b in zip(actual, expected):
        np.testing.assert_array_equal(a, b)


def test_cli_exports_verifies_and_force_replaces_the_old_package_whole(small_pair, tmp_path):
    output = tmp_path / "pkg"
    output.mkdir()
    (output / MANIFEST).write_text("schema_version: 1\nproducer: moe-spac\n")  # an earlier package
    (output / "stale.txt").write_text("left by an earlier export")
    done = subprocess.run([str(SPAC_EXPORT), *export_args(*small_pair, output, "--force")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "%|" not in done.stderr, done.stderr  # --quiet: no bar, transformers' "Loading weights" included
    for row in ("layers", "experts", "bytes per expert", "total bytes", "files"):
        assert re.search(rf"^{row}\s", done.stdout, re.M), done.stdout
    assert re.search(r"^verification\s+passed: max abs logit diff target \S+ \(tolerance \S+\), draft \S+ \(tolerance \S+\)",
                     done.stdout, re.M)
    assert not (output / "stale.txt").exists()
    manifest = load_manifest(output)
    for name in manifest.files:
        verify_file(manifest, name)
    assert os.listdir(tmp_path) == ["pkg"]  # no .partial- or .old- folder beside it


def test_no_verify_skips_verification(small_pair, tmp_path, capsys, monkeypatch):
    def verify_package(*args):
        raise AssertionError("verification ran despite --no-verify")

    monkeypatch.setattr("spac.export.verify.verify_package", verify_package)
    assert cli.main(export_args(*small_pair, tmp_path / "pkg", "--no-verify")) == 0
    assert re.search(r"^verification\s+skipped", capsys.readouterr().out, re.M)
    load_manifest(tmp_path / "pkg")


def test_graphs_past_the_protobuf_cap_keep_their_weights_beside_them(small_pair, tmp_path, monkeypatch):
    from spac.export import trunk

    monkeypatch.setattr(trunk, "INLINE_WEIGHTS_LIMIT", 0)  # every trunk graph counts as big
    assert cli.main(export_args(*small_pair, tmp_path / "pkg")) == 0  # verification ran on ORT
    manifest = load_manifest(tmp_path / "pkg")
    for graph in (manifest.target.embed, manifest.target.head, *(layer.file for layer in manifest.target.layers)):
        assert f"{graph}.data" in manifest.files, graph
    for name in manifest.files:
        verify_file(manifest, name)


def test_write_failing_mid_export_leaves_nothing_behind(small_pair, tmp_path, capsys, monkeypatch):
    built = []

    def build_expert_graph(*args, **kwargs):
        if len(built) == 2:  # the third expert's .data is written, its .onnx fails
            raise OSError(errno.ENOSPC, "No space left on device")
        built.append(real_build(*args, **kwargs))
        return built[-1]

    real_build = package.build_expert_graph
    monkeypatch.setattr(package, "build_expert_graph", build_expert_graph)
    code = cli.main(export_args(*small_pair, tmp_path / "pkg"))
    err = capsys.readouterr().err
    assert code != 0
    assert "spac-export: error:" in err and "No space left on device" in err
    assert len(built) == 2
    assert tree(tmp_path) == []


# --- bad input: one clear error before any model is loaded, nothing left behind ----------------


def a_file(path: Path) -> Path:
    path.write_bytes(b"\0")
    return path


def empty_folder(path: Path) -> Path:
    path.mkdir()
    return path


def config_only(path: Path, **config) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def without_weights(source: Path, path: Path, **changes) -> Path:
    """A copy of a model directory's config and tokenizer, with `changes` to its config."""
    shutil.copytree(source, path, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))
    return path


def other_tokenizer(tmp, model, draft):
    """Same vocabulary size as the target's, different tokens (trained on another corpus)."""
    path = without_weights(draft, tmp / "draft")
    build_tokenizer(path, vocab_size=len(json.loads((draft / "tokenizer.json").read_text())["model"]["vocab"]),
                    corpus_files=[Path(shutil.__file__)])
    return {"draft": path}


def read_only_output_folder(tmp, model, draft):
    (tmp / "out").chmod(0o555)
    if os.access(tmp / "out", os.W_OK):
        pytest.skip("permissions do not bind this user (root): a read-only folder is still writable")
    return {}


def output_parent_is_a_file(tmp, model, draft):
    (tmp / "out" / "file").write_text("not a folder")
    return {"output": tmp / "out" / "file" / "pkg"}


def existing_output(tmp, model, draft):
    (tmp / "out" / "pkg").mkdir()
    (tmp / "out" / "pkg" / "keep.txt").write_text("an earlier package")
    return {}


# name -> (setup(tmp, model, draft) -> the arguments it changes, fragments the error must contain)
BAD_INPUTS = {
    "model dir missing": (lambda tmp, model, draft: {"model": tmp / "no-such-model"},
                          ["no-such-model", "does not exist"]),
    "draft dir missing": (lambda tmp, model, draft: {"draft": tmp / "no-such-draft"},
                          ["draft", "no-such-draft", "does not exist"]),
    "model dir is a file": (lambda tmp, model, draft: {"model": a_file(tmp / "weights.bin")},
                            ["weights.bin", "not a readable directory"]),
    "no config.json": (lambda tmp, model, draft: {"model": empty_folder(tmp / "empty")},
                       ["empty", "no config.json", "save_pretrained"]),
    "not a causal LM": (lambda tmp, model, draft: {"model": config_only(tmp / "bert", model_type="bert",
                                                                       architectures=["BertModel"])},
                        ["not a causal language model", "BertModel", "ForCausalLM"]),
    "dense target": (lambda tmp, model, draft: {"model": draft},
                     ["'qwen3'", "not a Mixture-of-Experts model", "mixtral, qwen2_moe"]),
    "MoE draft": (lambda tmp, model, draft: {"draft": model},
                  ["unsupported architecture 'qwen3_moe'", "draft", "llama, qwen2, qwen3"]),
    "unsupported MoE architecture": (
        lambda tmp, model, draft: {"model": config_only(tmp / "granite", model_type="granitemoe",
                                                        architectures=["GraniteMoeForCausalLM"])},
        ["unsupported architecture 'granitemoe'", "supported: mixtral, qwen2_moe, qwen3_moe, olmoe"]),
    "architecture unknown to transformers": (
        lambda tmp, model, draft: {"model": without_weights(model, tmp / "made-up", model_type="zorblax_moe",
                                                            architectures=["ZorblaxMoeForCausalLM"])},
        ["unsupported architecture 'zorblax_moe'", "supported: mixtral, qwen2_moe, qwen3_moe, olmoe"]),
    "draft vocabulary size differs": (
        lambda tmp, model, draft: {"draft": without_weights(draft, tmp / "draft", vocab_size=1000)},
        ["draft's vocabulary (1000 tokens", "differs from the target's", "share the tokenizer"]),
    "draft tokenizer differs": (other_tokenizer, ["draft's tokenizer", "differs from the target's"]),
    "output exists without --force": (existing_output, ["already exists", "--force"]),
    "output folder read-only": (read_only_output_folder, ["out", "not writable"]),
    "output parent is a file": (output_parent_is_a_file, ["file", "is not a directory"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_clear_error_and_leaves_nothing(case, small_pair, tmp_path, capsys, monkeypatch):
    def load_model(*args):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(package, "load_model", load_model)
    (tmp_path / "out").mkdir()
    setup, fragments = BAD_INPUTS[case]
    model, draft = small_pair
    args = {"model": model, "draft": draft, "output": tmp_path / "out" / "pkg", **setup(tmp_path, model, draft)}
    before = snapshot(tmp_path / "out")

    code = cli.main(export_args(args["model"], args["draft"], args["output"]))

    errors = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(errors) == 1 and errors[0].startswith("spac-export: error: "), errors
    for fragment in fragments:
        assert fragment in errors[0]
    assert snapshot(tmp_path / "out") == before


def test_moe_architecture_without_moe_layers_is_rejected_and_cleaned_up(tmp_path, small_pair, capsys):
    """Caught only once the model is loaded, inside the temporary folder, which must go."""
    model = make_model("qwen3_moe", tmp_path / "model", num_hidden_layers=1, num_experts=4, mlp_only_layers=[0])
    (tmp_path / "out").mkdir()
    assert cli.main(export_args(model, small_pair[1], tmp_path / "out" / "pkg")) == 2
    assert "has no Mixture-of-Experts layer" in capsys.readouterr().err
    assert tree(tmp_path / "out") == []
