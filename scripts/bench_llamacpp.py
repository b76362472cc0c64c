#!/usr/bin/env python3
"""spac against llama.cpp: decode tokens/s of the same model, every expert resident, on the CPU,
spac int4 against llama.cpp Q4_0 and spac float32 against llama.cpp F32, measured round-robin.

    python scripts/bench_llamacpp.py [--llama-cpp DIR] [--threads 2] [--tokens 64] [--repeats 5]
                                     [--int4 32,128-symmetric] [--out results/bench_llamacpp.json]

The model is bench_runtime.py's random-weight Qwen3-MoE (432 M parameters: hidden 1024, 8
layers, 32 experts, top-4). spac: `Runtime.generate(..., speculative=False)` after a 16-token
prompt, with the global thread pool (spac-run's default); int4 is `--experts int4 --trunk int4`
at each block layout `--int4` names (default 32: block 32, asymmetric; `128-symmetric`: blocks of
128 with no zero points, 4.25 bits a weight against Q4_0's 4.5), every one measured against the
same Q4_0; routers and embeddings stay float32. llama.cpp: `llama-bench -p 0 -n
TOKENS -t THREADS` on GGUF files that its own convert_hf_to_gguf.py (F32) and llama-quantize
(Q4_0) make from the model directory (scripts/gguf_convert.py: the converter runs with its
pre-tokenizer lookup patched; llama-bench does not use the model's tokens).

DIR (or $SPAC_LLAMA_CPP) is a llama.cpp source folder with build/bin/llama-bench and
llama-quantize; without one, llama.cpp is skipped with a message and only spac is measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_runtime import build_package, interleaved_rates, runtime_rate  # noqa: E402
from gguf_convert import (LLAMA_CPP_ENVIRONMENT, LLAMA_TYPE_OF_BITS, add_llama_cpp_argument, convert_to_gguf,  # noqa: E402
                          llama_cpp_binaries, quantize_gguf)
from spac.ops.quantization import CLI_BLOCK_SIZES, DEFAULT_BLOCK_SIZE  # noqa: E402


def llama_cpp_tools(folder: Path | None) -> dict | None:
    """Paths of llama-bench and llama-quantize and the converter, or None (with the reason printed)."""
    if folder is None:
        print(f"llama.cpp: skipped (give --llama-cpp DIR or set {LLAMA_CPP_ENVIRONMENT} to a built llama.cpp folder)")
        return None
    tools = {"bench": llama_cpp_binaries(folder) / "llama-bench", "quantize": llama_cpp_binaries(folder) / "llama-quantize",
             "convert": folder / "convert_hf_to_gguf.py"}
    missing = [str(path) for path in tools.values() if not path.is_file()]
    if missing:
        print(f"llama.cpp: skipped ({', '.join(missing)} missing: build llama-bench and llama-quantize)")
        return None
    return tools


def int4_layouts(text: str) -> list[tuple[int, bool]]:
    """--int4's value: block sizes, each optionally `-symmetric` (e.g. "32,128-symmetric")."""
    layouts = []
    for item in text.split(","):
        block, _, kind = item.strip().partition("-")
        if not block.isdigit() or int(block) not in CLI_BLOCK_SIZES or kind not in ("", "symmetric"):
            raise argparse.ArgumentTypeError(f"{item!r}: give a block size of {', '.join(map(str, CLI_BLOCK_SIZES))}, "
                                             "optionally followed by -symmetric")
        layouts.append((int(block), kind == "symmetric"))
    return layouts


def int4_flags(block: int, symmetric: bool) -> tuple[str, ...]:
    """spac-export's flags for int4 experts and trunk in this layout."""
    flags = ("--experts", "int4", "--trunk", "int4")
    flags += ("--block-size", str(block)) if block != DEFAULT_BLOCK_SIZE else ()
    return flags + (("--symmetric",) if symmetric else ())


def int4_name(block: int, symmetric: bool) -> str:
    return f"int4 b{block}" + (" symmetric" if symmetric else "")


def gguf_precision(precision: str) -> str:
    """The GGUF a spac precision is measured against: "float32" (llama.cpp F32) or "int4" (Q4_0)."""
    return "float32" if precision == "float32" else "int4"


def llama_name(precision: str) -> str:
    return "llama.cpp " + ("F32" if gguf_precision(precision) == "float32" else "Q4_0")


def gguf_files(tools: dict, model_dir: Path, work: Path) -> dict[str, Path]:
    llama_cpp = tools["convert"].parent
    f32 = convert_to_gguf(llama_cpp, model_dir, work)
    return {"float32": f32, "int4": quantize_gguf(llama_cpp, f32, LLAMA_TYPE_OF_BITS[4])}


def llama_bench_rate(bench: Path, model: Path, tokens: int, threads: int):
    def decode_rate() -> float:
        done = subprocess.run([str(bench), "-m", str(model), "-p", "0", "-n", str(tokens), "-t", str(threads),
                               "-r", "1", "-o", "json"], check=True, capture_output=True, text=True)
        return float(json.loads(done.stdout)[0]["avg_ts"])

    return decode_rate


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_llama_cpp_argument(parser, "llama-bench and llama-quantize")
    parser.add_argument("--work", type=Path, default=Path("cache/bench_runtime"), help="model and package cache")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--int4", type=int4_layouts, default=[(32, False)],
                        help="int4 block layouts to measure, comma-separated: a block size, optionally -symmetric "
                             "(default: 32, asymmetric)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_llamacpp.json"))
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir, float_package = build_package(args.work)
    packages = {"float32": float_package}
    packages.update({int4_name(*layout): build_package(args.work, *int4_flags(*layout))[1] for layout in args.int4})
    tools = llama_cpp_tools(args.llama_cpp)
    from spac.runtime import Runtime

    prompt = list(range(10, 26))
    contenders = {}
    ggufs = gguf_files(tools, model_dir, args.work) if tools else {}
    for precision, package in packages.items():
        runtime = Runtime(package, threads=args.threads, global_thread_pool=True)
        contenders[f"spac {precision}"] = runtime_rate(runtime, prompt, args.tokens)
        llama = llama_name(precision)
        if gguf_precision(precision) in ggufs and llama not in contenders:
            contenders[llama] = llama_bench_rate(tools["bench"], ggufs[gguf_precision(precision)], args.tokens,
                                                 args.threads)
    rates = interleaved_rates(contenders, args.repeats)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    report = {"threads": args.threads, "tokens": args.tokens, "repeats": args.repeats, "rates": rates,
              "median_tokens_per_second": medians}
    for precision in packages:
        spac, llama = f"spac {precision}", llama_name(precision)
        if llama in rates:
            per_round = [a / b for a, b in zip(rates[spac], rates[llama])]
            report[f"{spac} / {llama}"] = {"median": medians[spac] / medians[llama], "per_round": per_round}
            print(f"{spac} {medians[spac]:.1f} tok/s vs {llama} {medians[llama]:.1f} tok/s: "
                  f"{medians[spac] / medians[llama]:.2f}x (per round {min(per_round):.2f}-{max(per_round):.2f}x)")
        else:
            print(f"{spac} {medians[spac]:.1f} tok/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
