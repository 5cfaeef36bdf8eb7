"""Shared fixtures. Tests never touch the network (HF_HUB_OFFLINE=1)."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
GOLDEN = REFERENCE / "phi3v-golden"

needs_reference = pytest.mark.skipif(
    not GOLDEN.is_dir(),
    reason=f"reference data not found at {REFERENCE} (it ships beside the repo as ../shared/reference)",
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny preset model folder (official layout, our own tokenizer), made once per session."""
    from productvlm.models.phi3v.presets import init_model

    return init_model("tiny", tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def eval_catalog(tmp_path_factory):
    """A 60-row synthetic catalog shared by the evaluation, prediction and report tests."""
    import eval_helpers

    return eval_helpers.catalog(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def eval_run(tmp_path_factory):
    """A tiny run trained for a few steps (a real run folder, not a good model)."""
    import eval_helpers

    return eval_helpers.run(tmp_path_factory.getbasetemp())
