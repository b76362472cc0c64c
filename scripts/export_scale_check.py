"""Export a model with Qwen3-30B-A3B's per-layer shape and measure spac-export's peak memory.

Builds a random-weight qwen3_moe with the real model's layer dimensions (hidden 2048, 128
experts of intermediate size 768, top-8, 32 query / 4 KV heads of 128) but only 2 layers and a
small vocabulary, plus a small qwen3 draft with the same tokenizer, then runs `spac-export` on
them in a subprocess. Reported: the subprocess's peak RSS (the kernel's max resident set, from
wait4) against the model's weight bytes and one layer's expert bytes, the wall time, and the
verification result.

RSS counts two kinds of pages: anonymous memory (the loaded model, copies) and the file pages of
the memory-mapped checkpoint that loading touched, which stay mapped while any weight is a view
of the file but are page cache the kernel reclaims under pressure. So the anonymous RSS is
sampled too (every 0.5 s): the exporter streams one expert at a time, so its anonymous peak
should stay below model + one layer; more means some step copies a whole layer.

    python scripts/export_scale_check.py --out results/export_scale.json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_models import make_model  # noqa: E402

# Qwen3-30B-A3B's config.json, less its depth (48 layers) and vocabulary (151,936 tokens).
QWEN3_30B_A3B_LAYER = dict(
    hidden_size=2048, num_experts=128, moe_intermediate_size=768, num_experts_per_tok=8,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
    norm_topk_prob=True,
)
FLOAT32_BYTES = 4


def expert_bytes_per_layer(config: dict) -> int:
    """gate, up and down projections of every expert of one layer, at float32."""
    per_expert = 3 * config["hidden_size"] * config["moe_intermediate_size"] * FLOAT32_BYTES
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


def parse_verification(summary: str) -> dict | None:
    """The differences from spac-export's summary line; None when it did not verify."""
    match = re.search(r"max abs logit diff target (\S+), draft (\S+) \(tolerance (\S+)\)", summary)
    if not match:
        return None
    target, draft, tolerance = (float(value) for value in match.groups())
    return {"passed": max(target, draft) <= tolerance, "target_max_abs_diff": target,
            "draft_max_abs_diff": draft, "tolerance": tolerance}


def gib(count: int) -> str:
    return f"{count / 2**30:.2f} GiB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/export_scale.json"), help="JSON report")
    parser.add_argument("--layers", type=int, default=2, help="number of MoE layers (default 2)")
    parser.add_argument("--work-dir", type=Path, help="where models and package go (default: a temp folder, "
                                                      "removed at the end)")
    parser.add_argument("--no-verify", action="store_true", help="pass --no-verify to spac-export")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="spac-scale-")) if args.work_dir is None else args.work_dir
    try:
        config = {**QWEN3_30B_A3B_LAYER, "num_hidden_layers": args.layers}
        built = time.perf_counter()
        model_dir = make_model("qwen3_moe", work / "model", **config)
        draft_dir = make_model("qwen3", work / "draft")
        build_seconds = time.perf_counter() - built
        package = work / "package"
        # This interpreter's spac, not whichever `spac-export` an install put on the PATH.
        command = [sys.executable, "-m", "spac.export.cli", str(model_dir), "--draft", str(draft_dir), "-o",
                   str(package), "--force", "--quiet"]
        if args.no_verify:
            command.append("--no-verify")
        run = run_export(command)
        model_bytes, layer_bytes = weight_bytes(model_dir), expert_bytes_per_layer(config)
        package_bytes = sum(f.stat().st_size for f in package.rglob("*") if f.is_file()) if package.exists() else 0
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    report = {
        "config": config,
        "command": " ".join(command),
        "returncode": run["returncode"],
        "build_seconds": round(build_seconds, 1),
        "export_seconds": round(run["seconds"], 1),
        "peak_rss_bytes": run["peak_rss"],
        "model_weight_bytes": model_bytes,
        "expert_bytes_per_layer": layer_bytes,
        "peak_rss_over_model_bytes": round(run["peak_rss"] / model_bytes, 3),
        "peak_rss_minus_model_in_layers": round((run["peak_rss"] - model_bytes) / layer_bytes, 3),
        "peak_anon_rss_bytes_sampled": run["peak_anon_sampled"],
        "peak_anon_minus_model_in_layers": round((run["peak_anon_sampled"] - model_bytes) / layer_bytes, 3),
        "package_bytes": package_bytes,
        "verification": parse_verification(run["stdout"]),
        "rss_timeline_s_rss_anon": run["timeline"][:: max(1, len(run["timeline"]) // 200)],
        "summary": run["stdout"],
        "stderr_tail": run["stderr"][-2000:],
    }
    print(run["stdout"], end="")
    if run["returncode"]:
        print(run["stderr"][-2000:], file=sys.stderr)
    print(f"\nexit {run['returncode']}, export {report['export_seconds']} s (model build {report['build_seconds']} s)")
    print(f"peak RSS {gib(run['peak_rss'])}; model weights {gib(model_bytes)} "
          f"(peak = {report['peak_rss_over_model_bytes']}x model); one layer's experts {gib(layer_bytes)} "
          f"(peak - model = {report['peak_rss_minus_model_in_layers']} layers)")
    print(f"peak anonymous RSS (sampled every 0.5 s) {gib(run['peak_anon_sampled'])} "
          f"(peak - model = {report['peak_anon_minus_model_in_layers']} layers)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return run["returncode"]


if __name__ == "__main__":
    sys.exit(main())
