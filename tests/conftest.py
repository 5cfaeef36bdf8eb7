"""Shared fixtures. Tests never touch the network (HF_HUB_OFFLINE=1)."""

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Hypothesis: "ci" (the default, and what `make test` selects) draws the same examples on every run and
# machine, so the suite never fails by chance; "fuzz" (`make fuzz`) is a long random search that keeps
# what it finds in .hypothesis/ and prints a reproduction blob. Pin what it finds as @example or a test.
settings.register_profile("ci", derandomize=True, database=None, deadline=None)
settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "5000")),
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

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
