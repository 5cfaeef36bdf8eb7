"""Load any model folder productvlm writes or reads, for inference: `load_pretrained(path)`.

A folder is either a full model in the official layout (config.json with `model_type: phi3_v`
plus safetensors: a hub download, `RUN/final` of a full or merged run, an export) or a peft
adapter folder (adapter_config.json naming its base model: `RUN/final` of a LoRA run, or
`RUN/final/adapter`). A run folder itself is accepted too and means its `final/`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from productvlm.errors import UserError
from productvlm.models.phi3v import Phi3VForCausalLM, Phi3VProcessor
from productvlm.run_folder import FINAL

ADAPTER_CONFIG = "adapter_config.json"
EXTRA_TRAINABLES = "extra_trainables.safetensors"  # lora+projector: img_projection, glb_GN, sub_GN
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_model_dir(path: str | Path) -> Path | str:
    """A run folder means its final model; a hub id (not an existing path) is returned as is."""
    p = Path(path)
    if not p.exists():
        if str(path).count("/") == 1 and not str(path).startswith((".", "/")):
            return str(path)  # a hub id like microsoft/Phi-3-vision-128k-instruct
        raise UserError(f"model {path}: no such folder")
    if (p / FINAL).is_dir() and not (p / "config.json").is_file():
        p = p / FINAL
    if not (p / "config.json").is_file() and not (p / ADAPTER_CONFIG).is_file():
        raise UserError(
            f"model {p}: neither a model folder (config.json) nor a LoRA adapter ({ADAPTER_CONFIG})"
        )
    return p


def is_adapter(path: Path | str) -> bool:
    return isinstance(path, Path) and (path / ADAPTER_CONFIG).is_file()


def adapter_base(adapter: Path) -> Path | str:
    """The adapter's base model: as written, else relative to the adapter or its run folder."""
    try:
        base = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(
            f"{adapter / ADAPTER_CONFIG}: unreadable or without base_model_name_or_path ({e})"
        ) from e
    if not base:
        raise UserError(f"{adapter / ADAPTER_CONFIG}: base_model_name_or_path is empty")
    candidates = [Path(base), adapter / base, *(parent / Path(base).name for parent in adapter.parents[:3])]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    if Path(base).is_absolute() or base.startswith("."):
        raise UserError(f"{adapter}: its base model {base} is not there")
    return base  # a hub id


def load_pretrained(
    path: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
) -> tuple[torch.nn.Module, Phi3VProcessor]:
    """(model in eval mode, processor) from a full model folder, an adapter folder, a run folder or a hub id.

    An adapter is loaded onto its base model with peft (not merged, so the weights stay exactly
    as trained); the processor comes from the adapter folder when it has one, else from the base.
    Pickle weights (model or adapter) are refused unless `allow_pickle=True`; no code from any
    of the folders runs (config.json's `auto_map` is ignored).
    """
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    where = resolve_model_dir(path)
    if is_adapter(where):
        from peft import PeftModel

        if not allow_pickle:
            _refuse_pickle_adapter(where)
        base = adapter_base(where)
        model = Phi3VForCausalLM.from_pretrained(base, dtype=dtype, allow_pickle=allow_pickle)
        model = PeftModel.from_pretrained(model, str(where))
        load_extra_trainables(model, where)
        processor_dir = where if (where / "tokenizer_config.json").is_file() else base
    else:
        model = Phi3VForCausalLM.from_pretrained(where, dtype=dtype, allow_pickle=allow_pickle)
        processor_dir = where
    processor = Phi3VProcessor.from_pretrained(processor_dir)
    return model.to(device).eval(), processor


def _refuse_pickle_adapter(adapter: Path) -> None:
    """peft falls back to adapter_model.bin (a pickle) when there is no adapter_model.safetensors."""
    if not (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_model.bin").is_file():
        raise UserError(
            f"{adapter} holds only pickle adapter weights (adapter_model.bin); unpickling can run code. "
            "Re-save it with safetensors, or pass allow_pickle=True if you trust the file."
        )


def load_extra_trainables(model, folder: Path) -> None:
    """Copy FOLDER/extra_trainables.safetensors (lora+projector's non-LoRA weights) into `model`, if present."""
    file = Path(folder) / EXTRA_TRAINABLES
    if not file.is_file():
        return
    from safetensors.torch import load_file

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in load_file(file).items():
            if name not in params:
                raise UserError(f"{file}: parameter {name} is not in the model")
            params[name].copy_(value)


__all__ = [
    "load_pretrained",
    "load_extra_trainables",
    "resolve_model_dir",
    "is_adapter",
    "adapter_base",
    "DTYPES",
]
