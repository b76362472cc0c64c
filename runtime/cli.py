"""spac-run: generate text from a spac package with speculative decoding and expert paging."""

from __future__ import annotations

import argparse
import json
import re
import sys

from spac.ops.host_cache import POLICIES

from .arguments import Parser, integer, number, utf8_text
from .estimator import ESTIMATORS
from .logs import add_logging_flags, setup_logging
from .manifest import excerpt, load_manifest
from .profile import MAX_DRAFT_LEN, ProfileError, parse_budget, parse_bytes
from .routing import RoutingFileError, RoutingRecord
from .speculative import DRAFT_MODES

DESCRIPTION = """\
Generate text from a package made by spac-export. The draft proposes --draft-len tokens per
round and the target verifies them in one pass (greedy output equals the original model's).
The draft is the package's draft model, or with --draft self the target itself running only the
experts it holds in memory (for packages exported without a draft).
Text streams to stdout; one stats line goes to stderr (or everything as JSON with --json)."""

EPILOG = """\
profiles: cpu-only (default), jetson-orin-agx-64gb (alias jetson-orin), jetson-orin-nano-8gb,
          rtx4090-desktop, h100-budget, or a path to a profile YAML (see spac-profile list)

example:
  spac-run --package packages/qwen3-moe --profile cpu-only --prompt "def fib(n):" --max-new-tokens 64
  spac-run --package packages/qwen3-moe --policy spac --host-budget 17% --prompt "import os" --json"""


def parse_args(argv):
    parser = Parser(prog="spac-run", description=DESCRIPTION, epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", required=True, help="package directory made by spac-export")
    parser.add_argument("--profile", default="cpu-only", help="device profile name or YAML path (default: cpu-only)")
    parser.add_argument("--prompt", default=None, type=utf8_text, help="prompt text (required unless --interactive)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    parser.add_argument("--interactive", action="store_true",
                        help="chat on the terminal, one line per turn; each turn reuses the KV cache of the ones before")
    parser.add_argument("--system", default=None, type=utf8_text, help="system prompt for --chat and --interactive")
    parser.add_argument("--max-new-tokens", type=integer(1), default=128,
                        help="tokens to generate at most (default: 128)")
    parser.add_argument("--temperature", type=number(0), default=None,
                        help="0 = greedy; > 0 samples (default: the model's generation_config.json, else greedy)")
    parser.add_argument("--top-p", type=number(0, 1, above_minimum=True), default=None,
                        help="nucleus sampling mass in (0, 1] (default: the model's, else 1.0)")
    parser.add_argument("--top-k", type=integer(0), default=None, help="sample among the k likeliest tokens, 0 = all "
                                                                       "(default: the model's, else 0)")
    parser.add_argument("--min-p", type=number(0, 1), default=None,
                        help="drop tokens under min-p times the likeliest one's probability (default: the model's, else 0)")
    parser.add_argument("--repetition-penalty", type=number(0, above_minimum=True), default=None,
                        help="divide the logits of tokens already seen, prompt included, by this (default: the model's, "
                             "else 1 = off)")
    parser.add_argument("--frequency-penalty", type=number(-2, 2), default=None,
                        help="subtract this times each token's count in the generated text, in [-2, 2] (default: 0)")
    parser.add_argument("--presence-penalty", type=number(-2, 2), default=None,
                        help="subtract this from every token the generated text holds, in [-2, 2] (default: 0)")
    parser.add_argument("--seed", type=integer(0, 2**64 - 1), default=None, help="random seed for sampling")
    parser.add_argument("--stop", action="append", type=utf8_text, default=None,
                        help="stop at this string (repeatable)")
    parser.add_argument("--draft-len", type=integer(0, MAX_DRAFT_LEN), default=None,
                        help="γ, draft tokens per round, 0 = no drafting (default: the profile's draft_len, or its "
                             "self_draft_len with --draft self)")
    parser.add_argument("--draft", choices=DRAFT_MODES, default=None,
                        help="what drafts: the package's draft 'model', the target 'self' (from the package's draft "
                             "copies of its experts, else with the experts it holds), or 'none' (default: model if "
                             "the package has one, unless a --memory-limit pages the experts; else self where it "
                             "has draft copies and its experts are paged without --memory-limit; else none)")
    parser.add_argument("--no-speculative", dest="speculative", action="store_false",
                        help="plain decoding with the target only (no draft is loaded)")
    parser.add_argument("--providers", default=None,
                        help="comma-separated execution providers for experts, e.g. cuda,cpu (default: profile's)")
    parser.add_argument("--strict", action="store_true", help="fail instead of falling back when CUDA is missing")
    add_expert_cache_flags(parser)
    parser.add_argument("--thread-pool", choices=("global", "per-session"), default=None,
                        help="'global': one ONNX Runtime thread pool shared by all sessions, 10-20%% faster "
                             "decoding on the CPU; 'per-session': a pool per session, for callers of main() "
                             "that run other ORT sessions in their process (default: global for the spac-run "
                             "command, per-session for main())")
    parser.add_argument("--json", action="store_true", help="print one JSON object (text, token_ids, stats)")
    add_logging_flags(parser)
    args = parser.parse_args(argv)
    if args.prompt is None and not args.interactive:
        parser.error("--prompt is required (or --interactive)")
    return args


def add_expert_cache_flags(parser: argparse.ArgumentParser) -> None:
    """How experts are cached and read, overriding the profile (spac-run and spac-serve); the
    Runtime's arguments they give are expert_cache_options(args)."""
    parser.add_argument("--policy", choices=POLICIES, default=None,
                        help="expert cache policy when the experts do not all fit (default: profile's)")
    parser.add_argument("--host-budget", type=parse_host_budget, default=None,
                        help="host RAM for the expert cache: a share of the expert bytes ('25%%', 0.25) or bytes "
                             "of expert cache ('1048576', '512MiB'); below 100%% experts are paged from the "
                             "package (default: profile's)")
    parser.add_argument("--estimator", choices=tuple(ESTIMATORS), default=None,
                        help="utility estimator of the spac policy (default: profile's)")
    parser.add_argument("--routing", metavar="FILE", default=None,
                        help="routing counts an earlier run wrote (spac-run --save-routing): the static policy "
                             "keeps the most routed experts resident; sets --policy static")
    parser.add_argument("--save-routing", metavar="FILE", default=None,
                        help="add the experts the target routes (spac-serve: until it stops) to FILE's counts "
                             "(made if absent), for a later run's --routing")
    parser.add_argument("--memory-limit", type=parse_memory_limit, default=None,
                        help="bytes the whole process may use ('700MB', '2GiB', bytes) or 'auto' (the memory "
                             "cgroup's limit, else MemAvailable); sizes the host expert cache to fit, "
                             "overriding --host-budget")
    parser.add_argument("--direct-io", action=argparse.BooleanOptionalAction, default=True,
                        help="read paged experts with O_DIRECT into aligned buffers, past the page cache "
                             "(falls back to plain reads where the file system refuses it); "
                             "--no-direct-io: buffered reads, each file dropped from the page cache after")
    parser.add_argument("--layer-lookahead", action="store_true",
                        help="spac policy: read the experts the next layers' routers guess from the current "
                             "hidden state while the current layer computes (guesses never change the output; "
                             "off by default: slower where the cache is small, see README)")


def expert_cache_options(args: argparse.Namespace) -> dict:
    """The Runtime's keyword arguments from add_expert_cache_flags' flags."""
    policy = args.policy
    if args.routing is not None:
        if policy not in (None, "static"):
            raise ValueError(f"--routing gives the static policy its resident set; --policy {policy} does not use it")
        policy = "static"
    return dict(policy=policy, host_budget=args.host_budget, estimator=args.estimator, static_frequencies=args.routing,
                memory_limit=args.memory_limit, direct_io=args.direct_io, layer_lookahead=args.layer_lookahead)


def parse_host_budget(text: str) -> float | int:
    """A fraction of the expert bytes ('25%', '0.25') as a float, or bytes ('1048576', '512MiB') as an int,
    read like a profile's budget."""
    value = float(text) if re.fullmatch(r"\s*[0-9]*\.[0-9]+\s*", text) else text
    try:
        budget = parse_budget(value)
    except ProfileError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return budget.nbytes if budget.fraction is None else budget.fraction


def parse_memory_limit(text: str) -> int | str:
    """'auto', or bytes ('700000000', '700MB', '2GiB')."""
    if text.strip() == "auto":
        return "auto"
    try:
        nbytes = parse_bytes(text)
    except ProfileError:
        nbytes = 0
    if nbytes <= 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of bytes such as 700MB or 2GiB, "
                                         f"got {excerpt(repr(text))}")
    return nbytes


def stats_line(stats: dict) -> str:
    calls = ", ".join(f"{ep} {n}" for ep, n in sorted(stats["expert_calls"].items())) or "none"
    substitution = (f", substitution {stats['draft_substitution_rate']:.0%}" if stats["draft"] == "self" else "")
    return (f"[spac] {stats['new_tokens']} tokens, {stats['tokens_per_second']:.1f} tok/s decode, "
            f"prefill {stats['prefill_seconds'] * 1000:.0f} ms | draft {stats['draft']}{substitution}, "
            f"acceptance {stats['acceptance_rate']:.0%}, "
            f"{stats['mean_accepted_per_round']:.2f} accepted/round (γ={stats['draft_len']}), "
            f"draft {stats['draft_seconds_per_round'] * 1000:.1f} ms / verify "
            f"{stats['verify_seconds_per_round'] * 1000:.1f} ms per round | "
            f"expert calls {calls}, hit rate {stats['expert_hit_rate']:.0%}, "
            f"paged {stats['bytes_paged'] / 1e6:.1f} MB")


def main(argv=None, thread_pool: str = "per-session") -> int:
    """`thread_pool` is the --thread-pool default: ORT refuses, for the rest of the process, any
    session made without the global pool once it exists, so only the command itself defaults to it."""
    args = parse_args(argv)
    setup_logging("spac-run", args)
    from spac.ops.storage import PackageFileError

    from .runtime import Runtime

    providers = args.providers.split(",") if args.providers else None
    try:
        manifest = load_manifest(args.package)
        routing = routing_record(args, manifest)
        runtime = Runtime(manifest, profile=args.profile, draft_len=args.draft_len, providers=providers,
                          strict=args.strict, draft=args.draft if args.speculative else "none",
                          **expert_cache_options(args),
                          global_thread_pool=(args.thread_pool or thread_pool) == "global")
    except (PackageFileError, ProfileError, ValueError, RuntimeError) as error:
        print(f"spac-run: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # while loading: nothing generated yet
        return 130
    if routing is not None:
        routing.start(runtime)
    code = generate(runtime, args)
    if routing is not None and not save_routing(routing, "spac-run"):
        code = code or 2
    runtime.close()
    return code


def routing_record(args: argparse.Namespace, manifest) -> RoutingRecord | None:
    """--save-routing's record, its file checked against the package's manifest before the
    runtime loads."""
    return RoutingRecord(args.save_routing, manifest) if args.save_routing else None


def save_routing(record: RoutingRecord, program: str) -> bool:
    """The record saved, or one error line saying why not."""
    try:
        record.save()
    except RoutingFileError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        return False
    return True


def generate(runtime, args: argparse.Namespace) -> int:
    """The prompt's (or the interactive session's) text and stats, printed; the exit code."""
    from spac.ops.storage import PackageFileError

    from .runtime import GenerationError

    request = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   seed=args.seed, stop=args.stop, speculative=args.speculative, top_k=args.top_k, min_p=args.min_p,
                   repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                   presence_penalty=args.presence_penalty)
    if args.interactive:
        return run_interactive(runtime, args.system, request)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    prompt = messages + [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    code, stream = 0, None
    try:
        stream = runtime.stream(prompt, **request)
        for piece in stream:
            if not args.json:
                print(piece, end="", flush=True)
    except (GenerationError, PackageFileError, ValueError, TypeError) as error:
        # A package file found bad while paging (changed, unreadable, hung) ends the run too.
        print(f"spac-run: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The interrupt may land outside the generator (here, while printing): close it so its
        # stats are filled in, and mark the result interrupted ourselves.
        if stream is not None:
            stream.close()
        if stream is None or not stream.result.stats:  # before generation began
            return 130
        stream.result.interrupted = True
        code = 130
    result = stream.result
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "stats": result.stats.as_dict(),
                          "interrupted": result.interrupted}))
    else:
        print()
        if result.interrupted:
            print("[spac] interrupted", file=sys.stderr)
        print(stats_line(result.stats.as_dict()), file=sys.stderr)
    return code


def run_interactive(runtime, system: str | None, request: dict) -> int:
    from .chat import ChatSession, interactive

    def write(text: str) -> None:
        print(text, end="", flush=True)

    session = ChatSession(runtime, system=system, **request)
    return interactive(session, write,
                       on_result=lambda result: print(stats_line(result.stats.as_dict()), file=sys.stderr))


def command() -> None:
    """The spac-run command: its own process, so the global pool is safe and the default."""
    sys.exit(main(thread_pool="global"))


if __name__ == "__main__":
    command()
