"""A verify pass cut short where its drafts are worth less than their reads (the `spac` policy,
spac.ops.pager.PagedExperts.rows_to_compute): the rows it keeps are what a shorter pass computes,
and greedy tokens stay transformers' own."""

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from spac.runtime import Runtime
from spac.runtime.manifest import load_manifest
from spac.runtime.speculative import DraftOutlook
from spac.runtime.tokenizer import TextTokenizer

PROMPT = "def fibonacci(n):\n    "


class WorthlessDrafts(DraftOutlook):
    """Every draft row worth nothing: any row that needs a read is cut."""

    def worth(self, drafts):
        return [0.0] * drafts


def test_outlook_weighs_rows_by_measured_acceptance_per_depth():
    outlook = DraftOutlook()
    assert outlook.worth(3) is None  # nothing timed yet: no cut
    for _ in range(8):  # the first draft always accepted, the second never
        outlook.record(judged=2, accepted=1, seconds=0.3, tokens=2)
    worth = outlook.worth(3)
    assert outlook.token_seconds == 0.15
    assert worth[0] == (9 / 10) * 0.15 and worth[1] == (9 / 10) * (1 / 10) * 0.15
    assert worth[2] == worth[1] / 2  # a depth never judged: the even prior


def test_cut_pass_returns_the_rows_a_shorter_pass_computes(exported):
    package = exported("qwen3_moe").output
    ids = TextTokenizer(load_manifest(package)).encode(PROMPT)
    with Runtime(package, policy="spac", host_budget=0.2) as paged, Runtime(package, policy="resident") as whole:
        for runner in (paged.target, whole.target):
            runner.forward(ids[:-4])
        paged.experts.miss_seconds = 1.0  # any read outweighs the drafts' worth of 0
        cut = paged.target.forward(ids[-4:], worth=[0.0] * 3)
        full = whole.target.forward(ids[-4:])
        assert 1 <= len(cut) < 4
        np.testing.assert_allclose(cut, full[:len(cut)], rtol=1e-4, atol=1e-4)
        assert paged.target.length == len(ids) - 4 + len(cut) == len(paged.target.tokens)
        # The cache holds exactly the kept rows: the next token's logits match the full run's.
        follow = ids[-4 + len(cut)]
        whole.target.truncate(len(ids) - 4 + len(cut))
        np.testing.assert_allclose(paged.target.forward([follow]), whole.target.forward([follow]),
                                   rtol=1e-4, atol=1e-4)


def test_greedy_tokens_are_transformers_with_every_costly_draft_cut(exported, model_pair):
    package = exported("qwen3_moe").output
    ids = TextTokenizer(load_manifest(package)).encode(PROMPT)
    model = AutoModelForCausalLM.from_pretrained(model_pair("qwen3_moe")[0])
    inputs = torch.tensor([ids])
    expected = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=24,
                              do_sample=False)[0, len(ids):].tolist()
    with Runtime(package, draft_len=4, policy="spac", host_budget=0.2) as runtime:
        runtime.outlook = WorthlessDrafts()
        runtime.experts.miss_seconds = 1.0
        result = runtime.generate(PROMPT, max_new_tokens=24)
    assert result.token_ids == expected
    assert result.stats.decode.cut > 0


def test_other_policies_never_cut(exported):
    package = exported("qwen3_moe").output
    ids = TextTokenizer(load_manifest(package)).encode(PROMPT)
    with Runtime(package, policy="lru", host_budget=0.2) as runtime:
        runtime.target.forward(ids[:-4])
        assert len(runtime.target.forward(ids[-4:], worth=[0.0] * 3)) == 4
