"""Model loading never runs code from a model folder, and refuses pickle weights unless allow_pickle=True."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

from productvlm.errors import UserError
from productvlm.models.loading import load_pretrained
from productvlm.models.phi3v import Phi3VForCausalLM, Phi3VProcessor

EVIL_MODULES = ("configuration_evil", "modeling_evil", "processing_evil", "tokenization_evil")


def copy_model(src: Path, dst: Path, weights: bool = True) -> Path:
    shutil.copytree(src, dst, ignore=None if weights else shutil.ignore_patterns("*.safetensors"))
    return dst


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture
def booby_trapped(tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The tiny model plus Python files that would write a marker and raise, named by every auto_map."""
    folder = copy_model(tiny_model_dir, tmp_path / "model")
    marker = tmp_path / "code-ran"
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text(__name__)\nraise RuntimeError('ran')\n"
    for name in EVIL_MODULES:
        (folder / f"{name}.py").write_text(code)
    edit_json(
        folder / "config.json",
        auto_map={
            "AutoConfig": "configuration_evil.EvilConfig",
            "AutoModel": "modeling_evil.EvilModel",
            "AutoModelForCausalLM": "modeling_evil.EvilModel",
            "AutoProcessor": "processing_evil.EvilProcessor",
        },
    )
    edit_json(
        folder / "tokenizer_config.json", auto_map={"AutoTokenizer": ["tokenization_evil.EvilTok", None]}
    )
    edit_json(
        folder / "preprocessor_config.json", auto_map={"AutoProcessor": "processing_evil.EvilProcessor"}
    )
    return folder, marker


def assert_no_code_ran(marker: Path, modules_before: set[str]) -> None:
    assert not marker.exists(), f"code from the model folder ran ({marker.read_text()})"
    assert not [m for m in set(sys.modules) - modules_before if m.split(".")[-1] in EVIL_MODULES]


@pytest.mark.parametrize(
    "load",
    [
        pytest.param(lambda d: Phi3VForCausalLM.from_pretrained(d), id="Phi3VForCausalLM"),
        pytest.param(lambda d: Phi3VForCausalLM.from_pretrained(d, trust_remote_code=True), id="Phi3V-trust"),
        pytest.param(lambda d: AutoModelForCausalLM.from_pretrained(d), id="AutoModelForCausalLM"),
        pytest.param(
            lambda d: AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True), id="Auto-trust"
        ),
        pytest.param(lambda d: AutoConfig.from_pretrained(d, trust_remote_code=True), id="AutoConfig-trust"),
        pytest.param(lambda d: load_pretrained(d)[0], id="load_pretrained"),
    ],
)
def test_code_in_a_model_folder_never_runs(booby_trapped, load):
    folder, marker = booby_trapped
    before = set(sys.modules)
    loaded = load(folder)
    assert_no_code_ran(marker, before)
    assert type(loaded).__module__.startswith("productvlm.models.phi3v")


@pytest.mark.parametrize(
    "processor_class", [Phi3VProcessor, AutoProcessor], ids=["Phi3VProcessor", "AutoProcessor"]
)
def test_processor_code_in_a_model_folder_never_runs(booby_trapped, processor_class):
    folder, marker = booby_trapped
    before = set(sys.modules)
    try:
        processor = processor_class.from_pretrained(folder, trust_remote_code=True)
    except RuntimeError:  # what the planted code raises after writing the marker
        processor = None
    assert_no_code_ran(marker, before)
    assert isinstance(processor, Phi3VProcessor)


def test_processor_ignores_auto_map_without_trust(booby_trapped):
    folder, marker = booby_trapped
    before = set(sys.modules)
    assert isinstance(AutoProcessor.from_pretrained(folder), Phi3VProcessor)
    assert_no_code_ran(marker, before)


@pytest.fixture
def pickle_only(tiny_model_dir: Path, tmp_path: Path) -> Path:
    folder = copy_model(tiny_model_dir, tmp_path / "pickled", weights=False)
    state = Phi3VForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize(
    "load",
    [
        pytest.param(lambda d: Phi3VForCausalLM.from_pretrained(d), id="Phi3VForCausalLM"),
        pytest.param(lambda d: AutoModelForCausalLM.from_pretrained(d), id="AutoModelForCausalLM"),
        pytest.param(lambda d: load_pretrained(d), id="load_pretrained"),
    ],
)
def test_pickle_checkpoint_refused_with_a_clear_message(pickle_only, load):
    with pytest.raises(UserError, match=r"only pickle weights \(pytorch_model\.bin\).*allow_pickle=True"):
        load(pickle_only)


def test_pickle_checkpoint_loads_when_allowed(pickle_only, tiny_model_dir):
    model, _ = load_pretrained(pickle_only, allow_pickle=True)
    reference = Phi3VForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    got = model.state_dict()
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], reference[k]) for k in reference)


def test_sharded_pickle_checkpoint_refused(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "sharded", weights=False)
    state = Phi3VForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2]), 1):  # the layout of an old sharded checkpoint
        shard = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({k: state[k] for k in part}, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    with pytest.raises(UserError, match="pickle"):
        Phi3VForCausalLM.from_pretrained(folder)


def test_malicious_pickle_does_not_run_even_when_allowed(tiny_model_dir, tmp_path):
    """allow_pickle only lifts our refusal: the weights are still unpickled with torch's weights_only."""
    folder = copy_model(tiny_model_dir, tmp_path / "evil", weights=False)
    marker = tmp_path / "pickle-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model.embed_tokens.weight": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickle"):
        Phi3VForCausalLM.from_pretrained(folder)
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        Phi3VForCausalLM.from_pretrained(folder, allow_pickle=True)
    assert not marker.exists()


def test_pickle_adapter_refused_unless_allowed(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = Phi3VForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["qkv_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter, safe_serialization=False)
    edit_json(adapter / "adapter_config.json", base_model_name_or_path=str(tiny_model_dir))
    assert (adapter / "adapter_model.bin").is_file()
    with pytest.raises(UserError, match=r"adapter_model\.bin.*allow_pickle=True"):
        load_pretrained(adapter)
    model, _ = load_pretrained(adapter, allow_pickle=True)
    lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    expected = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert lora.keys() == expected.keys() and len(lora) > 0
    assert all(torch.equal(lora[k], expected[k]) for k in expected)
