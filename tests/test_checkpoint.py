"""Tests for the streaming export (spac.export.checkpoint, spac.export.stamping): checkpoints in
bf16, fp16 and fp32, sharded or not, export losslessly; a bad checkpoint is refused in one line
and leaves nothing behind; a disk filling up mid-export leaves nothing either; layers of one
structure cost one torch export and equal their own export; and peak memory does not grow with
the number of layers (measured in a subprocess).
"""

from __future__ import annotations

import errno
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from make_models import make_model, make_streamed_model
from onnx import numpy_helper
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from spac.export import cli, package, trunk
from spac.runtime.manifest import load_manifest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from export_scale_check import QWEN3_30B_A3B_LAYER, measure_export  # noqa: E402

SHARD = "model.safetensors"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A two-layer qwen3_moe with four experts (float32, one shard) and a one-layer draft whose head
    is tied to its embedding (as Qwen3-0.6B's is)."""
    root = tmp_path_factory.mktemp("checkpoints")
    return (make_model("qwen3_moe", root / "model", num_hidden_layers=2, num_experts=4),
            make_model("qwen3", root / "draft", num_hidden_layers=1, tie_word_embeddings=True))


def resave(model_dir: Path, out: Path, dtype: torch.dtype, max_shard_size="50KB") -> Path:
    """The model saved again in `dtype`, in shards of at most max_shard_size with an index."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(model_dir / name, out / name)
    return out


def export(model: Path, draft: Path, output: Path, *flags) -> int:
    return cli.main([str(model), "--draft", str(draft), "-o", str(output), "--quiet", *flags])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_float_checkpoints_export_and_reproduce_the_model(dtype, pair, tmp_path, capsys):
    """Read shard by shard and cast to float32, the package reproduces transformers' float32
    logits of the same checkpoint (the export's own verification, 16 tokens + 8 decode steps)."""
    model = resave(pair[0], tmp_path / "model", dtype)
    assert (model / "model.safetensors.index.json").is_file() and len(list(model.glob("*.safetensors"))) > 2
    assert export(model, pair[1], tmp_path / "pkg") == 0, capsys.readouterr().err
    summary = capsys.readouterr().out
    target_diff = float(summary.split("max abs logit diff target ")[1].split(" ")[0])
    assert target_diff <= 1e-4, summary
    manifest = load_manifest(tmp_path / "pkg")
    # An expert's file holds exactly the checkpoint's tensors, cast to float32.
    weights = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).model.layers[1].mlp.experts
    data = np.fromfile(manifest.root / manifest.target.experts.path(1, 3, ".data"), dtype=np.float32)
    expected = np.concatenate([weights.gate_up_proj[3].T.detach().numpy().ravel(),
                               weights.down_proj[3].T.detach().numpy().ravel()])
    np.testing.assert_array_equal(data, expected)


# --- bad checkpoints: one line, exit 2, nothing left ---------------------------------------------


def rewrite(model: Path, change) -> None:
    """Apply change(tensors) to the single shard's tensors and write it back."""
    tensors = load_file(model / SHARD)
    change(tensors)
    save_file(tensors, model / SHARD, metadata={"format": "pt"})


def drop_tensor(name):
    return lambda model: rewrite(model, lambda tensors: tensors.pop(name))


def reshape_tensor(name, shape):
    return lambda model: rewrite(model, lambda tensors: tensors.__setitem__(name, torch.zeros(shape)))


def retype_tensor(name, dtype):
    return lambda model: rewrite(model, lambda tensors: tensors.__setitem__(name, tensors[name].to(dtype)))


def truncate_shard(model: Path) -> None:
    data = (model / SHARD).read_bytes()
    (model / SHARD).write_bytes(data[: len(data) - 1000])


def corrupt_header(model: Path) -> None:
    with open(model / SHARD, "r+b") as file:
        file.seek(8)
        file.write(b"garbage!")


def sharded(change):
    """The model in float32 shards with an index, then change(model)."""
    def setup(model: Path) -> None:
        out = model.with_name("sharded")
        resave(model, out, torch.float32)
        shutil.rmtree(model)
        out.rename(model)
        change(model)
    return setup


def remove_a_shard(model: Path) -> None:
    sorted(model.glob("model-*.safetensors"))[1].unlink()


def index_names_a_path(model: Path) -> None:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps(index))


def mxfp4_config(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (model / "config.json").write_text(json.dumps(config))


def no_weights(model: Path) -> None:
    (model / SHARD).unlink()


Q_PROJ = "model.layers.1.self_attn.q_proj.weight"
# name -> (change to a copy of the model directory, fragments of the one error line)
BAD_CHECKPOINTS = {
    "tensor missing": (drop_tensor(Q_PROJ), ["has no tensor for model.layers.1.self_attn.q_proj.weight",
                                             "incomplete"]),
    "tensor mis-shaped": (reshape_tensor(Q_PROJ, (5, 64)), ["model.layers.1.self_attn.q_proj.weight", "shape [5, 64]",
                                                            "config.json implies [64, 64]"]),
    "an expert missing": (drop_tensor("model.layers.0.mlp.experts.3.up_proj.weight"),
                          ["model.layers.0.mlp.experts.gate_up_proj cannot be built from",
                           "model.layers.0.mlp.experts.0.gate_proj.weight and 6 more", "incomplete"]),
    "an int8 tensor": (retype_tensor(Q_PROJ, torch.int8), [Q_PROJ, "is I8", "float checkpoints (BF16, F16, F32)"]),
    "truncated shard": (truncate_shard, [SHARD, "truncated or corrupt", "not fully covered"]),
    "corrupt header": (corrupt_header, [SHARD, "truncated or corrupt"]),
    "index names an absent shard": (sharded(remove_a_shard), ["model.safetensors.index.json names shard model-0000",
                                                              "which is absent"]),
    "index names a path": (sharded(index_names_a_path), ["'../elsewhere.safetensors'", "not a file name"]),
    "quantized (MXFP4) checkpoint": (mxfp4_config, ["quantization_config (quant_method 'mxfp4')", "MXFP4",
                                                    "dequantize it first"]),
    "no safetensors": (no_weights, ["has neither model.safetensors nor model.safetensors.index.json"]),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoint_is_refused_in_one_line_and_leaves_nothing(case, pair, tmp_path, capsys):
    change, fragments = BAD_CHECKPOINTS[case]
    model = tmp_path / "model"
    shutil.copytree(pair[0], model)
    change(model)
    (tmp_path / "out").mkdir()
    capsys.readouterr()
    code = export(model, pair[1], tmp_path / "out" / "pkg")
    errors = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(errors) == 1 and errors[0].startswith("spac-export: error: "), errors
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert list((tmp_path / "out").iterdir()) == []


def test_disk_filling_up_mid_export_is_one_line_and_leaves_nothing(pair, tmp_path, capsys, monkeypatch):
    """ENOSPC injected at the write of the third expert's weights."""
    written = []

    class FullDisk:
        def __init__(self, file):
            self.file = file

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            if len(written) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data)

    def open_file(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        if str(path).endswith(".data") and "w" in mode:
            written.append(path)
            return FullDisk(file)
        return file

    monkeypatch.setattr(package, "open", open_file, raising=False)
    (tmp_path / "out").mkdir()
    code = export(*pair, tmp_path / "out" / "pkg")
    errors = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(written) == 3
    assert len(errors) == 1 and "no space left on the device" in errors[0], errors
    assert str(tmp_path / "out") in errors[0] and "nothing was left behind" in errors[0]
    assert list((tmp_path / "out").iterdir()) == []


# --- layers of one structure: one torch export, stamped --------------------------------------


def graph_content(path: Path) -> tuple:
    """A graph's nodes and its initializers' values by name."""
    model = onnx.load(path)
    nodes = [(n.op_type, list(n.input), list(n.output), str(n.attribute)) for n in model.graph.node]
    return nodes, {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_layers_of_one_structure_are_traced_once_and_equal_their_own_export(tmp_path, monkeypatch):
    model = make_model("qwen3_moe", tmp_path / "model", num_hidden_layers=4, num_experts=4)
    draft = make_model("qwen3", tmp_path / "draft", num_hidden_layers=3)
    traced = []
    real_trace = trunk.trace_graph
    monkeypatch.setattr(trunk, "trace_graph", lambda *args: traced.append(args[0]) or real_trace(*args))
    assert export(model, draft, tmp_path / "pkg") == 0  # verified against transformers
    kinds = [type(module).__name__ for module in traced]
    assert kinds == ["EmbedGraph", "LayerGraph", "HeadGraph"] * 2  # target then draft, whatever their depth

    monkeypatch.setattr(trunk, "trace_graph", real_trace)
    family = package.family_for(AutoModelForCausalLM.from_pretrained(model).config, draft=False)
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32,
                                                     attn_implementation=family.attention).eval()
    embed = trunk.EmbedGraph(family, reference)
    ids, positions = torch.tensor([[7, 3, 5]]), torch.arange(3)[None]
    _, cos, sin = embed(ids, positions)
    one_token = embed(ids[:, :1], positions[:, :1])
    (tmp_path / "own").mkdir()
    trunk.export_layer(trunk.LayerGraph(family, reference, 3), one_token, cos, sin, tmp_path / "own", templates={})
    monkeypatch.setattr(trunk, "make_template", lambda *args: None)  # the plain per-layer export
    trunk.export_layer(trunk.LayerGraph(family, reference, 2), one_token, cos, sin, tmp_path / "own", templates={})
    for index in (2, 3):
        ours_nodes, ours = graph_content(tmp_path / "pkg" / "target" / f"layer_{index:03d}.onnx")
        own_nodes, own = graph_content(tmp_path / "own" / f"layer_{index:03d}.onnx")
        assert ours_nodes == own_nodes
        assert ours.keys() == own.keys()
        for name in own:
            np.testing.assert_array_equal(ours[name], own[name], err_msg=name)


# --- memory ------------------------------------------------------------------------------------


def streamed(root: Path, layers: int, **shape) -> tuple[Path, Path]:
    model = make_streamed_model("qwen3_moe", root / f"model-{layers}", num_hidden_layers=layers, **shape)
    draft = root / "draft"
    if not draft.exists():
        make_model("qwen3", draft, num_hidden_layers=1)
    return model, draft


def checkpoint_bytes(model: Path) -> int:
    return sum(f.stat().st_size for f in model.glob("*.safetensors"))


def test_peak_memory_does_not_grow_with_the_number_of_layers(tmp_path):
    """Exported in a subprocess (peak RSS from wait4): six layers of 48 MB of bf16 experts each
    (96 MB as float32) against one. Loading the whole model would add at least the five extra
    layers' bytes; streaming adds at most a small part of one."""
    shape = dict(hidden_size=512, num_experts=16, moe_intermediate_size=1024, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=64, intermediate_size=1024)
    runs = {}
    for layers in (1, 6):
        model, draft = streamed(tmp_path, layers, **shape)
        runs[layers] = measure_export(model, draft, tmp_path / f"pkg-{layers}", verify=False)
        assert runs[layers]["returncode"] == 0, runs[layers]["stderr"][-2000:]
        shutil.rmtree(tmp_path / f"pkg-{layers}")
    added_float32_bytes = 2 * (checkpoint_bytes(tmp_path / "model-6") - checkpoint_bytes(tmp_path / "model-1"))
    growth = runs[6]["peak_rss"] - runs[1]["peak_rss"]
    assert growth < 0.2 * added_float32_bytes, (growth, added_float32_bytes)


@pytest.mark.slow
@pytest.mark.parametrize("experts, dtype", [("float", "float16"), ("int4", "float32")])
def test_qwen3_30b_a3b_layer_shape_exports_under_3_gb(tmp_path, experts, dtype):
    """Two layers of Qwen3-30B-A3B's shape (128 experts of 2048 x 768, bf16: 2.4 GB of experts),
    exported without a draft, to float16 or with int4 experts, in under 3 GB of peak RSS."""
    model, _ = streamed(tmp_path, 2, **QWEN3_30B_A3B_LAYER)
    package = tmp_path / "pkg"
    run = measure_export(model, None, package, verify=False, dtype=dtype, experts=experts)
    assert run["returncode"] == 0, run["stderr"][-2000:]
    assert checkpoint_bytes(model) > 2.4e9
    assert run["peak_rss"] < 3 * 2**30, run["peak_rss"]
    assert not (package / "draft").exists()
    if experts == "int4":  # per 32 weights: 4 bits each, a float32 scale and a 4-bit zero point
        weights = 2 * QWEN3_30B_A3B_LAYER["num_experts"] * 3 * 2048 * 768
        expert_bytes = sum(f.stat().st_size for f in (package / "target" / "experts").rglob("*.data"))
        assert expert_bytes < 1.05 * weights * (4 + (32 + 4) / 32) / 8, expert_bytes
