"""The prompt settings saved beside a model's weights, the run folder walk, and templates."""

from __future__ import annotations

import json

import pytest
import yaml

from productvlm.config import DEFAULT_ANSWER, DEFAULT_PROMPT, load_config
from productvlm.errors import UserError
from productvlm.prompting.settings import SETTINGS_FILE, PromptSettings, load_prompt_settings
from productvlm.prompting.templates import render, template_fields
from productvlm.run_folder import find_run

MINE = PromptSettings("<|user|>\n<|image_1|>Describe it.<|end|><|assistant|>\n", "T: {title}", 2)


def run_folder(tmp_path, data: dict):
    run = tmp_path / "run"
    (run / "final" / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": data}))
    return run


def test_saved_beside_the_weights_and_read_back(tmp_path):
    path = MINE.save(tmp_path)
    assert path == tmp_path / SETTINGS_FILE
    assert json.loads(path.read_text()) == {"prompt": MINE.prompt, "answer": "T: {title}", "num_crops": 2}
    assert load_prompt_settings(tmp_path) == MINE


def test_the_file_beside_the_weights_wins_over_the_run_config(tmp_path):
    run = run_folder(tmp_path, {"prompt": "old <|image_1|>", "num_crops": 9})
    MINE.save(run / "final")
    assert load_prompt_settings(run / "final") == MINE


@pytest.mark.parametrize("model", ["run", "run/final", "run/final/adapter"])
def test_older_runs_fall_back_to_the_run_config(tmp_path, model):
    run = run_folder(tmp_path, {"prompt": "<|image_1|>{title}?", "num_crops": 1, "dir": "x"})
    assert find_run(tmp_path / model) == run
    assert load_prompt_settings(tmp_path / model) == PromptSettings("<|image_1|>{title}?", DEFAULT_ANSWER, 1)


def test_older_exports_fall_back_to_their_config_yaml(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": {"num_crops": 16}}))
    assert find_run(tmp_path) is None
    assert load_prompt_settings(tmp_path) == PromptSettings(DEFAULT_PROMPT, DEFAULT_ANSWER, 16)


def test_defaults_for_a_plain_folder_and_a_hub_id(tmp_path):
    assert load_prompt_settings(tmp_path) == PromptSettings(DEFAULT_PROMPT, DEFAULT_ANSWER, 4)
    assert load_prompt_settings("microsoft/Phi-3.5-vision-instruct") == PromptSettings()


def test_a_broken_settings_file_is_a_user_error(tmp_path):
    (tmp_path / SETTINGS_FILE).write_text('{"prompt": "x", "crops": 3}')
    with pytest.raises(UserError, match=SETTINGS_FILE):
        load_prompt_settings(tmp_path)


def test_from_config_and_the_prompts():
    cfg = load_config(None, ["data.num_crops=3", "data.prompt=<|image_1|>{brand}"])
    settings = PromptSettings.from_config(cfg)
    assert settings == PromptSettings("<|image_1|>{brand}", DEFAULT_ANSWER, 3)
    assert settings.prompt_for({"brand": "Acme"}) == "<|image_1|>Acme"
    with pytest.raises(UserError, match="brand"):
        settings.photo_prompt()  # predict and the catalog endpoint have only the photo
    assert PromptSettings().photo_prompt() == DEFAULT_PROMPT


def test_render_names_the_missing_column():
    assert template_fields(DEFAULT_ANSWER) == ["title", "category3_code", "full_price"]
    with pytest.raises(UserError, match=r"data.answer template uses column\(s\) full_price.*a.jpg"):
        render(DEFAULT_ANSWER, {"file_name": "a.jpg", "title": "t", "category3_code": "C"}, "answer")
