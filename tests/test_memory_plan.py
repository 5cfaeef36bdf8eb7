"""The GPU memory plan (training/memory.py): its per-layer activation formulas against a measurement of
real-width layers, its parameter counts against the model, its total against a GPU measurement, and the
decisions made from it (the pre-load check, `train --plan`)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from productvlm.cli import app
from productvlm.config import LoraConfig, load_config
from productvlm.data.synth import synthesize
from productvlm.errors import UserError
from productvlm.models.phi3v import Phi3VConfig, Phi3VForCausalLM, Phi3VProcessor
from productvlm.training.memory import (
    GB,
    GPU_MEMORY_ENV,
    NF4_BYTES,
    OFFICIAL,
    OFFICIAL_WIDTHS,
    Params,
    Widths,
    check_fits,
    decoder_layer_bytes,
    measure_layer_bytes,
    model_config_of,
    plan_memory,
    vision_layer_bytes,
    workload,
)
from productvlm.training.model import apply_method

from conftest import REFERENCE

PHI3V = "microsoft/Phi-3-vision-128k-instruct"  # planned from the official widths (no download)


def cfg_of(*sets, data_dir="/nonexistent"):
    return load_config(None, [f"data.dir={data_dir}", *sets])


@pytest.fixture(scope="module")
def phi3v():
    return model_config_of(PHI3V)


@pytest.mark.parametrize(
    "part, lora, attention",
    [
        ("decoder", None, "sdpa"),
        ("decoder", LoraConfig(), "sdpa"),
        ("decoder", LoraConfig(r=8, dropout=0.1), "sdpa"),
        ("decoder", None, "eager"),
        ("vision", None, "sdpa"),
        ("vision", LoraConfig(), "sdpa"),
    ],
    ids=[
        "decoder-full",
        "decoder-lora",
        "decoder-lora-dropout",
        "decoder-eager",
        "vision-full",
        "vision-lora",
    ],
)
def test_layer_formula_matches_what_autograd_keeps(phi3v, part, lora, attention):
    """One real-width layer (Phi-3: 3072 hidden, 8192 intermediate, 32 heads; CLIP ViT-L: 1024, 4096, 16)
    in bf16 on the CPU: the bytes per token its forward saves for backward, within 10% of the plan's
    formula (LoRA on the decoder's four projections / the tower's six)."""
    w = Widths.of(phi3v)
    seq = 128 if attention == "eager" else 32  # eager keeps (seq x seq) probabilities: a longer one tells
    measured = measure_layer_bytes(phi3v, part, lora, attention, seq=seq)
    if part == "decoder":
        formula = decoder_layer_bytes(w, norms_train=lora is None, lora=lora, attention=attention, seq=seq)
    else:
        formula = vision_layer_bytes(w, lora=lora, attention=attention)
    assert formula == pytest.approx(measured, rel=0.10), (formula / 1024, measured / 1024)
    assert measured > (100 * 1024 if part == "decoder" else 30 * 1024)  # KiB per token: a real layer's


def test_official_widths_are_the_reference_configs():
    for name, folder in zip(OFFICIAL, ("phi3-vision-128k-instruct", "phi3.5-vision-instruct")):
        path = REFERENCE / folder / "config.json"
        if not path.is_file():
            pytest.skip(
                f"reference config not found at {path} (it ships beside the repo as ../shared/reference)"
            )
        reference = json.loads(path.read_text())
        assert {k: reference[k] for k in OFFICIAL_WIDTHS} == OFFICIAL_WIDTHS
        assert Widths.of(Phi3VConfig.from_pretrained(path.parent)) == Widths.of(model_config_of(name))


def load_widths(folder):
    return Phi3VConfig.from_pretrained(folder)


def parameters(model_config) -> int:
    w, p = Widths.of(model_config), Params.of(Widths.of(model_config))
    return p.decoder(w.layers) + p.vision(w.v_layers) + p.projector


def test_parameter_counts_are_the_models(tiny_model_dir, phi3v):
    tiny = Phi3VForCausalLM.from_pretrained(tiny_model_dir)
    assert parameters(tiny.config) == sum(p.numel() for p in tiny.parameters())
    assert Widths.of(model_config_of("preset:tiny")) == Widths.of(tiny.config)  # without its tokenizer
    with torch.device("meta"):
        real = Phi3VForCausalLM(phi3v)
    assert parameters(phi3v) == sum(p.numel() for p in real.parameters())  # 4.15B
    lora = apply_method(tiny, cfg_of("train.method=lora", "train.lora.vision=true"))
    adapters = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    cfg = cfg_of("train.method=lora", "train.lora.vision=true", f"model.path={tiny_model_dir}")
    bf16 = plan_memory(cfg, checkpointing=False)
    # weights in bf16 plus bf16 adapters; every adapter but those of the tower's unused last layer trains
    w = Widths.of(tiny.config)
    unused = sum(
        p.numel()
        for n, p in lora.named_parameters()
        if "lora_" in n and f".layers.{w.v_layers - 1}." in n and "img_processor" in n
    )
    assert bf16.weights == 2 * (parameters(tiny.config) + adapters)
    assert bf16.gradients == 2 * (adapters - unused)


def test_qlora_weights_are_the_prepared_models(tiny_model_dir):
    """qlora with a bf16 base: the plan's weights and gradients are the bytes of the model `apply_method`
    trains, 4-bit layers at NF4_BYTES a weight and the rest in fp32, as peft's
    prepare_model_for_kbit_training casts it (embeddings, lm_head, norms, projector)."""
    bnb = pytest.importorskip("bitsandbytes")
    from productvlm.training.model import load_model

    sets = ["train.method=qlora", "model.dtype=bfloat16", "train.lora.projector=true"]
    cfg = cfg_of(f"model.path={tiny_model_dir}", *sets)
    model = apply_method(load_model(cfg, str(tiny_model_dir))[0], cfg)
    params = list(model.parameters())
    four_bit = [p for p in params if isinstance(p, bnb.nn.Params4bit)]
    kept = {p.dtype for p in params if not isinstance(p, bnb.nn.Params4bit) and p.requires_grad is False}
    assert four_bit and kept == {torch.float32}
    stored = NF4_BYTES * sum(p.quant_state.shape.numel() for p in four_bit) + sum(
        p.numel() * p.element_size() for p in params if not isinstance(p, bnb.nn.Params4bit)
    )
    plan = plan_memory(cfg, checkpointing=False)
    assert plan.weights == pytest.approx(stored, abs=1)
    assert plan.gradients == sum(p.numel() * p.element_size() for p in params if p.requires_grad)


def test_nf4_bytes_are_bitsandbytes():
    """qlora's weights: bitsandbytes' NF4 with double quantization, packed data plus its statistics."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(1024, 4096, dtype=torch.bfloat16)
    packed, state = bnb.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    stored = packed.nbytes + state.absmax.nbytes + state.state2.absmax.nbytes + state.state2.code.nbytes
    assert stored / weight.numel() == pytest.approx(NF4_BYTES, rel=0.01)


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_full_finetuning_matches_an_h200_measurement(optim):
    """Measured: full fine-tuning of Phi-3-vision, bf16 weights, torch AdamW, gradient checkpointing,
    SDPA, batch 4, num_crops 16, a 1344x1344 photo per sample, ~20-token answers: 38.7 GiB
    (torch.cuda.max_memory_allocated on an H200)."""
    cfg = cfg_of(
        f"model.path={PHI3V}",
        "train.method=full",
        f"train.optim={optim}",
        "train.batch_size=4",
        "train.gradient_checkpointing=true",
        "data.num_crops=16",
    )
    plan = plan_memory(cfg, photo=(1344, 1344))
    assert plan.tokens_per_sample > 2509  # the photo's image tokens plus the text
    assert plan.allocated / GB == pytest.approx(38.7, rel=0.15)
    assert plan.weights - plan.gradients == 2 * 12_596_224  # bf16; the tower's unused last layer gets none
    assert plan.optimizer == 2 * plan.gradients  # two bf16 moments


def test_photo_sizes_come_from_the_dataset_and_the_processor(tiny_model_dir, tmp_path):
    synthesize(tmp_path / "data", rows=20, seed=1, overwrite=True, progress=False, workers=1)
    processor = Phi3VProcessor.from_pretrained(tiny_model_dir)
    from productvlm.data.folder import read_split
    from productvlm.inference.inputs import image_size

    rows = read_split(tmp_path / "data", "train")
    expected = max(processor.num_image_tokens(*image_size(r["image_path"]), 4) for r in rows)
    cfg = cfg_of(f"model.path={tiny_model_dir}", "data.num_crops=4", data_dir=tmp_path / "data")
    load = workload(cfg, Widths.of(load_widths(tiny_model_dir)))
    assert load.image_tokens == expected
    assert f"the costliest of {len(rows)} photos in" in load.source
    worst = workload(
        cfg_of(f"model.path={tiny_model_dir}", "data.num_crops=4"), Widths.of(load_widths(tiny_model_dir))
    )
    assert worst.image_tokens >= load.image_tokens  # no dataset: the costliest photo shape


def test_lora_on_a_24gb_gpu_needs_checkpointing(phi3v):
    """The shipped recipe's shape (LoRA, batch 8, ~840 tokens): ~30 GB of activations without
    checkpointing, a few with it; the old rule (weights + optimizer state only) left it off."""
    cfg = cfg_of(f"model.path={PHI3V}", "train.batch_size=8", "data.num_crops=4")
    off, on = (plan_memory(cfg, model_config=phi3v, checkpointing=c) for c in (False, True))
    assert off.activations > 25 * GB and on.activations < 4 * GB
    assert not off.fits(24 * GB) and on.fits(24 * GB) and off.fits(80 * GB)
    assert plan_memory(cfg, model_config=phi3v, memory=24 * GB).checkpointing
    assert not plan_memory(cfg, model_config=phi3v, memory=80 * GB).checkpointing


def test_a_run_that_does_not_fit_names_what_would(phi3v):
    cfg = cfg_of(f"model.path={PHI3V}", "train.batch_size=8", "train.gradient_checkpointing=false")
    with pytest.raises(UserError) as e:
        check_fits(cfg, memory=24 * GB, devices=1, sharding="ddp")
    message = str(e.value)
    assert "\n" not in message and "train.batch_size 8 needs ~" in message and "24.0 GB GPU" in message
    batch = int(message.split("train.batch_size ")[2].split()[0])  # the largest batch that fits
    for b, fits in ((batch, True), (batch + 1, False)):
        smaller = cfg_of(f"model.path={PHI3V}", f"train.batch_size={b}", "train.gradient_checkpointing=false")
        assert plan_memory(smaller, model_config=phi3v).fits(24 * GB) is fits
    assert "train.gradient_checkpointing: true (~11." in message
    assert "qlora" not in message  # without checkpointing its activations alone do not fit either
    auto = cfg_of(f"model.path={PHI3V}", "train.batch_size=8")
    assert check_fits(
        auto, memory=24 * GB, devices=1, sharding="ddp"
    ).checkpointing  # auto fits by turning it on
    large = cfg_of(f"model.path={PHI3V}", "train.batch_size=40")  # with checkpointing: ~22 GB of activations
    with pytest.raises(UserError) as e:
        check_fits(large, memory=24 * GB, devices=1, sharding="ddp")
    qlora = plan_memory(
        cfg_of(f"model.path={PHI3V}", "train.batch_size=40", "train.method=qlora"), memory=24 * GB
    )
    assert qlora.fits(24 * GB) and f"train.method: qlora (~{qlora.total / GB:.1f} GB)" in str(e.value)
    full = cfg_of(f"model.path={PHI3V}", "train.method=full", "train.batch_size=8")
    with pytest.raises(UserError, match="train.method: lora"):
        check_fits(full, memory=32 * GB, devices=1, sharding="ddp")  # its states alone take 31 GB
    # sharding: 8 x 24 GB GPUs fit full fine-tuning sharded, not replicated
    assert not plan_memory(full, checkpointing=True, devices=8, sharding="ddp").fits(24 * GB)
    assert plan_memory(full, checkpointing=True, devices=8, sharding="fsdp").fits(24 * GB)


def test_train_stops_before_any_work_when_the_plan_does_not_fit(tmp_path, monkeypatch):
    """The check in `train()`, on a CPU with the GPU's memory injected through the environment."""
    from productvlm.training.run import train

    monkeypatch.setenv(GPU_MEMORY_ENV, "0.3")  # under the CUDA context alone
    cfg = cfg_of("model.path=preset:tiny", f"output_dir={tmp_path / 'run'}")
    with pytest.raises(UserError, match=r"needs ~0\.\d+ GB on this 0\.30 GB GPU"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv(GPU_MEMORY_ENV, "lots")
    with pytest.raises(UserError, match=GPU_MEMORY_ENV):
        train(cfg, progress=False)


def test_train_plan_prints_the_table_and_loads_nothing(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: {{path: {PHI3V}}}\ndata: {{dir: /nonexistent}}\noutput_dir: {tmp_path / 'run'}\n"
    )
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--plan", "--gpu-memory", "24"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())  # rich wraps at the terminal's width
    assert "checkpointing off" in output and "24 GB GPU (this GPU)" in output
    assert "-> on (auto, for 24.0 GB)" in output
    assert not (tmp_path / "run").exists()
    bad = CliRunner().invoke(app, ["train", "--config", str(config), "--plan", "--sharding", "zero4"])
    assert bad.exit_code != 0 and "--sharding zero4" in str(bad.exception)
