#!/usr/bin/env python3
"""Second-turn time to first token of a chat with KV cache reuse against a cold prefill of the
same conversation, interleaved in one run.

    python scripts/bench_chat.py [--package DIR] [--repeats 5] [--out results/bench_chat.json]

Each round answers the first turn, then times the second turn twice, alternating which goes
first: reusing the caches the first turn left (only the new turn is prefilled) and with
reuse off (the whole conversation is prefilled). Without --package it uses bench_runtime.py's
random-weight Qwen3-MoE (built and exported once into cache/bench_runtime).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

FIRST = ("You are reviewing a pull request that changes how a queue drains its workers. Read the "
         "description carefully: the old code stopped every worker at once and lost the items they "
         "held; the new code asks each worker to finish its current item first. Summarize the change.")
SECOND = "Which tests would you add?"


def add_common_flags(parser: argparse.ArgumentParser, out: str) -> None:
    """The package, repeats and report flags both chat and server benchmarks take."""
    parser.add_argument("--package", type=Path, default=None, help="a spac package (default: bench_runtime's)")
    parser.add_argument("--work", type=Path, default=Path("cache/bench_runtime"), help="model and package cache")
    parser.add_argument("--profile", default="cpu-only")
    parser.add_argument("--repeats", type=int, default=5, help="rounds, each timing every contender once")
    parser.add_argument("--out", type=Path, default=Path(out))


def package_dir(args) -> Path:
    if args.package:
        return args.package
    import bench_runtime

    return bench_runtime.build_package(args.work)[1]


def second_turn_ttft(runtime, reply_tokens: int, reuse: bool) -> dict:
    from spac.runtime.chat import chat_prompt

    conversation = [{"role": "user", "content": FIRST}]
    first = runtime.chat(conversation, max_new_tokens=reply_tokens)
    conversation += [{"role": "assistant", "content": first.text}, {"role": "user", "content": SECOND}]
    ids = chat_prompt(runtime.tokenizer, conversation)
    result = runtime.generate(ids, max_new_tokens=reply_tokens, reuse_cache=reuse)
    stats = result.stats.as_dict()
    return {"prompt_tokens": len(ids), "prefilled": len(ids) - stats["reused_prompt_tokens"],
            "ttft_seconds": stats["prefill_seconds"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_flags(parser, "results/bench_chat.json")
    parser.add_argument("--reply-tokens", type=int, default=16)
    args = parser.parse_args(argv)

    from spac.runtime import Runtime

    runs = {"reuse": [], "cold": []}
    with Runtime(package_dir(args), profile=args.profile) as runtime:
        second_turn_ttft(runtime, args.reply_tokens, True)  # ORT warm-up
        for round_ in range(args.repeats):
            order = ("reuse", "cold") if round_ % 2 == 0 else ("cold", "reuse")
            for name in order:
                runs[name].append(second_turn_ttft(runtime, args.reply_tokens, name == "reuse"))
    median = {name: statistics.median(r["ttft_seconds"] for r in rows) for name, rows in runs.items()}
    report = {"package": str(args.package or args.work), "reply_tokens": args.reply_tokens, "runs": runs,
              "median_ttft_seconds": median, "speedup": median["cold"] / median["reuse"]}
    for name, rows in runs.items():
        print(f"{name:>5}: second-turn TTFT {median[name] * 1000:7.1f} ms (median of {len(rows)}), "
              f"prefilled {rows[0]['prefilled']} of {rows[0]['prompt_tokens']} tokens")
    print(f"reuse speed-up: {report['speedup']:.2f}x")
    write_report(args.out, report)
    return 0


def write_report(path: Path, report: dict) -> None:
    """The JSON report, written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
