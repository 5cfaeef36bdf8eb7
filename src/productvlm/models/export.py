"""`export`: any model folder productvlm reads -> a standalone folder in the official Phi-3-V layout.

The result has config.json (`model_type: phi3_v`, `architectures: ["Phi3VForCausalLM"]`, the official
fields including `rope_scaling.type: su` and `torch_dtype`), `model.safetensors` (or shards + index)
under the official weight names, each tensor stored once, the tokenizer, processor and generation
config, and the prompt settings it was trained with (`prompt_settings.json`, read by serve/predict).
The tokenizer and processor files carry the official classes and fields (`LlamaTokenizer`, no loader
arguments), so transformers 4.x loads them too, and `auto_map` entries name Microsoft's hub code for
`trust_remote_code=True` users (productvlm's own loaders ignore auto_map). `README.md` is the model card;
`evaluation.json` carries the source's last held-out metrics.json.

A LoRA adapter is exported only merged (`merge_lora=True`): the merge runs in float32 on the CPU,
then the weights are cast to the requested dtype; a QLoRA adapter merges into its base's own weights (freshly
loaded, not the 4-bit ones it trained on). Without the flag an adapter folder is a UserError,
because a folder that needs peft and a second folder is not the standalone layout other tools read.
The folder is written under a temporary name beside `out` and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from productvlm.config import read_yaml
from productvlm.errors import UserError
from productvlm.models.card import write_model_card
from productvlm.models.eval_records import CARRIED, last_evaluation
from productvlm.models.loading import (
    DTYPES,
    adapter_base,
    is_adapter,
    load_merged,
    resolve_model_dir,
)
from productvlm.models.phi3v.processing_phi3v import drop_loader_args, read_json, write_json
from productvlm.prompting.confidence import CALIBRATION_FILE
from productvlm.prompting.settings import load_prompt_settings
from productvlm.run_folder import find_run

EXPORT_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Microsoft's repos and where each keeps its image processor (auto_map values are "<repo>--<module.Class>").
HUB_CODE = {
    "microsoft/Phi-3-vision-128k-instruct": "image_processing_phi3_v.Phi3VImageProcessor",
    "microsoft/Phi-3.5-vision-instruct": "processing_phi3_v.Phi3VImageProcessor",
}
DEFAULT_HUB_CODE = "microsoft/Phi-3-vision-128k-instruct"


def export_model(
    model: str | Path,
    out: str | Path,
    merge_lora: bool = False,
    dtype: str = "bf16",
    overwrite: bool = False,
    max_shard_size: str = "5GB",
) -> Path:
    """Write `model` (full, adapter or run folder) to `out` in the official layout; returns `out`."""
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    out = Path(out)
    source = resolve_model_dir(model)
    if is_adapter(source) and not merge_lora:
        raise UserError(
            f"{source} is a LoRA adapter: pass --merge-lora to export the base model with the adapter merged "
            "in (serve and predict also read the adapter folder as it is)"
        )
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")
    if isinstance(source, Path) and out.resolve() == source.resolve():
        raise UserError(f"--out {out} is the model folder itself; choose another folder")

    net, processor = load_merged(source)
    net = net.to(DTYPES[dtype])
    net.config.use_cache = True

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        net.save_pretrained(tmp, max_shard_size=max_shard_size)
        processor.tokenizer.model_max_length = net.config.max_position_embeddings  # as the official files
        processor.save_pretrained(tmp)  # writes the official tokenizer and processor files
        base = base_model(source)
        _officialize_config(tmp / "config.json", EXPORT_DTYPES[dtype], hub_code_repo(base))
        _add_auto_map(tmp, hub_code_repo(base))
        load_prompt_settings(source).save(tmp)
        if isinstance(source, Path) and (source / CALIBRATION_FILE).is_file():  # the confidence calibration
            shutil.copy2(source / CALIBRATION_FILE, tmp / CALIBRATION_FILE)
        write_model_card(tmp / "README.md", source, out.name, EXPORT_DTYPES[dtype], base)
        _carry_evaluation(tmp / CARRIED, source)
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def base_model(source: Path | str) -> str | None:
    """The hub id the model was fine-tuned from: the model itself (a hub id), its run's `model.path`, or
    its adapter's base; None for presets and local folders."""
    if isinstance(source, str):
        return source
    run = find_run(source)
    if run is not None:
        path = str((read_yaml(run / "config.yaml").get("model") or {}).get("path", ""))
        return path if _is_hub_id(path) else None
    if is_adapter(source):
        base = adapter_base(source)
        return base if isinstance(base, str) else None
    return None


def hub_code_repo(base: str | None) -> str:
    """Microsoft's repo whose code `trust_remote_code=True` runs: the base's own, else Phi-3-vision's."""
    return base if base in HUB_CODE else DEFAULT_HUB_CODE


def _is_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "preset:")) and not Path(path).exists()


def _officialize_config(path: Path, dtype: str, code: str) -> None:
    """Keep the fields tools written for the official config read: `torch_dtype` and `rope_theta`
    (transformers v5 writes `dtype` and nests rope_theta in `rope_parameters`), the architecture and
    `auto_map` (hub code; our loaders ignore it); Phi3VConfig already writes `rope_scaling` (type "su")."""
    config = drop_loader_args(read_json(path))
    config["architectures"] = ["Phi3VForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": f"{code}--configuration_phi3_v.Phi3VConfig",
        "AutoModelForCausalLM": f"{code}--modeling_phi3_v.Phi3VForCausalLM",
    }
    config["torch_dtype"] = config["dtype"] = dtype
    rope_theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if rope_theta is not None:
        config.setdefault("rope_theta", rope_theta)
    write_json(path, config)


def _add_auto_map(folder: Path, code: str) -> None:
    """`auto_map` entries naming Microsoft's processor code, for `trust_remote_code=True` users."""
    processor = f"{code}--processing_phi3_v.Phi3VProcessor"
    maps = {
        "tokenizer_config.json": {"AutoProcessor": processor},
        "preprocessor_config.json": {
            "AutoImageProcessor": f"{code}--{HUB_CODE[code]}",
            "AutoProcessor": processor,
        },
        "processor_config.json": {"AutoProcessor": processor},
    }
    for name, auto_map in maps.items():
        write_json(folder / name, {**read_json(folder / name), "auto_map": auto_map})


def _carry_evaluation(path: Path, source: Path | str) -> None:
    """The source's last held-out metrics travel with the export (the serving page shows them)."""
    evaluation = last_evaluation(source) if isinstance(source, Path) else None
    if evaluation is not None:
        path.write_text(json.dumps(evaluation, indent=2) + "\n", encoding="utf-8")


def _replace(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an old `out` (with --overwrite) goes only after that."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["export_model", "base_model", "hub_code_repo", "EXPORT_DTYPES", "HUB_CODE"]
