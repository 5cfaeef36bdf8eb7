"""Load any model folder productvlm writes or reads, for inference: `load_pretrained(path)`.

A folder is either a full model in the official layout (config.json with `model_type: phi3_v`
plus safetensors: a hub download, `RUN/final` of a full or merged run, an export) or a peft
adapter folder (adapter_config.json naming its base model: `RUN/final` of a LoRA run, or
`RUN/final/adapter`). A run folder itself is accepted too and means its `final/`.

A QLoRA adapter carries `quantization_config.json` (transformers' BitsAndBytesConfig as trained): its
base is loaded in 4-bit with that config, as it was trained, except to merge (`load_merged`), which
takes the base's own weights, never the 4-bit ones.
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
QUANTIZATION = "quantization_config.json"  # qlora: how the adapter's base is loaded (BitsAndBytesConfig)
# QLoRA's base: every nn.Linear of the decoder layers and the CLIP tower in NF4; the image projection and
# lm_head stay in model.dtype. transformers >= 5 matches a skip pattern from the start of the module name
# or as its suffix, so the projection needs its full name (`img_projection` alone matches neither).
QLORA_SKIP_MODULES = ["lm_head", "model.vision_embed_tokens.img_projection"]
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


def qlora_config(dtype: str | torch.dtype):
    """QLoRA's 4-bit base: NF4 with double quantization, computing in `dtype` (the run's model.dtype)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES[dtype] if isinstance(dtype, str) else dtype,
        llm_int8_skip_modules=QLORA_SKIP_MODULES,
    )


def save_quantization(model, folder: str | Path) -> None:
    """Record beside an adapter how its base was quantized (nothing for an unquantized base)."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is not None:
        record = config if isinstance(config, dict) else config.to_dict()
        (Path(folder) / QUANTIZATION).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def adapter_quantization(adapter: Path):
    """The BitsAndBytesConfig an adapter's base was trained in, or None (a LoRA adapter on a full base)."""
    file = adapter / QUANTIZATION
    if not file.is_file():
        return None
    from transformers import BitsAndBytesConfig

    try:
        return BitsAndBytesConfig.from_dict(json.loads(file.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{file}: not a bitsandbytes quantization config ({e})") from e


def load_pretrained(
    path: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    quantized: bool = True,
) -> tuple[torch.nn.Module, Phi3VProcessor]:
    """(model in eval mode, processor) from a full model folder, an adapter folder, a run folder or a hub id.

    An adapter is loaded onto its base model with peft (not merged, so the weights stay exactly
    as trained); the processor comes from the adapter folder when it has one, else from the base.
    A QLoRA adapter's base is quantized as in training, on `device`, in the dtype it was trained in
    (`dtype` does not apply), unless `quantized=False` (for merging: the base's own weights in `dtype`).
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
        quantization = adapter_quantization(where) if quantized else None
        if quantization is not None:
            model = Phi3VForCausalLM.from_pretrained(
                base,
                dtype=quantization.bnb_4bit_compute_dtype,
                quantization_config=quantization,
                device_map={"": device},
                allow_pickle=allow_pickle,
            )
        else:
            model = Phi3VForCausalLM.from_pretrained(base, dtype=dtype, allow_pickle=allow_pickle)
        model = PeftModel.from_pretrained(model, str(where))
        load_extra_trainables(model, where)
        processor_dir = where if (where / "tokenizer_config.json").is_file() else base
    else:
        model = Phi3VForCausalLM.from_pretrained(where, dtype=dtype, allow_pickle=allow_pickle)
        processor_dir = where
    processor = Phi3VProcessor.from_pretrained(processor_dir)
    if not getattr(model, "is_loaded_in_4bit", False):  # a 4-bit base is placed by device_map
        model = model.to(device)
    return model.eval(), processor


def load_merged(path: str | Path, allow_pickle: bool = False) -> tuple[torch.nn.Module, Phi3VProcessor]:
    """An adapter merged in float32 into a freshly loaded base (for QLoRA its own weights, not the 4-bit
    ones), on the CPU; a full model folder as it is, in float32."""
    model, processor = load_pretrained(path, "float32", allow_pickle=allow_pickle, quantized=False)
    if is_adapter(resolve_model_dir(path)):
        model = model.merge_and_unload()
    return model, processor


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
    "load_merged",
    "qlora_config",
    "save_quantization",
    "adapter_quantization",
    "QUANTIZATION",
    "load_extra_trainables",
    "resolve_model_dir",
    "is_adapter",
    "adapter_base",
    "DTYPES",
]
