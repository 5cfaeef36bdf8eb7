"""`export`: official layout and names, loadable by our class and AutoModel, a merged LoRA export gives
the adapter model's logits, adapters need --merge-lora, writes are atomic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from productvlm.errors import UserError
from productvlm.models.export import export_model
from productvlm.models.loading import load_pretrained
from productvlm.models.phi3v import Phi3VForCausalLM, Phi3VProcessor

from conftest import REFERENCE

PROMPT = "<|user|>\n<|image_1|>What is shown in this image?<|end|><|assistant|>\n"


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny model with non-zero (random) A and B, so it changes the logits."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = Phi3VForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=r"^model\.layers\.\d+\..*\.(qkv_proj|o_proj|gate_up_proj|down_proj)$",
        init_lora_weights=False,
    )
    model = get_peft_model(base, config)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


def _inputs(model_dir: Path) -> dict:
    processor = Phi3VProcessor.from_pretrained(model_dir)
    image = Image.new("RGB", (150, 100), (180, 40, 90))
    return processor(PROMPT, [image], num_crops=2)


@torch.no_grad()
def _logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits.float()


def _tensor_names(folder: Path) -> dict[str, torch.dtype]:
    names = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open is not iterable)
                assert name not in names, f"{name} stored twice"
                names[name] = f.get_tensor(name).dtype
    return names


def test_merged_export_gives_the_adapter_models_logits(tiny_model_dir, adapter_dir, tmp_path):
    inputs = _inputs(tiny_model_dir)
    adapter_model, _ = load_pretrained(adapter_dir)
    base = Phi3VForCausalLM.from_pretrained(tiny_model_dir).eval()
    want = _logits(adapter_model, inputs)
    assert (want - _logits(base, inputs)).abs().max() > 1e-2  # the adapter matters

    out = export_model(adapter_dir, tmp_path / "merged", merge_lora=True, dtype="fp32")
    merged = Phi3VForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(merged, inputs), want, atol=1e-4, rtol=1e-4)
    assert set(_tensor_names(out)) == set(_tensor_names(tiny_model_dir))  # official names, no lora_*


OFFICIAL_CONFIG = REFERENCE / "phi3-vision-128k-instruct" / "config.json"


@pytest.fixture(scope="module")
def bf16_export(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model exported in bf16, in shards of 400 KB."""
    return export_model(
        tiny_model_dir, tmp_path_factory.mktemp("export") / "bf16", dtype="bf16", max_shard_size="400KB"
    )


@pytest.mark.skipif(not OFFICIAL_CONFIG.is_file(), reason=f"official config not found at {OFFICIAL_CONFIG}")
def test_export_config_has_the_official_fields(bf16_export):
    config = json.loads((bf16_export / "config.json").read_text())
    ignored = {"auto_map", "_name_or_path", "_attn_implementation", "transformers_version"}
    missing = set(json.loads(OFFICIAL_CONFIG.read_text())) - set(config) - ignored
    assert not missing, f"fields of the official config.json missing: {missing}"


def test_export_layout_matches_the_official_one(tiny_model_dir, bf16_export):
    from transformers import AutoModelForCausalLM, AutoProcessor

    import productvlm  # noqa: F401  (registers phi3_v with the Auto classes)

    out = bf16_export
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "phi3_v" and config["architectures"] == ["Phi3VForCausalLM"]
    assert config["torch_dtype"] == "bfloat16" and config["rope_scaling"]["type"] == "su"
    for name in ("model.safetensors.index.json", "generation_config.json", "preprocessor_config.json",
                 "tokenizer.json", "tokenizer_config.json", "prompt_settings.json"):  # fmt: skip
        assert (out / name).is_file(), name
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    names = _tensor_names(out)
    assert set(index) == set(names) == set(_tensor_names(tiny_model_dir))
    assert set(names.values()) == {torch.bfloat16}

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert isinstance(model, Phi3VForCausalLM)
    assert isinstance(AutoProcessor.from_pretrained(out), Phi3VProcessor)
    inputs = _inputs(out)
    # the export is the source rounded to bf16, nothing else: the same weights give the same logits
    rounded = Phi3VForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        for tensor in rounded.state_dict().values():  # the saved tensors, not the computed rotary buffers
            tensor.copy_(tensor.to(torch.bfloat16))
    torch.testing.assert_close(_logits(model.eval(), inputs), _logits(rounded, inputs), atol=1e-5, rtol=1e-5)
    assert sorted(p.name for p in out.parent.iterdir()) == ["bf16"]  # no temporary folder left


def test_adapter_needs_merge_lora(adapter_dir, tmp_path):
    with pytest.raises(UserError, match="--merge-lora"):
        export_model(adapter_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_folder_is_kept_unless_overwrite(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="--overwrite"):
        export_model(tiny_model_dir, out, dtype="fp32")
    assert (out / "keep.txt").read_text() == "mine"
    export_model(tiny_model_dir, out, dtype="fp32", overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(UserError, match="--dtype"):
        export_model(tiny_model_dir, tmp_path / "x", dtype="int8")


def test_cli_commands(tiny_model_dir, tmp_path, monkeypatch):
    """export_command writes the folder; serve_command builds the app with --no-batching and the limits."""
    import typer
    import uvicorn
    from typer.testing import CliRunner

    from productvlm.models.cli import export_command
    from productvlm.serving.cli import serve_command

    app = typer.Typer()
    app.command("export")(export_command)
    app.command("serve")(serve_command)
    runner = CliRunner()
    result = runner.invoke(
        app, ["export", "--model", str(tiny_model_dir), "--out", str(tmp_path / "e"), "--dtype", "fp16"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "e" / "config.json").read_text())["torch_dtype"] == "float16"

    seen = {}
    monkeypatch.setattr(
        uvicorn, "run", lambda app, host, port, **kw: seen.update(app=app, host=host, port=port)
    )
    args = ["serve", "--model", str(tmp_path / "e"), "--port", "8123", "--no-batching", "--max-images", "3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8123)
    assert seen["app"].state.batcher.max_batch == 1 and seen["app"].state.settings.max_images == 3
