"""QLoRA (`train.method: qlora`) on the CPU: a 4-bit NF4 base (bitsandbytes) trained through LoRA, its
adapter loaded by eval / predict / serve on the same 4-bit base, and merged by `export` / `merge_final`
into the base's own weights, not the 4-bit ones."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file
from transformers import TrainerCallback

from productvlm.config import load_config
from productvlm.data.folder import read_split
from productvlm.data.synth import synthesize
from productvlm.errors import UserError
from productvlm.evaluation.run import run_eval
from productvlm.inference.predictor import Predictor
from productvlm.models.export import export_model
from productvlm.models.loading import EXTRA_TRAINABLES, QUANTIZATION, load_pretrained, qlora_config
from productvlm.models.phi3v import Phi3VForCausalLM
from productvlm.serving.app import ServeSettings, app_from_folder
from productvlm.training.callbacks import StopAfter
from productvlm.training.run import train
from test_train_run import config

TOWER = "model.vision_embed_tokens.img_processor."
QLORA = [
    "train.method=qlora",
    "model.dtype=bfloat16",  # the GPU recipe's: NF4 weights computing in bf16
    "train.precision=bf16",
    "train.lora.projector=true",
    "train.optim=paged_adamw_8bit",  # bitsandbytes' 8-bit AdamW runs on the CPU (not paged there)
    "train.lr=1e-2",
    "train.lr_projector=1e-3",
    "train.max_steps=8",
    "train.save_steps=4",
    "train.merge_final=true",
]


class Watch(TrainerCallback):
    """The model in training: its 4-bit bytes and LoRA weights at the start and end, and the optimizer."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model, self.before = model, snapshot(model)

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.after, self.optimizer = snapshot(model), optimizer


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def base_linears(model) -> dict[str, torch.nn.Module]:
    """Every Linear that LoRA wraps or that peft leaves as it is, by its name in the base model."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in name:
            found[name.replace("base_model.model.", "").replace(".base_layer", "")] = module
    return found


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("catalog")
    synthesize(out, rows=48, seed=5, overwrite=True, progress=False, workers=1)
    return out


@pytest.fixture(scope="module")
def qlora_run(data_dir, tmp_path_factory):
    watch = Watch()
    result = train(
        config(data_dir, tmp_path_factory.mktemp("qlora") / "run", *QLORA), callbacks=[watch], progress=False
    )
    return result, watch


def test_base_is_4bit_and_frozen_while_lora_and_the_projector_train(qlora_run):
    result, watch = qlora_run
    linears = base_linears(watch.model)
    quantized = {n for n, m in linears.items() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized == {n for n in linears if n.startswith(("model.layers.", TOWER))}  # the plan's contract
    assert len(quantized) == 4 * 4 + 4 * 6  # tiny: 4 decoder layers x 4, 4 CLIP layers x 6
    for name in quantized:
        weight = linears[name].weight
        assert (
            isinstance(weight, bnb.nn.Params4bit) and weight.dtype == torch.uint8 and not weight.requires_grad
        )
        assert weight.quant_state.quant_type == "nf4" and weight.quant_state.nested  # double quantization
    assert type(linears["model.vision_embed_tokens.img_projection.0"]) is torch.nn.Linear
    assert type(linears["lm_head"]) is torch.nn.Linear

    changed = {n for n in watch.before if not torch.equal(watch.before[n], watch.after[n])}
    four_bit = {n for n, p in watch.model.named_parameters() if isinstance(p, bnb.nn.Params4bit)}
    assert four_bit and not four_bit & changed  # the 4-bit bytes never change
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)
    assert {n for n in changed if "lora_" not in n} == {
        n for n in watch.before if any(p in n for p in ("img_projection", "glb_GN", "sub_GN"))
    }
    losses = [e["loss"] for e in map(json.loads, (result.run_dir / "train_log.jsonl").open()) if "loss" in e]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses


def test_an_interrupted_qlora_run_resumes_to_the_same_adapter(qlora_run, data_dir, tmp_path):
    """The checkpoint holds the adapter, the projector and the 8-bit optimizer state; the base is re-quantized.
    Bit-exact once the resumed adapter is back in bf16 (RunTrainer._load_from_checkpoint: peft's
    load_adapter had cast it to fp32, and the losses after the resume drifted)."""
    result, _ = qlora_run
    cfg = config(data_dir, tmp_path / "run", *QLORA)
    assert train(cfg, callbacks=[StopAfter(4)], progress=False).steps == 4
    resumed = train(cfg, resume=True, progress=False)
    assert resumed.resumed_from.name == "step-000004"
    for file in ("adapter_model.safetensors", EXTRA_TRAINABLES):
        a, b = load_file(result.final_dir / "adapter" / file), load_file(resumed.final_dir / "adapter" / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file


def test_train_optim_and_per_part_learning_rates_reach_the_optimizer(qlora_run):
    _, watch = qlora_run
    optimizer = watch.optimizer.optimizer if hasattr(watch.optimizer, "optimizer") else watch.optimizer
    assert type(optimizer) is bnb.optim.AdamW and optimizer.is_paged  # (paging itself is CUDA's)
    assert {g["part"]: g["initial_lr"] for g in optimizer.param_groups} == {
        "decoder": 1e-2,
        "projector": 1e-3,
    }
    states = [s["state1"].dtype for s in optimizer.state.values()]
    assert torch.uint8 in states  # 8-bit state (bnb keeps tensors under 4096 elements in 32-bit)


def test_8bit_adamw_keeps_embeddings_in_32bit_state(data_dir, tmp_path):
    """As transformers' own create_optimizer does for bitsandbytes, which our per-part override replaces."""
    watch = Watch()
    sets = ["train.method=full", "train.optim=adamw_8bit", "train.max_steps=1", "train.merge_final=false"]
    train(config(data_dir, tmp_path / "run", *sets), callbacks=[watch], progress=False)
    optimizer = watch.optimizer.optimizer if hasattr(watch.optimizer, "optimizer") else watch.optimizer
    assert type(optimizer) is bnb.optim.AdamW
    state = {
        n: optimizer.state[p]["state1"].dtype
        for n, p in watch.model.named_parameters()
        if p in optimizer.state
    }
    assert state["model.embed_tokens.weight"] == torch.float32
    assert state["model.layers.0.mlp.gate_up_proj.weight"] == torch.uint8


def test_adapter_records_its_4bit_base_and_eval_predict_serve_load_it(qlora_run, data_dir):
    result, watch = qlora_run
    adapter = result.final_dir / "adapter"
    for folder in (adapter, result.run_dir / "checkpoints" / "step-000008"):
        record = json.loads((folder / QUANTIZATION).read_text())
        assert record["load_in_4bit"] and record["bnb_4bit_quant_type"] == "nf4"
        assert record["bnb_4bit_use_double_quant"] and record["bnb_4bit_compute_dtype"] == "bfloat16"

    predictor = Predictor(adapter, device="cpu", dtype="float32", max_new_tokens=6)
    model = predictor.model
    assert model.is_loaded_in_4bit
    loaded = {n: p for n, p in model.named_parameters()}
    trained = {
        n: t
        for n, t in watch.after.items()
        if isinstance(dict(watch.model.named_parameters())[n], bnb.nn.Params4bit)
    }
    assert trained and all(torch.equal(loaded[n], t) for n, t in trained.items())  # quantized as in training
    lora = {n: t for n, t in watch.after.items() if "lora_" in n}
    assert all(torch.equal(loaded[n].float(), t.float()) for n, t in lora.items())

    photo = read_split(data_dir, "test")[0]["image_path"]
    predicted = predictor.answers([{"image_path": photo}], progress=False)[0]
    app = app_from_folder(adapter, ServeSettings(catalog_max_tokens=6))
    with TestClient(app) as client:
        served = client.post("/v1/catalog", files={"file": ("p.jpg", Path(photo).read_bytes(), "image/jpeg")})
    assert served.status_code == 200, served.text
    assert served.json()["raw"] == predicted  # the same 4-bit model answers in both verbs

    evaluated = run_eval(adapter, data_dir, limit=1, max_new_tokens=6, device="cpu", progress=False)
    assert evaluated.predictions[0]["raw"] == predicted


@torch.no_grad()
def logits(model, processor) -> torch.Tensor:
    prompt = "<|user|>\n<|image_1|>What is shown in this image?<|end|><|assistant|>\nProduct: Black"
    inputs = processor(prompt, [Image.new("RGB", (150, 110), (150, 60, 40))], num_crops=1)
    return model(**inputs).logits.float()


def test_export_merges_into_the_base_not_the_4bit_weights(qlora_run, tmp_path):
    """The merged export equals the adapter on the full-precision base (1e-4), and the adapter on its 4-bit
    base within the quantization error: at most 1.5x the gap between the base and the 4-bit base."""
    result, _ = qlora_run
    adapter, base_dir = result.final_dir / "adapter", result.run_dir / "base-model"
    out = export_model(adapter, tmp_path / "export", merge_lora=True, dtype="fp32")

    base_weights, merged_weights = (
        load_file(base_dir / "model.safetensors"),
        load_file(out / "model.safetensors"),
    )
    tower = [k for k in base_weights if k.startswith(TOWER) and k.endswith("proj.weight")]
    assert tower and all(torch.equal(merged_weights[k], base_weights[k]) for k in tower)  # not dequantized

    merged, processor = load_pretrained(out)
    on_full_base, _ = load_pretrained(adapter, quantized=False)
    on_4bit_base, _ = load_pretrained(adapter)
    base = Phi3VForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    base_4bit = Phi3VForCausalLM.from_pretrained(
        base_dir, dtype=torch.bfloat16, quantization_config=qlora_config("bfloat16"), device_map={"": "cpu"}
    )
    merged_logits = logits(merged, processor)
    quantization_error = (logits(base, processor) - logits(base_4bit, processor)).abs().max().item()
    merged_vs_4bit = (merged_logits - logits(on_4bit_base, processor)).abs().max().item()
    adapter_effect = (logits(on_4bit_base, processor) - logits(base_4bit, processor)).abs().max().item()
    print(
        f"quantization error {quantization_error:.4f}, merged vs 4-bit adapter {merged_vs_4bit:.4f}, "
        f"adapter effect {adapter_effect:.4f}"
    )
    assert (merged_logits - logits(on_full_base, processor)).abs().max().item() < 1e-4
    assert merged_vs_4bit <= 1.5 * quantization_error
    assert adapter_effect > 2 * merged_vs_4bit  # the merge carries the adapter, not just the base


def test_merge_final_is_the_bf16_base_merged_not_the_4bit_one(qlora_run):
    result, _ = qlora_run
    base, final = (
        load_file(result.run_dir / "base-model" / "model.safetensors"),
        load_file(result.final_dir / "model.safetensors"),
    )
    tower = [k for k in base if k.startswith(TOWER) and k.endswith("proj.weight")]
    assert tower and all(final[k].dtype == torch.bfloat16 for k in final if k.endswith(".weight"))
    assert all(torch.equal(final[k], base[k].to(torch.bfloat16)) for k in tower)
    decoder = "model.layers.0.self_attn.qkv_proj.weight"
    assert not torch.equal(final[decoder], base[decoder].to(torch.bfloat16))  # the adapter is merged in
    projector = "model.vision_embed_tokens.img_projection.0.weight"
    assert not torch.equal(final[projector], base[projector].to(torch.bfloat16))  # and the trained projector


def test_qlora_under_fsdp_is_refused(monkeypatch, data_dir, tmp_path):
    from productvlm.training.model import quantization

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match=r"train\.method qlora under FSDP"):
        quantization(load_config(None, ["train.method=qlora"]))


def chance_of_at_least(right: int, n: int, p: float) -> float:
    """P(X >= right) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(right, n + 1))


@pytest.fixture
def one_thread():
    """One intra-op thread: on 2 cores shared with other work, two threads spin-wait on each other (this
    test's stage 1 alone ran > 9 min that way, the whole test 2 min with one), and the sums do not depend
    on how many cores the machine has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_qlora_learns_the_categories_through_productvlm_train(tmp_path, one_thread):
    """`productvlm train` with method qlora on an 800-row catalog: the preset's tower first learns the photos
    alone (stage 1, as a real Phi-3-V's arrives pretrained; 15 epochs: ~56% on validation), then is quantized
    with the decoder, and LoRA plus the projector learn to name the category (6 epochs); the saved adapter
    loads on its 4-bit base and names the held-out photos' categories far above what the prompt alone can.

    The bound: every test row gets the same prompt, so an answer that ignores the photo is one category for
    all rows, right at most as often as the test split's largest category (`blind`, ~0.16 here). Even a
    model whose answers merely varied with the photo independently of its category would be right on
    each row with probability <= `blind`; the accuracy must be one such a model reaches with probability
    < 1e-6: on these 77 rows at least 29 right (38%); measured: 47 (61%, majority 7.8%), 115 s on 2 shared
    cores. Seeded, one thread: the same run each time."""
    from typer.testing import CliRunner

    from productvlm.cli import app
    from productvlm.inference.generate import generate_answers
    from productvlm.prompting.parse import parse_answer
    from productvlm.prompting.settings import PromptSettings
    from productvlm.training.generation_scores import baselines, score
    from test_train_run import CONFIGS

    data_dir, out = tmp_path / "catalog", tmp_path / "run"
    synthesize(data_dir, rows=800, seed=0, overwrite=True, progress=False)
    sets = [
        f"data.dir={data_dir}",
        f"output_dir={out}",
        "data.answer='Category: {category3_code}'",  # ~5 answer tokens: the category is what is learned
        "data.augment.enabled=false",  # it pays off only over more epochs than this test has
        "train.method=qlora",
        "model.dtype=float32",  # NF4 weights computing in fp32: faster than bf16 on a CPU
        "train.precision=fp32",
        "train.lora.projector=true",
        "train.vision_pretrain.epochs=15",
        "train.epochs=6",
        "train.lr=3e-3",  # 1e-2 collapsed to one category for every photo (measured)
        "train.balance=0",  # the order the measured figures above were taken with
        "train.max_minutes=null",  # no time budgets: the same steps under any load
        "train.vision_pretrain.max_minutes=null",
        "train.merge_final=false",
        "train.num_workers=0",
        "eval.subset=0",
        "tracking.backend=none",
    ]
    args = ["train", "--config", str(CONFIGS / "tiny-cpu.yaml")] + [x for s in sets for x in ("--set", s)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    cfg = load_config(out / "config.yaml")
    model, processor = load_pretrained(out / "final")
    assert model.is_loaded_in_4bit and not (out / "final" / "model.safetensors").exists()  # an adapter
    test = read_split(data_dir, "test")
    answers = generate_answers(model, processor, PromptSettings.from_config(cfg), test, 16, 8)
    metrics, base = score(test, answers), baselines(read_split(data_dir, "train"), test)
    n, right = len(test), round(metrics["category_accuracy"] * len(test))
    blind = max(Counter(r["category3_code"] for r in test).values()) / n
    chance = chance_of_at_least(right, n, blind)
    print(f"qlora: {right}/{n} right, blind {blind:.3f}, chance {chance:.1e}, {metrics}, baselines: {base}")
    assert sum(parse_answer(a).category is not None for a in answers) >= 0.95 * n
    assert chance < 1e-6
    assert metrics["category_accuracy"] >= 2.5 * base["majority_category_accuracy"]
