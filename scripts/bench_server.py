#!/usr/bin/env python3
"""spac-serve's per-token overhead: the same greedy generation through Runtime.generate, through
/v1/completions and through /v1/completions with stream=true (the real openai client on a
loopback server in this process), interleaved in one run.

    python scripts/bench_server.py [--package DIR] [--tokens 64] [--repeats 5] [--out results/bench_server.json]

Every contender generates the same tokens from the same prompt with the caches in the same state
(the server reuses the cache, so the direct calls do too), so the wall-time differences are the
server's: HTTP, JSON, the worker-thread hand-off and, streaming, one event per piece.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_chat import add_common_flags, package_dir, write_report  # noqa: E402

PROMPT = "def parse_config(path):\n    "


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_flags(parser, "results/bench_server.json")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args(argv)

    import openai

    from spac.runtime import Runtime
    from spac.runtime.server import BackgroundServer, Server

    with Runtime(package_dir(args), profile=args.profile) as runtime:
        live = BackgroundServer(Server(runtime, "bench"))
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0, timeout=600)
        request = dict(model="bench", prompt=PROMPT, max_tokens=args.tokens, temperature=0,
                       extra_body={"return_token_ids": True})

        def direct():
            return runtime.generate(PROMPT, max_new_tokens=args.tokens, temperature=0, reuse_cache=True).token_ids

        def whole():
            return client.completions.create(**request).choices[0].model_extra["token_ids"]

        def streamed():
            text = "".join(chunk.choices[0].text for chunk in client.completions.create(stream=True, **request)
                           if chunk.choices)
            return runtime.tokenizer.encode(text, add_special_tokens=False)

        contenders = {"generate": direct, "server": whole, "server_stream": streamed}
        expected = direct()
        if whole() != expected:
            raise SystemExit("the server's greedy tokens differ from Runtime.generate's")
        streamed()  # warm-up of the streaming path
        seconds = {name: [] for name in contenders}
        for round_ in range(args.repeats):
            names = list(contenders)
            names = names[round_ % len(names):] + names[:round_ % len(names)]  # rotate who goes first
            for name in names:
                started = time.perf_counter()
                contenders[name]()
                seconds[name].append(time.perf_counter() - started)
        live.stop()
    tokens = len(expected)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    overhead_ms = {name: (median[name] - median["generate"]) / tokens * 1000 for name in median if name != "generate"}
    report = {"tokens": tokens, "seconds": seconds, "median_seconds": median, "overhead_ms_per_token": overhead_ms,
              "ms_per_token": {name: value / tokens * 1000 for name, value in median.items()}}
    for name, value in median.items():
        extra = f", overhead {overhead_ms[name]:+.2f} ms/token" if name in overhead_ms else ""
        print(f"{name:>13}: {value * 1000:8.1f} ms for {tokens} tokens ({value / tokens * 1000:.2f} ms/token){extra}")
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
