"""The OpenAI chat-completions request and response shapes, and the mapping to Phi-3's chat format.

A message list becomes `<|user|>\\n<|image_1|>What is shown?<|end|><|assistant|>\\n`: each message is
`<|role|>\\n` + its parts in order (an image part becomes `<|image_k|>`, images numbered across the
whole conversation) + `<|end|>`, with no separators added, so an image followed by the training
prompt's text gives exactly the prompt the model was trained on.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from productvlm.serving.errors import APIError


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _has_payload(self):
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs 'text'")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an image_url part needs 'image_url'")
        return self


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields we honour; other OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)  # greedy by default (OpenAI's default is 1)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def logprobs_wanted(self) -> int | None:
        """What to ask the batcher for: None (no log-probabilities), else how many alternatives per token.
        As OpenAI: `top_logprobs` needs `logprobs: true`."""
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "invalid_request_error", "top_logprobs")
        if self.logprobs and self.stream:
            raise APIError(
                400, "logprobs are returned only without stream: true here", "unsupported_value", "logprobs"
            )
        return (self.top_logprobs or 0) if self.logprobs else None


def to_phi3_prompt(messages: list[Message]) -> tuple[str, list[str]]:
    """(prompt with <|image_k|> placeholders, image URLs in placeholder order)."""
    prompt, urls = [], []
    for i, m in enumerate(messages):
        parts = [m.content or ""] if not isinstance(m.content, list) else m.content
        body = []
        for part in parts:
            text = part if isinstance(part, str) else part.text
            if text is not None:
                if "<|image" in text:
                    raise APIError(
                        400, f"messages.{i}: text may not contain <|image...|> tokens", "invalid_prompt"
                    )
                body.append(text)
            else:
                urls.append(part.image_url.url)
                body.append(f"<|image_{len(urls)}|>")
        prompt.append(f"<|{m.role}|>\n{''.join(body)}<|end|>")
    return "".join(prompt) + "<|assistant|>\n", urls


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": float(logprob), "bytes": list(text.encode("utf-8"))}


def _alone(tokenizer) -> Callable[[int], str]:
    """token id -> its text as it reads after other text (decoded after an anchor token, which keeps the
    leading space a lone decode would strip), remembered for the rest of the answer."""
    anchor = tokenizer("a", add_special_tokens=False).input_ids[-1]
    head = len(tokenizer.decode([anchor]))
    seen: dict[int, str] = {}

    def text(token_id: int) -> str:
        if token_id not in seen:
            seen[token_id] = tokenizer.decode([anchor, int(token_id)])[head:]
        return seen[token_id]

    return text


def choice_logprobs(tokenizer, tokens: list[int], logprobs: list[float], top: list) -> dict:
    """A choice's `logprobs` as OpenAI's chat API gives it: `content`, one entry per generated token, whose
    texts put together are the answer (each is what the token adds to the decoded text)."""
    from productvlm.inference.generate import token_ends

    ends = token_ends(tokenizer, tokens)
    text, alone = tokenizer.decode(tokens, skip_special_tokens=True), _alone(tokenizer)
    content = []
    for k, (logprob, alternatives) in enumerate(zip(logprobs, top)):
        entry = _entry(text[ends[k - 1] if k else 0 : ends[k]], logprob)
        entry["top_logprobs"] = [_entry(alone(i), lp) for i, lp in alternatives]
        content.append(entry)
    return {"content": content, "refusal": None}


def catalog_body(done, tokenizer, calibration, thresholds: dict[str, float] | None = None) -> dict:
    """`/v1/catalog`'s answer for a Completion generated with log-probabilities: the parsed fields, the
    per-field confidence (calibrated when the model has a calibration.json) and `needs_review`."""
    from productvlm.inference.generate import token_ends
    from productvlm.prompting.confidence import field_scores, needs_review, review_thresholds
    from productvlm.prompting.parse import parse_answer

    answer = parse_answer(done.text)
    scores = field_scores(done.text, done.logprobs or [], token_ends(tokenizer, done.tokens))
    confidence = calibration(scores) if calibration else scores
    thresholds = thresholds or review_thresholds(calibration, None, None)
    return {
        "title": answer.title,
        "category": answer.category,
        "price": answer.price,
        "raw": done.text,
        "confidence": {f: round(c, 4) for f, c in confidence.items()},
        "calibrated": calibration is not None,
        "needs_review": needs_review(confidence, thresholds),
    }


def completion_body(
    cid: str, model: str, text: str, finish: str, usage_: dict, logprobs: dict | None = None
) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": logprobs,
            }
        ],
        "usage": usage_,
    }


def chunk_event(
    cid: str, model: str, delta: dict | None, finish: str | None = None, usage_: dict | None = None
) -> str:
    """One SSE event (`data: {...}\\n\\n`) in OpenAI's chat.completion.chunk shape."""
    choices = (
        [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    )
    body = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage_ is not None:
        body["usage"] = usage_
    return f"data: {json.dumps(body)}\n\n"
