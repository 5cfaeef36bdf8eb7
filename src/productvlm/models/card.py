"""The model card an export writes as README.md, through huggingface_hub's `ModelCard`: Hub metadata
(`ModelCardData`: base_model, library_name, pipeline_tag, datasets, metrics, and the last held-out
evaluation as `EvalResult`s, which become the model-index) and a body with the prompt and answer
template, how the model was trained and how to load it. Building the `ModelCard` parses the metadata
back, so a model-index the Hub would not read fails here."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from productvlm.config import read_yaml
from productvlm.models.eval_records import (
    dataset_currency,
    held_out_metrics,
    last_evaluation,
    model_dataset,
)
from productvlm.prompting.settings import PromptSettings, load_prompt_settings
from productvlm.run_folder import find_run

TRAIN_KEYS = (
    "method",
    "epochs",
    "max_steps",
    "lr",
    "schedule",
    "batch_size",
    "grad_accum",
    "precision",
    "seed",
)


def write_model_card(path: Path, source: Path | str, name: str, dtype: str, base: str | None) -> None:
    run = find_run(source) if isinstance(source, Path) else None
    config = read_yaml(run / "config.yaml") if run is not None else {}
    evaluation = last_evaluation(source) if isinstance(source, Path) else None
    dataset = model_dataset(source, evaluation)
    settings = load_prompt_settings(source)
    metadata = card_data(name, base, dataset, evaluation)
    body = [
        f"# {name}",
        "",
        f"Reads a product photo and writes its catalog entry (title, category, price). Fine-tuned from "
        f"{f'[{base}](https://huggingface.co/{base})' if base else 'a Phi-3-Vision model'} with productvlm; "
        f"weights in {dtype}, official Phi-3-Vision layout.",
        "",
        *_prompt_section(settings, dataset_currency(dataset)),
        *_training_section(config, run),
        *_evaluation_section(evaluation),
        *_usage_section(name, settings),
    ]
    ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(body)).save(path)


def card_data(name: str, base: str | None, dataset: str | None, evaluation: dict | None) -> ModelCardData:
    """The card's metadata; the evaluation's figures (those present) as one EvalResult each."""
    metrics = held_out_metrics(evaluation)
    dataset_name = Path(dataset or "dataset").name
    results = [
        EvalResult(
            task_type="image-text-to-text",
            task_name="Product catalog entry from a photo",
            dataset_type="imagefolder",
            dataset_name=dataset_name,
            dataset_split=(evaluation or {}).get("split", "test"),
            metric_type=m["type"],
            metric_name=m["name"],
            metric_value=m["value"],
        )
        for m in metrics
    ]
    return ModelCardData(
        base_model=base,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=["productvlm", "phi3_v", "product-catalog", "vision"],
        datasets=[Path(dataset).name] if dataset else None,
        metrics=sorted({m["type"] for m in metrics}) or None,
        model_name=name,
        eval_results=results or None,
    )


def _prompt_section(settings: PromptSettings, currency: str | None) -> list[str]:
    return [
        "## Prompt and answer",
        "",
        f"The prompt it was trained with (`num_crops={settings.num_crops}`); `<|image_1|>` is the photo:",
        "",
        "```text",
        settings.prompt,
        "```",
        "",
        "The answer template (catalog columns in braces):",
        "",
        "```text",
        settings.answer,
        "```",
        "",
        f"Prices are in {currency}." if currency else "The training data does not name the prices' currency.",
        "",
    ]


def _training_section(config: dict, run: Path | None) -> list[str]:
    if not config:
        return [
            "## Training",
            "",
            "No run folder beside the model, so how it was trained is not recorded.",
            "",
        ]
    train = config.get("train") or {}
    rows = [(key, train[key]) for key in TRAIN_KEYS if train.get(key) is not None]
    if str(train.get("method", "")).startswith("lora"):
        lora = train.get("lora") or {}
        rows.append(("LoRA", f"r={lora.get('r')}, alpha={lora.get('alpha')}, targets={lora.get('targets')}"))
    rows += [
        ("base model", (config.get("model") or {}).get("path")),
        ("dataset", (config.get("data") or {}).get("dir")),
    ]
    last = _last_loss(run / "train_log.jsonl") if run is not None else None
    if last is not None:
        rows.append(("final training loss", f"{last[1]:.4f} at step {last[0]}"))
    return ["## Training", "", "| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]


def _evaluation_section(evaluation: dict | None) -> list[str]:
    if not evaluation:
        return [
            "## Evaluation",
            "",
            "Not evaluated yet (`productvlm eval` writes the metrics this card shows).",
            "",
        ]
    rows = [f"| {m['name']} | {m['value']} |" for m in held_out_metrics(evaluation)]
    where = f"split `{evaluation.get('split')}`, {evaluation.get('n', '?')} rows"
    return [
        "## Evaluation",
        "",
        f"By generation on the held-out {where}:",
        "",
        "| metric | value |",
        "|---|---|",
        *rows,
        "",
    ]


def _usage_section(name: str, settings: PromptSettings) -> list[str]:
    return [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoProcessor",
        f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True, torch_dtype="auto")',
        f'processor = AutoProcessor.from_pretrained("{name}", trust_remote_code=True, num_crops={settings.num_crops})',
        "```",
        "",
        f"or `productvlm serve --model {name}` (OpenAI-compatible API and a page).",
        "",
    ]


def _last_loss(log: Path) -> tuple[int, float] | None:
    last = None
    try:
        for line in log.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            if isinstance(entry.get("loss"), (int, float)):
                last = (entry.get("step"), entry["loss"])
    except (OSError, ValueError):
        return None
    return last


__all__ = ["write_model_card", "card_data"]
