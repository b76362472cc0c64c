#!/usr/bin/env python3
"""The first run: speculative decoding and expert paging at work on a model trained here.

    python scripts/demo.py                  # a few minutes on 2 cores the first time; reruns reuse the model
    python scripts/demo.py --quick          # a seconds-long training run (the tests): the text is noise
    python scripts/demo.py --host-budget 25% --prompt "class Stack:"

Four steps, each command printed before it runs:
1. scripts/train_small_moe.py --preset demo trains a small Qwen3-MoE and a draft distilled from
   it on the standard library's sources (or reuses them when the arguments match);
2. spac-export turns the pair into a package;
3. spac-run generates from the prompt with speculative decoding while the host may cache only
   --host-budget of the expert bytes, so the other experts are paged from the package on disk;
   its stats line shows the draft's acceptance, the expert cache's hit rate and the bytes paged;
4. spac-serve serves the package under the same budget on a free loopback port, the openai
   client asks it the same prompt, and the server is stopped. Greedy decoding is lossless, so
   both answers are the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from spac.runtime.cli import stats_line

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TRAIN_SCRIPT = HERE / "train_small_moe.py"
STEPS = 4
SERVER_START_TIMEOUT_S = 120


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "cache" / "demo",
                        help="folder for the trained models and the package")
    parser.add_argument("--quick", action="store_true", help="train for seconds instead of minutes (tests)")
    parser.add_argument("--prompt", default="def add(a, b):\n    return")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--host-budget", default="40%",
                        help="host RAM for the expert cache, as for spac-run; under 100%% experts are paged")
    return parser.parse_args(argv)


def shown(part) -> str:
    """A command-line part as the user would type it: paths under the current folder relative."""
    text = str(part)
    if os.path.isabs(text) and Path(text).is_relative_to(Path.cwd()):
        return os.path.relpath(text)
    return text


def announce(number: int, what: str) -> None:
    print(f"\n[{number}/{STEPS}] {what}", flush=True)


def echo(command: list) -> list[str]:
    print("$", shlex.join(shown(part) for part in command), flush=True)
    return [str(part) for part in command]


def run(command: list, capture: bool = False) -> str:
    """Run a command, its progress on this terminal; with `capture`, return its stdout."""
    result = subprocess.run(echo(command), check=True, text=True, stdout=subprocess.PIPE if capture else None)
    return result.stdout


def spac_command(name: str) -> Path:
    """The spac-* command installed beside this Python."""
    return Path(sys.executable).parent / name


def train(args, out: Path) -> dict:
    announce(1, "train (or reuse) a small MoE model and its draft")
    mode = ["--quick"] if args.quick else ["--preset", "demo"]
    report = json.loads(run([sys.executable, TRAIN_SCRIPT, *mode, "--out", out], capture=True))
    print(f"held-out perplexity {report['moe']['heldout_perplexity']:.1f} (MoE) / "
          f"{report['draft']['heldout_perplexity']:.1f} (draft), draft acceptance at γ=4 "
          f"{report['speculative']['acceptance_rate']:.0%} in training's own check, "
          f"trained in {report['train_wall_time_s']:.0f} s", flush=True)
    return report


def export(out: Path, package: Path) -> None:
    announce(2, "export the pair as a spac package")
    run([spac_command("spac-export"), out / "small-moe", "--draft", out / "small-draft", "-o", package, "--force"])


def generate(args, package: Path) -> dict:
    announce(3, f"generate with speculative decoding, the host caching {args.host_budget} of the expert bytes")
    output = run([spac_command("spac-run"), "--package", package, "--host-budget", args.host_budget,
                  "--prompt", args.prompt, "--max-new-tokens", args.max_new_tokens, "--json"], capture=True)
    local = json.loads(output)
    print(args.prompt + local["text"])
    print(stats_line(local["stats"]))
    print("(acceptance: the share of the draft's tokens the target kept; hit rate: expert calls whose weights "
          "were in the host cache; paged: expert bytes read from the package on disk)", flush=True)
    return local


def serve_and_ask(args, package: Path) -> dict:
    """Start spac-serve, ask it the prompt with the openai client, stop it; the reply's text, ids and stats."""
    import openai

    announce(4, "serve the package over the OpenAI API and ask it the same")
    port = free_port()
    server = subprocess.Popen(echo([spac_command("spac-serve"), "--package", package, "--host-budget",
                                    args.host_budget, "--port", port, "--model-name", "demo"]))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, server)
        print(f">>> openai.OpenAI(base_url={url + '/v1'!r}).completions.create(model='demo', "
              f"prompt={args.prompt!r}, max_tokens={args.max_new_tokens}, temperature=0)", flush=True)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        reply = client.completions.create(model="demo", prompt=args.prompt, max_tokens=args.max_new_tokens,
                                          temperature=0, extra_body={"return_token_ids": True})
    finally:
        print("stopping spac-serve", flush=True)
        server.terminate()
        server.wait(timeout=30)
    choice = reply.choices[0]
    served = {"text": choice.text, "token_ids": choice.model_extra["token_ids"],
              "stats": reply.usage.model_extra["spac"]}
    print(args.prompt + served["text"])
    print(stats_line(served["stats"]), flush=True)
    return served


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(url: str, server: subprocess.Popen) -> None:
    import httpx

    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"spac-serve exited with code {server.returncode} before answering")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"spac-serve did not answer {url}/health within {SERVER_START_TIMEOUT_S} s")
        time.sleep(0.2)


def main(argv=None) -> dict:
    """Runs the four steps; returns the training report and both answers."""
    args = parse_args(argv)
    started = time.monotonic()
    name = "quick" if args.quick else "demo"
    trained, package = args.work / f"trained-{name}", args.work / f"package-{name}"
    report = train(args, trained)
    export(trained, package)
    local = generate(args, package)
    served = serve_and_ask(args, package)
    same = "the same tokens" if served["token_ids"] == local["token_ids"] else "DIFFERENT tokens"
    print(f"\nspac-serve answered {same} as spac-run; the demo took {time.monotonic() - started:.0f} s", flush=True)
    return {"train": report, "local": local, "served": served}


if __name__ == "__main__":
    main()
