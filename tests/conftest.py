"""Shared fixtures: tiny models built from configs and their exported packages, made once per
test session (an export takes ~20-40 s, mostly torch.onnx)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


@pytest.fixture(scope="session")
def model_pair(tmp_path_factory):
    """model_pair(family, draft_family="qwen3") -> (model_dir, draft_dir), built once."""
    import make_models

    root = tmp_path_factory.mktemp("models")
    return lambda family, draft_family="qwen3": make_models.make_pair(family, root, draft_family)


@pytest.fixture(scope="session")
def exported(tmp_path_factory, model_pair):
    """exported(family, draft_family="qwen3", **options) -> ExportResult of a verified package,
    made once; `options` are ExportOptions fields (experts="int4", ...)."""
    from spac.export.cli import quiet_exporter_logs
    from spac.export.package import ExportOptions, export_package
    from spac.export.verify import verify_package

    quiet_exporter_logs()
    root = tmp_path_factory.mktemp("packages")
    results = {}

    def get(family, draft_family="qwen3", **fields):
        key = (family, draft_family, *sorted(fields.items()))
        if key not in results:
            model_dir, draft_dir = model_pair(family, draft_family)
            name = "-".join([family, draft_family, *(f"{k}={v}" for k, v in sorted(fields.items()))])
            options = ExportOptions(model_dir, draft_dir, root / name, progress=False, **fields)
            results[key] = export_package(options, verify_fn=verify_package)
        return results[key]

    return get
