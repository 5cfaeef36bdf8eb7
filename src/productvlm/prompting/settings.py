"""The prompt settings a model was trained with, saved beside its weights: `prompt_settings.json`.

`train` writes the file into RUN/final (and RUN/final/adapter), `export` into the exported folder;
eval, predict, serve and export read it with `load_prompt_settings`. Folders written before the
file existed still work: an export's `config.yaml` or the run's `config.yaml` (`data:` section).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from productvlm.config import DEFAULT_ANSWER, DEFAULT_PROMPT, Config, read_yaml
from productvlm.errors import UserError
from productvlm.prompting.templates import render, template_fields
from productvlm.run_folder import CONFIG, find_run

SETTINGS_FILE = "prompt_settings.json"


@dataclass(frozen=True)
class PromptSettings:
    """The prompt template (with `<|image_1|>`), the answer template and the crops per photo."""

    prompt: str = DEFAULT_PROMPT
    answer: str = DEFAULT_ANSWER
    num_crops: int = 4

    @classmethod
    def from_config(cls, cfg: Config) -> PromptSettings:
        return cls(cfg.data.prompt, cfg.data.answer, cfg.data.num_crops)

    def prompt_for(self, row: dict[str, Any]) -> str:
        return render(self.prompt, row, "prompt")

    def photo_prompt(self) -> str:
        """The prompt when all there is is the photo (predict, the catalog endpoint)."""
        if columns := template_fields(self.prompt):
            raise UserError(
                f"the model's prompt uses catalog column(s) {', '.join(columns)}; "
                "with only a photo to go on, train with a prompt that has no columns"
            )
        return self.prompt.format_map({})  # as rendered in training ("{{" -> "{")

    def save(self, folder: str | Path) -> Path:
        """Write FOLDER/prompt_settings.json (train and export write into a folder renamed into place
        when complete, so the file needs no atomic write of its own)."""
        path = Path(folder) / SETTINGS_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path


def load_prompt_settings(model_dir: str | Path) -> PromptSettings:
    """The settings saved beside the weights at `model_dir`; for older folders the `data:` section of
    the export's or the run's config.yaml; else the defaults (the official prompt, 4 crops)."""
    if isinstance(model_dir, str) and not Path(model_dir).exists():
        return PromptSettings()  # a hub id
    folder = Path(model_dir)
    file = folder / SETTINGS_FILE
    if file.is_file():
        try:
            return PromptSettings(**json.loads(file.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as e:
            raise UserError(
                f"{file}: not prompt settings ({e}); re-export the model or delete the file"
            ) from e
    run = find_run(folder)
    for config in (folder / CONFIG, *([run / CONFIG] if run else [])):
        if config.is_file() and "data" in (cfg := read_yaml(config)):
            known = {k: v for k, v in cfg["data"].items() if k in ("prompt", "answer", "num_crops")}
            return PromptSettings(**known)
    return PromptSettings()


__all__ = ["PromptSettings", "load_prompt_settings", "SETTINGS_FILE"]
