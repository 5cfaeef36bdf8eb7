"""`Predictor`: a loaded model with the prompt settings it was trained with, answering catalog rows."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from productvlm.data.progress import progress_bar
from productvlm.inference.device import pick_device, pick_dtype
from productvlm.inference.generate import Generated, generate_answers, generate_batch
from productvlm.inference.inputs import Prepared
from productvlm.models.loading import load_pretrained, resolve_model_dir
from productvlm.prompting.confidence import Calibration, field_correct, field_scores, load_calibration
from productvlm.prompting.constrained import AnswerConstraint, known_choices
from productvlm.prompting.settings import load_prompt_settings


class Predictor:
    """A model folder (full, adapter or run folder) loaded with its prompt settings (`settings`)."""

    def __init__(
        self,
        model_path: str | Path,
        num_crops: int | None = None,
        device: str = "auto",
        dtype: str = "auto",
        max_new_tokens: int = 64,
        compiled: bool | None = None,
    ):
        self.model_dir = resolve_model_dir(model_path)
        self.settings = load_prompt_settings(self.model_dir)
        if num_crops is not None:
            self.settings = dataclasses.replace(self.settings, num_crops=num_crops)
        device = pick_device(device)
        self.model, self.processor = load_pretrained(self.model_dir, pick_dtype(dtype, device), device)
        self.max_new_tokens, self.compiled = max_new_tokens, compiled
        self.constraint: AnswerConstraint | None = None
        self.calibration: Calibration | None = (
            load_calibration(self.model_dir) if isinstance(self.model_dir, Path) else None
        )

    @property
    def num_crops(self) -> int:
        return self.settings.num_crops

    def constrain(self, train_rows: Sequence[dict[str, Any]]) -> None:
        """Restrict decoding to the answer template, with the categories seen in `train_rows`."""
        eos = self.model.generation_config.eos_token_id
        self.constraint = AnswerConstraint(
            self.processor.tokenizer,
            self.settings.answer,
            known_choices(self.settings.answer, train_rows),
            eos if isinstance(eos, list) else [eos],
            self.max_new_tokens,
        )

    def answers(
        self,
        rows: Sequence[dict[str, Any]],
        batch_size: int = 8,
        progress: bool = True,
        what: str = "generating",
        with_logprobs: bool = False,
    ) -> list[str] | list[Generated]:
        """Raw answers, one per row (`image_path` is required; template columns when the prompt uses them);
        with `with_logprobs`, each row's `Generated` (text, tokens, their log-probabilities)."""
        with progress_bar(what, len(rows), enabled=progress) as advance:
            return generate_answers(
                self.model,
                self.processor,
                self.settings,
                list(rows),
                self.max_new_tokens,
                batch_size,
                advance=advance,
                constraint=self.constraint,
                compiled=self.compiled,
                with_logprobs=with_logprobs,
            )

    def answer_prepared(self, prepared: Sequence[Prepared]) -> list[Generated]:
        """One batch of rows already made model inputs (`inputs.prepare`, with this predictor's prompt and
        num_crops): each row's answer, with token log-probabilities."""
        was_training = self.model.training
        self.model.eval()
        out = generate_batch(
            self.model, self.processor, prepared, self.max_new_tokens, self.constraint, self.compiled, True
        )
        self.model.train(was_training)
        return out

    def calibrate(
        self,
        rows: Sequence[dict[str, Any]],
        batch_size: int = 8,
        progress: bool = True,
        answers: Sequence[Generated] | None = None,
        **info: Any,
    ) -> Calibration:
        """Fit the per-field calibration on catalog rows with their truth (the validation split; their
        `answers` when already generated with log-probabilities), use it from now on and return it
        (`Calibration.save(model_dir)` keeps it beside the weights)."""
        if answers is None:
            answers = self.answers(rows, batch_size, progress, what="calibrating", with_logprobs=True)
        scores = [field_scores(a.text, a.logprobs, a.ends) for a in answers]
        correct = [field_correct(a.text, r) for a, r in zip(answers, rows)]
        self.calibration = Calibration.fit(scores, correct, constrained=self.constraint is not None, **info)
        return self.calibration

    def confidence(self, answer: Generated) -> dict[str, float]:
        """Per-field confidence of an answer generated with log-probabilities: calibrated when the
        model folder has a calibration.json (`productvlm eval` writes it), else the raw scores."""
        scores = field_scores(answer.text, answer.logprobs or [], answer.ends or [])
        return self.calibration(scores) if self.calibration else scores


__all__ = ["Predictor"]
