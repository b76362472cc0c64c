"""Export a model with Qwen3-30B-A3B's per-layer shape and measure spac-export's time and peak memory.

Builds a random-weight qwen3_moe checkpoint with the real model's layer dimensions (hidden 2048,
128 experts of intermediate size 768, top-8, 32 query / 4 KV heads of 128) in bf16, `--layers`
deep (default 8: ≈ 10 GB) with a small vocabulary, written shard by shard from random tensors
(make_models.make_streamed_model, so building it needs no more memory than a shard), plus a
small qwen3 draft with the same tokenizer, then runs spac-export on them in a subprocess with
this interpreter (`python -m spac.export.cli`: PYTHONPATH chooses the spac it runs, so two
checkouts can be compared). Reported: wall time, the subprocess's peak RSS (the kernel's max
resident set, from wait4) against the checkpoint's bytes and one layer's expert bytes, the
anonymous RSS sampled every 0.5 s, and the verification result when `--verify` is given
(verification loads both models whole through transformers).

    python scripts/export_scale_check.py --layers 8 --out results/export_scale.json
    python scripts/export_scale_check.py --layers 8 --hidden-size 1024 --num-experts 32 \\
        --moe-intermediate-size 512 --checkpoint-dtype float32   # the 1.6 GiB model of the issue
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_models import make_model, make_streamed_model  # noqa: E402

# Qwen3-30B-A3B's config.json, less its depth (48 layers) and vocabulary (151,936 tokens).
QWEN3_30B_A3B_LAYER = dict(
    hidden_size=2048, num_experts=128, moe_intermediate_size=768, num_experts_per_tok=8,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
    norm_topk_prob=True,
)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def expert_bytes_per_layer(config: dict, dtype: torch.dtype) -> int:
    """gate, up and down projections of every expert of one layer, at `dtype`."""
    per_expert = 3 * config["hidden_size"] * config["moe_intermediate_size"] * dtype.itemsize
    return per_expert * config["num_experts"]


def weight_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def rss_bytes(pid: int) -> tuple[int, int] | None:
    """The process's resident set and its anonymous part (VmRSS, RssAnon), None once it has exited.
    The rest is file pages, e.g. of a memory-mapped checkpoint: counted in RSS, but reclaimable."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = [re.search(rf"^{key}:\s+(\d+) kB", status, re.M) for key in ("VmRSS", "RssAnon")]
    return None if None in values else tuple(int(match.group(1)) * 1024 for match in values)


def run_export(command: list[str], interval: float = 0.5) -> dict:
    """Run the export; return its output, exit code, wall time, peak RSS and an RSS timeline
    of (seconds, RSS, anonymous RSS)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    output = {}
    readers = [threading.Thread(target=lambda name=name: output.__setitem__(name, getattr(process, name).read()))
               for name in ("stdout", "stderr")]
    for reader in readers:
        reader.start()
    timeline, exited = [], None
    while exited is None:
        rss = rss_bytes(process.pid)
        if rss is not None:
            timeline.append((round(time.perf_counter() - started, 1), *rss))
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            exited = (status, usage)
        else:
            time.sleep(interval)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(exited[0])  # reaped by wait4, not by Popen
    for reader in readers:
        reader.join()
    return {"returncode": process.returncode, "seconds": seconds, "peak_rss": exited[1].ru_maxrss * 1024,
            "peak_anon_sampled": max((anon for _, _, anon in timeline), default=0), "timeline": timeline,
            "stdout": output["stdout"], "stderr": output["stderr"]}


def export_command(model_dir: Path, draft_dir: Path | None, package: Path, verify: bool, dtype: str,
                   experts: str) -> list[str]:
    command = [sys.executable, "-m", "spac.export.cli", str(model_dir), "-o", str(package),
               "--force", "--quiet", "--dtype", dtype, "--experts", experts]
    if draft_dir is not None:
        command += ["--draft", str(draft_dir)]
    return command if verify else [*command, "--no-verify"]


def measure_export(model_dir: Path, draft_dir: Path | None, package: Path, verify: bool = True,
                   dtype: str = "float32", experts: str = "float") -> dict:
    """spac-export in a subprocess of this interpreter (no draft when draft_dir is None):
    run_export's measurements and the command."""
    command = export_command(model_dir, draft_dir, package, verify, dtype, experts)
    return {**run_export(command), "command": " ".join(command)}


def parse_verification(summary: str) -> dict | None:
    """The differences from spac-export's summary line; None when it did not verify."""
    match = re.search(r"max abs logit diff target (\S+) \(tolerance (\S+)\), draft (\S+) \(tolerance (\S+)\)",
                      summary)
    if not match:
        return None
    target, target_tolerance, draft, tolerance = (float(value) for value in match.groups())
    return {"passed": target <= target_tolerance and draft <= tolerance, "target_max_abs_diff": target,
            "target_tolerance": target_tolerance, "draft_max_abs_diff": draft, "tolerance": tolerance}


def exporter_source() -> str:
    """Where the subprocess's spac comes from (PYTHONPATH decides)."""
    done = subprocess.run([sys.executable, "-c", "import spac; print(spac.__file__)"], capture_output=True, text=True)
    return done.stdout.strip()


def gib(count: int) -> str:
    return f"{count / 2**30:.2f} GiB"


def build(work: Path, config: dict, checkpoint_dtype: torch.dtype) -> tuple[Path, Path]:
    """The target and draft under work/, reused when work/ already holds this recipe's build."""
    recipe = json.dumps({"config": config, "dtype": str(checkpoint_dtype)}, sort_keys=True)
    marker = work / "recipe.json"
    if marker.is_file() and marker.read_text() == recipe:
        return work / "model", work / "draft"
    shutil.rmtree(work / "model", ignore_errors=True)
    shutil.rmtree(work / "draft", ignore_errors=True)
    model_dir = make_streamed_model("qwen3_moe", work / "model", dtype=checkpoint_dtype, **config)
    draft_dir = make_model("qwen3", work / "draft")
    marker.write_text(recipe)
    return model_dir, draft_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/export_scale.json"), help="JSON report")
    parser.add_argument("--layers", type=int, default=8, help="number of MoE layers (default 8)")
    for field in ("hidden_size", "num_experts", "moe_intermediate_size"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=QWEN3_30B_A3B_LAYER[field],
                            help=f"default {QWEN3_30B_A3B_LAYER[field]} (Qwen3-30B-A3B)")
    parser.add_argument("--checkpoint-dtype", choices=DTYPES, default="bfloat16", help="default bfloat16")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="the package's dtype")
    parser.add_argument("--work-dir", type=Path, help="where models and package go (default: a temp folder, "
                                                      "removed at the end); a model built there before is reused")
    parser.add_argument("--experts", choices=["float", "int8", "int4"], default="float",
                        help="spac-export --experts: the routed experts' weights (default float, the package dtype)")
    parser.add_argument("--no-draft", action="store_true", help="export the target alone (no draft model)")
    parser.add_argument("--verify", action="store_true", help="let spac-export verify (loads the models whole)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="spac-scale-")) if args.work_dir is None else args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    config = {**QWEN3_30B_A3B_LAYER, "num_hidden_layers": args.layers, "hidden_size": args.hidden_size,
              "num_experts": args.num_experts, "moe_intermediate_size": args.moe_intermediate_size}
    if args.hidden_size != QWEN3_30B_A3B_LAYER["hidden_size"]:  # keep the heads' shape within the hidden size
        config |= {"num_attention_heads": args.hidden_size // 128, "num_key_value_heads": max(1, args.hidden_size // 512)}
    try:
        built = time.perf_counter()
        model_dir, draft_dir = build(work, config, DTYPES[args.checkpoint_dtype])
        build_seconds = time.perf_counter() - built
        package = work / "package"
        run = measure_export(model_dir, None if args.no_draft else draft_dir, package, args.verify, args.dtype,
                             args.experts)
        model_bytes = weight_bytes(model_dir)
        layer_bytes = expert_bytes_per_layer(config, DTYPES[args.checkpoint_dtype])
        package_bytes = sum(f.stat().st_size for f in package.rglob("*") if f.is_file()) if package.exists() else 0
    finally:
        shutil.rmtree(work if args.work_dir is None else work / "package", ignore_errors=True)

    report = {
        "config": config,
        "checkpoint_dtype": args.checkpoint_dtype,
        "experts": args.experts,
        "command": run["command"],
        "exporter": exporter_source(),
        "returncode": run["returncode"],
        "build_seconds": round(build_seconds, 1),
        "export_seconds": round(run["seconds"], 1),
        "peak_rss_bytes": run["peak_rss"],
        "checkpoint_bytes": model_bytes,
        "expert_bytes_per_layer": layer_bytes,
        "peak_rss_over_checkpoint_bytes": round(run["peak_rss"] / model_bytes, 3),
        "peak_anon_rss_bytes_sampled": run["peak_anon_sampled"],
        "package_bytes": package_bytes,
        "verification": parse_verification(run["stdout"]),
        "rss_timeline_s_rss_anon": run["timeline"][:: max(1, len(run["timeline"]) // 200)],
        "summary": run["stdout"],
        "stderr_tail": run["stderr"][-2000:],
    }
    print(run["stdout"], end="")
    if run["returncode"]:
        print(run["stderr"][-2000:], file=sys.stderr)
    print(f"\nexporter {report['exporter']}")
    print(f"exit {run['returncode']}, export {report['export_seconds']} s (checkpoint build {report['build_seconds']} s)")
    print(f"peak RSS {gib(run['peak_rss'])}; checkpoint {gib(model_bytes)} ({args.checkpoint_dtype}, "
          f"peak = {report['peak_rss_over_checkpoint_bytes']}x checkpoint); one layer's experts {gib(layer_bytes)}")
    print(f"peak anonymous RSS (sampled every 0.5 s) {gib(run['peak_anon_sampled'])}; package {gib(package_bytes)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return run["returncode"]


if __name__ == "__main__":
    sys.exit(main())
