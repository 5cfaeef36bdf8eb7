"""`export`: any model folder productvlm reads -> a standalone folder in the official Phi-3-V layout.

The result has config.json (`model_type: phi3_v`, `architectures: ["Phi3VForCausalLM"]`, the official
fields including `rope_scaling.type: su` and `torch_dtype`), `model.safetensors` (or shards + index)
under the official weight names, each tensor stored once, the tokenizer, processor and generation
config, and the prompt settings it was trained with (`prompt_settings.json`, read by serve/predict).

A LoRA adapter is exported only merged (`merge_lora=True`): the merge runs in float32 on the CPU,
then the weights are cast to the requested dtype. Without the flag an adapter folder is a UserError,
because a folder that needs peft and a second folder is not the standalone layout other tools read.
The folder is written under a temporary name beside `out` and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from productvlm.errors import UserError
from productvlm.models.loading import DTYPES, is_adapter, load_pretrained, resolve_model_dir
from productvlm.prompting.settings import load_prompt_settings

EXPORT_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


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

    net, processor = load_pretrained(source, dtype="float32")
    if is_adapter(source):
        net = net.merge_and_unload()
    net = net.to(DTYPES[dtype])
    net.config.use_cache = True

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        net.save_pretrained(tmp, max_shard_size=max_shard_size)
        processor.save_pretrained(tmp)
        _officialize_config(tmp / "config.json", EXPORT_DTYPES[dtype])
        load_prompt_settings(source).save(tmp)
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _officialize_config(path: Path, dtype: str) -> None:
    """Keep the fields tools written for the official config read: `torch_dtype` and `rope_theta`
    (transformers v5 writes `dtype` and nests rope_theta in `rope_parameters`) and the architecture;
    Phi3VConfig already writes the official `rope_scaling` (type "su")."""
    config = json.loads(path.read_text(encoding="utf-8"))
    config["architectures"] = ["Phi3VForCausalLM"]
    config["torch_dtype"] = config["dtype"] = dtype
    rope_theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if rope_theta is not None:
        config.setdefault("rope_theta", rope_theta)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _replace(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an old `out` (with --overwrite) goes only after that."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["export_model", "EXPORT_DTYPES"]
