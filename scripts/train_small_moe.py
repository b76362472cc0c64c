#!/usr/bin/env python3
"""Train a small Qwen3-MoE and a dense Qwen3 draft on the Python standard library, on the CPU.

Random-weight models route almost i.i.d. and an unrelated draft is never accepted, so a policy
benchmark on them proves little: the benchmarks need a model that has learned something, and
the standard library's sources are on every machine. This script trains one on 2 cores in under
30 minutes (26 measured on a busy shared machine):

    python scripts/train_small_moe.py              # full run → cache/trained/{small-moe,small-draft}
    python scripts/train_small_moe.py --quick      # about a minute, for tests
    python scripts/train_small_moe.py --preset demo  # minutes → cache/trained-demo (scripts/demo.py)
    python scripts/train_small_moe.py --force      # retrain even if the cache matches

The corpus is the standard library's own .py sources (tests and site-packages left out), split
by file into train and held-out sets with a hash of each relative path, so the split is the same
on every machine with the same Python version. The draft is distilled from the MoE's logits,
which teaches it the MoE's greedy choices, the thing speculative decoding accepts.

train_report.json (written beside the two model folders, and printed) holds held-out
perplexities, per-layer routing statistics, the draft's greedy acceptance rate at γ = 4 and the
training wall time. A later run with the same arguments reuses the saved models.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

# OpenMP threads that spin while waiting burn a shared machine's CPU share: on 2 busy cores a
# training step measured 5-30x slower with spinning than with sleeping threads. The policy is
# read once, when torch loads its OpenMP runtime, so it must be set before the import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config, Qwen3MoeConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_models import build_tokenizer  # noqa: E402  (a sibling script, not a package)
from spac.bench.prompts import PROMPT_CHARS, heldout as held_out  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MOE_DIR, DRAFT_DIR, REPORT = "small-moe", "small-draft", "train_report.json"
# Tests exercise odd corners of the language (and some are not UTF-8); site-packages differs
# from machine to machine. Neither belongs in a corpus meant to be the same everywhere.
EXCLUDED_DIRS = {"site-packages", "test", "tests", "idle_test"}
HEAD_DIM = 32
PROMPT_TOKENS = 64  # context given to speculative decoding before it generates
# The benchmarks' prompts are PROMPT_CHARS characters of source; a tokenizer trained on a few
# files (--quick) spends up to a token a character on them, and the benchmarks generate up to 48
# tokens after them, plus a round's draft.
BENCH_CONTEXT = PROMPT_CHARS + 64

# --quick overrides these so the whole pipeline runs in about 20 s on an idle machine (the
# architecture is kept, so tests cover the real code path).
QUICK = dict(moe_steps=20, draft_steps=20, batch_size=4, seq_len=128, max_files=40,
             eval_windows=4, spec_snippets=2, spec_tokens=16)

# --preset NAME sets these defaults (flags given on the command line still win). demo: what
# scripts/demo.py shows a newcomer, trained in a few minutes on 2 cores: shorter windows, fewer
# steps at a higher learning rate, a smaller evaluation. Its own folder keeps it from replacing
# the full run's models.
PRESETS = {
    "demo": dict(out=REPO / "cache" / "trained-demo", seq_len=128, moe_steps=450, draft_steps=450,
                 lr=4e-3, eval_windows=16, spec_snippets=8, spec_tokens=48),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "cache" / "trained",
                   help=f"folder that receives {MOE_DIR}/, {DRAFT_DIR}/ and {REPORT}")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds weights and data order; same seed, same weights")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny run for tests (seconds), overriding {', '.join(QUICK)}")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="a named set of defaults: " + "; ".join(
                       f"{name}: " + ", ".join(f"{k}={_shown(v)}" for k, v in values.items())
                       for name, values in PRESETS.items()))
    p.add_argument("--force", action="store_true",
                   help="retrain even if the saved report matches these arguments "
                   "(needed after changing this script's code)")
    g = p.add_argument_group("model")
    g.add_argument("--vocab-size", type=int, default=1024, help="byte-level BPE vocabulary")
    g.add_argument("--layers", type=int, default=4, help="MoE decoder layers")
    g.add_argument("--hidden", type=int, default=192, help=f"MoE hidden size (a multiple of {HEAD_DIM})")
    g.add_argument("--experts", type=int, default=16, help="routed experts per layer")
    g.add_argument("--top-k", type=int, default=2, help="experts per token")
    g.add_argument("--expert-size", type=int, default=256, help="each expert's intermediate size")
    g.add_argument("--draft-layers", type=int, default=2, help="dense draft decoder layers")
    g.add_argument("--draft-hidden", type=int, default=128,
                   help=f"draft hidden size (a multiple of {HEAD_DIM})")
    g = p.add_argument_group("training")
    g.add_argument("--moe-steps", type=int, default=2000, help="MoE optimiser steps")
    g.add_argument("--draft-steps", type=int, default=1500,
                   help="draft optimiser steps (800 gave acceptance 0.44, 1500 gave 0.57)")
    g.add_argument("--draft-loss", choices=("distill", "lm"), default="distill",
                   help="distill: match the MoE's next-token distribution; lm: plain next-token "
                   "loss (acceptance 0.34 vs 0.57 for distill in one measurement)")
    g.add_argument("--batch-size", type=int, default=8, help="windows per step")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per training window")
    g.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (cosine decay)")
    g.add_argument("--aux-loss", type=float, default=0.01, help="router load-balancing loss weight")
    g.add_argument("--max-files", type=int, default=0, help="use only this many train files (0: all)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-windows", type=int, default=64, help="held-out windows of --seq-len tokens")
    g.add_argument("--gamma", type=int, default=4, help="draft tokens per speculative round")
    g.add_argument("--spec-snippets", type=int, default=32, help="held-out prompts for speculative decoding")
    g.add_argument("--spec-tokens", type=int, default=64, help="tokens generated per prompt")
    preset = p.parse_known_args(argv)[0].preset
    if preset:
        p.set_defaults(**PRESETS[preset])
    args = p.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    return args


def _shown(value) -> str:
    return os.path.relpath(value, REPO) if isinstance(value, Path) else str(value)


def recipe(args) -> dict:
    """What identifies a trained pair: every argument that shapes it, and the corpus's Python.
    A preset is only a name for some of those values, so it is not part of the recipe."""
    skip = {"out", "force", "preset"}
    key = {k: v for k, v in sorted(vars(args).items()) if k not in skip}
    key["python"] = sys.version.split()[0]
    return key


# ---------------------------------------------------------------- corpus


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(train, held-out) .py files of the standard library, sorted, split by path hash."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, heldout = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts) or not _is_utf8(path):
            continue
        (heldout if held_out(rel.as_posix()) else train).append(path)
    return train, heldout


def _is_utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def token_stream(tokenizer: Tokenizer, files: list[Path], eos_id: int) -> torch.Tensor:
    """All files' tokens in one 1-D tensor, each file ended by EOS (so windows may span files)."""
    texts = [f.read_text(encoding="utf-8") for f in files]
    ids = []
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(stream: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """n windows of `length` tokens spread evenly over the stream: fixed, so runs compare."""
    starts = torch.linspace(0, len(stream) - length, n).long()
    return torch.stack([stream[s:s + length] for s in starts])


# ---------------------------------------------------------------- models


def moe_config(args, vocab: int, special_ids: dict) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // HEAD_DIM, num_key_value_heads=2, head_dim=HEAD_DIM,
        num_experts=args.experts, num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.expert_size, intermediate_size=4 * args.hidden,
        norm_topk_prob=True, router_aux_loss_coef=args.aux_loss,
        max_position_embeddings=_context(args), **special_ids,
    )


def draft_config(args, vocab: int, special_ids: dict) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=vocab, hidden_size=args.draft_hidden, num_hidden_layers=args.draft_layers,
        num_attention_heads=args.draft_hidden // HEAD_DIM, num_key_value_heads=2, head_dim=HEAD_DIM,
        intermediate_size=3 * args.draft_hidden, max_position_embeddings=_context(args), **special_ids,
    )


def _context(args) -> int:
    # Speculative decoding runs past the prompt by spec_tokens plus one round's draft.
    return max(args.seq_len, PROMPT_TOKENS + args.spec_tokens + args.gamma + 1, BENCH_CONTEXT)


# ---------------------------------------------------------------- training


def train(model, steps: int, args, stream: torch.Tensor, loss_fn, desc: str) -> float:
    """AdamW with warm-up and cosine decay over random windows of the train stream.

    The windows come from a generator seeded by --seed, so the data order is fixed.
    Returns the mean loss of the last 50 steps.
    """
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, _cosine(s, steps)))
    model.train()
    recent = []
    bar = tqdm(range(steps), desc=desc, mininterval=2)
    for _ in bar:
        starts = torch.randint(0, len(stream) - args.seq_len, (args.batch_size,), generator=gen)
        batch = torch.stack([stream[s:s + args.seq_len] for s in starts])
        loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-50:]
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return sum(recent) / len(recent)


def _cosine(step: int, steps: int, floor: float = 0.1) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / steps))


def moe_loss(model, batch):
    # The router load-balancing term is added to .loss when router logits are requested.
    return model(input_ids=batch, labels=batch, output_router_logits=True).loss


def distill_loss(teacher):
    """KL(teacher ‖ student) per token: the draft learns the MoE's choices, not the corpus's."""
    def loss(model, batch):
        with torch.no_grad():
            target = F.log_softmax(teacher(input_ids=batch).logits.float(), dim=-1)
        student = F.log_softmax(model(input_ids=batch).logits.float(), dim=-1)
        return F.kl_div(student.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")
    return loss


def lm_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) over every predicted position of the windows."""
    total, count = 0.0, 0
    for batch in windows.split(8):
        logits = model(input_ids=batch).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def routing_stats(model, windows: torch.Tensor, k: int, num_experts: int) -> dict:
    """Per layer: how evenly experts are used, and how much consecutive tokens share experts.

    entropy: of the expert-usage distribution, in bits (the maximum is log2 E).
    overlap: mean |S_t ∩ S_t+1| / k for consecutive tokens of one window.
    chance_overlap: the overlap two independent tokens would have with the same usage,
    Σ_e q_e² / k with q_e the fraction of tokens that use expert e; overlap above it is the
    temporal locality a cache can exploit.
    """
    per_layer = None
    for batch in windows.split(8):
        router_logits = model(input_ids=batch, output_router_logits=True).router_logits
        chosen = [r.topk(k, dim=-1).indices.view(*batch.shape, k) for r in router_logits]
        per_layer = chosen if per_layer is None else [torch.cat(p) for p in zip(per_layer, chosen)]
    stats = {"entropy_bits": [], "overlap": [], "chance_overlap": []}
    for sel in per_layer:  # [windows, tokens, k]
        counts = torch.bincount(sel.flatten(), minlength=num_experts).double()
        usage = counts / counts.sum()
        stats["entropy_bits"].append(-(usage[usage > 0] * usage[usage > 0].log2()).sum().item())
        shared = (sel[:, :-1, :, None] == sel[:, 1:, None, :]).sum(dim=(-1, -2)).double()
        stats["overlap"].append((shared.mean() / k).item())
        q = counts / (sel.shape[0] * sel.shape[1])
        stats["chance_overlap"].append((q.square().sum() / k).item())
    stats = {name: [round(v, 4) for v in values] for name, values in stats.items()}
    stats["max_entropy_bits"] = math.log2(num_experts)
    return stats


@torch.no_grad()
def speculative_acceptance(target, draft, prompts: torch.Tensor, new_tokens: int, gamma: int) -> dict:
    """Greedy speculative decoding: the draft proposes γ tokens, the target keeps the longest
    prefix that matches its own argmax, then adds its own next token. Plain full forwards (no
    KV cache): this measures agreement, not speed."""
    accepted = []
    for prompt in prompts:
        seq = prompt.tolist()
        end = len(seq) + new_tokens
        while len(seq) < end:
            proposal = []
            for _ in range(gamma):
                logits = draft(input_ids=torch.tensor([seq + proposal])).logits
                proposal.append(int(logits[0, -1].argmax()))
            logits = target(input_ids=torch.tensor([seq + proposal])).logits[0, len(seq) - 1:]
            choice = logits.argmax(-1).tolist()  # γ + 1 target tokens
            n = 0
            while n < gamma and proposal[n] == choice[n]:
                n += 1
            seq += proposal[:n] + [choice[n]]
            accepted.append(n)
    rounds = len(accepted)
    return {
        "gamma": gamma,
        "acceptance_rate": round(sum(accepted) / (gamma * rounds), 4),
        "mean_accepted_per_round": round(sum(accepted) / rounds, 4),
        "mean_tokens_per_round": round(sum(accepted) / rounds + 1, 4),
        "rounds": rounds,
        "prompts": len(prompts),
    }


@torch.no_grad()
def top1_agreement(target, draft, windows: torch.Tensor) -> float:
    """Fraction of held-out positions where draft and target pick the same next token."""
    same, count = 0, 0
    for batch in windows.split(8):
        picks = target(input_ids=batch).logits.argmax(-1), draft(input_ids=batch).logits.argmax(-1)
        same += (picks[0] == picks[1]).sum().item()
        count += batch.numel()
    return same / count


# ---------------------------------------------------------------- driver


def build(args, tmp: Path) -> dict:
    """Train both models into tmp and return the report."""
    t_start = time.time()
    torch.manual_seed(args.seed)
    train_files, heldout_files = stdlib_files()
    if args.max_files:
        # Keep roughly the full split's proportions (at least one held-out file).
        train_files = train_files[:args.max_files]
        heldout_files = heldout_files[:max(1, args.max_files // 4)]

    tokenizer_dir = tmp / "tokenizer"
    hf_tok = build_tokenizer(tokenizer_dir, vocab_size=args.vocab_size, corpus_files=train_files)
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    special_ids = dict(bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
                       pad_token_id=hf_tok.pad_token_id)
    train_stream = token_stream(tok, train_files, hf_tok.eos_token_id)
    heldout_stream = token_stream(tok, heldout_files, hf_tok.eos_token_id)
    windows = eval_windows(heldout_stream, args.eval_windows, args.seq_len)
    prompts = eval_windows(heldout_stream, args.spec_snippets, PROMPT_TOKENS)

    t_train = time.time()
    moe = AutoModelForCausalLM.from_config(moe_config(args, len(hf_tok), special_ids))
    moe_final_loss = train(moe, args.moe_steps, args, train_stream, moe_loss, "moe")
    t_moe = time.time() - t_train

    draft = AutoModelForCausalLM.from_config(draft_config(args, len(hf_tok), special_ids))
    loss_fn = distill_loss(moe) if args.draft_loss == "distill" else lm_loss
    draft_final_loss = train(draft, args.draft_steps, args, train_stream, loss_fn, "draft")
    t_draft = time.time() - t_train - t_moe

    for model, name in ((moe, MOE_DIR), (draft, DRAFT_DIR)):
        model.generation_config = GenerationConfig(**special_ids, do_sample=False)
        model.save_pretrained(tmp / name)
        shutil.copytree(tokenizer_dir, tmp / name, dirs_exist_ok=True)
    shutil.rmtree(tokenizer_dir)

    t_eval = time.time()
    report = {
        "recipe": recipe(args),
        "corpus": {
            "stdlib": sysconfig.get_paths()["stdlib"],
            "train_files": len(train_files), "heldout_files": len(heldout_files),
            "train_tokens": len(train_stream), "heldout_tokens": len(heldout_stream),
        },
        "moe": {
            "params": sum(p.numel() for p in moe.parameters()),
            "final_train_loss": round(moe_final_loss, 4),
            "heldout_perplexity": round(perplexity(moe, windows), 4),
            "train_time_s": round(t_moe, 1),
        },
        "draft": {
            "params": sum(p.numel() for p in draft.parameters()),
            "loss": args.draft_loss,
            "final_train_loss": round(draft_final_loss, 4),
            "heldout_perplexity": round(perplexity(draft, windows), 4),
            "top1_agreement_with_moe": round(top1_agreement(moe, draft, windows), 4),
            "train_time_s": round(t_draft, 1),
        },
        "routing": routing_stats(moe, windows, args.top_k, args.experts),
        "speculative": speculative_acceptance(moe, draft, prompts, args.spec_tokens, args.gamma),
        "vocab_size": len(hf_tok),
        "train_wall_time_s": round(t_moe + t_draft, 1),
        "eval_time_s": round(time.time() - t_eval, 1),
        "total_wall_time_s": round(time.time() - t_start, 1),
        "torch_threads": torch.get_num_threads(),
    }
    (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def install(tmp: Path, out: Path) -> None:
    """Move a finished build into out. The report goes last and is the commit marker: an
    interrupted install leaves no report, so the next run retrains instead of trusting it."""
    (out / REPORT).unlink(missing_ok=True)
    for name in (MOE_DIR, DRAFT_DIR):
        if (out / name).exists():
            os.replace(out / name, tmp / f"old-{name}")  # moved into tmp, deleted with it
        os.replace(tmp / name, out / name)
    os.replace(tmp / REPORT, out / REPORT)


def cached_report(args) -> dict | None:
    """The saved report if the saved models were trained with these arguments."""
    path = args.out / REPORT
    if args.force or not path.is_file():
        return None
    report = json.loads(path.read_text())
    complete = all((args.out / name / "model.safetensors").is_file() for name in (MOE_DIR, DRAFT_DIR))
    return report if complete and report.get("recipe") == recipe(args) else None


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = cached_report(args)
    if report is not None:
        print(f"up to date: {args.out} (use --force to retrain)", file=sys.stderr)
    else:
        torch.set_num_threads(2)
        torch.use_deterministic_algorithms(True)
        args.out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".train-", dir=args.out))
        try:
            report = build(args, tmp)
            install(tmp, args.out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"wrote {args.out / MOE_DIR}, {args.out / DRAFT_DIR}", file=sys.stderr)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
