"""Packages without a draft model, and self-speculative decoding (the target drafts with the
experts it already holds): lossless greedy decoding against transformers for every family at
several host budgets, the sampling distribution, the CLI flags and the stats.

Packages come from the session fixture `exported(family)` (shared with test_runtime.py); the
no-draft package is exported once per module through the spac-export command.
"""

from __future__ import annotations

import contextlib
import io

import pytest
import yaml

from spac.export import cli as export_cli
from spac.runtime import Runtime
from test_runtime import NEW_TOKENS, hf_greedy, reference, runtime_for  # noqa: F401 (fixtures)

NO_DRAFT_FAMILY = "qwen3_moe"


@pytest.fixture(scope="module")
def no_draft_export(model_pair, tmp_path_factory):
    """(package folder, the command's summary) of a target exported without --draft."""
    model_dir, _ = model_pair(NO_DRAFT_FAMILY)
    output = tmp_path_factory.mktemp("no-draft") / "package"
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        assert export_cli.main([str(model_dir), "-o", str(output), "--quiet"]) == 0
    return output, summary.getvalue()


def test_export_without_a_draft_writes_no_draft_graphs(no_draft_export):
    package, summary = no_draft_export
    manifest = yaml.safe_load((package / "manifest.yaml").read_text())
    assert manifest["draft"] is None and manifest["source"]["draft"] is None
    assert not (package / "draft").exists()
    assert not [name for name in manifest["files"] if name.startswith("draft/")]
    assert "no draft" in summary and "passed: max abs logit diff target" in summary
    assert ", draft " not in summary  # no draft line in the verification either


def test_no_draft_package_decodes_like_transformers(no_draft_export, model_pair, hf_greedy, reference):
    ids, expected = reference(NO_DRAFT_FAMILY)
    with Runtime(no_draft_export[0], profile="cpu-only", draft_len=4) as runtime:
        assert runtime.draft is None
        result = runtime.generate(ids, max_new_tokens=NEW_TOKENS)
    assert result.token_ids == expected
    assert result.stats.draft_len == 0 and result.stats.decode.rounds == 0
