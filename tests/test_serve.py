"""The real server (uvicorn on 127.0.0.1) around the random tiny model, through the official openai
client and plain httpx: answers equal direct `model.generate`, streaming, batching, the catalog endpoint,
metrics, and every bad input answered with a 4xx OpenAI-style error while the server keeps serving."""

from __future__ import annotations

import asyncio
import io

import httpx
import pytest
import torch
from PIL import Image

from productvlm.models.loading import load_pretrained
from productvlm.prompting.parse import parse_answer
from productvlm.prompting.settings import load_prompt_settings
from productvlm.serving.app import ServeSettings, create_app
from productvlm.serving.chat import Message, to_phi3_prompt
from productvlm.serving.images import ImageLimits
from serve_helpers import data_url, image_message, png, product_jpeg, running_server

LIMITS = dict(
    max_body_bytes=2 * 1024 * 1024,
    max_images=2,
    max_tokens_limit=64,
    catalog_max_tokens=12,
    batch_wait_ms=30,
    images=ImageLimits(max_pixels=1_000_000),
)
PROMPT_TEXT = "What is shown in this image?"


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    model, processor = load_pretrained(tiny_model_dir)
    return model, processor, load_prompt_settings(tiny_model_dir)


@pytest.fixture(scope="module")
def server(loaded):
    model, processor, trained = loaded
    app = create_app(model, processor, trained, ServeSettings(model_name="tiny", **LIMITS))
    with running_server(app) as url:
        yield url


def reference_answer(loaded, prompt: str, jpegs: list[bytes], max_new_tokens: int) -> str:
    """What the model says to `prompt` alone, through the processor and generate directly."""

    model, processor, trained = loaded
    images = [Image.open(io.BytesIO(j)).convert("RGB") for j in jpegs]
    inputs = processor(prompt, images or None, num_crops=trained.num_crops)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def assert_error(r: httpx.Response, status: int, code: str | None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if code is not None:
        assert err["code"] == code, err


def test_messages_map_to_phi3_chat_format():
    messages = [
        Message(role="system", content="Be brief."),
        Message.model_validate(
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:a"}},
                    {"type": "text", "text": "Compare"},
                    {"type": "image_url", "image_url": {"url": "data:b"}},
                ],
            }
        ),
    ]
    prompt, urls = to_phi3_prompt(messages)
    assert (
        prompt == "<|system|>\nBe brief.<|end|><|user|>\n<|image_1|>Compare<|image_2|><|end|><|assistant|>\n"
    )
    assert urls == ["data:a", "data:b"]
    one = to_phi3_prompt([Message.model_validate(image_message("data:x", PROMPT_TEXT)[0])])[0]
    assert one == "<|user|>\n<|image_1|>What is shown in this image?<|end|><|assistant|>\n"


def test_openai_client_chat_and_stream(server, loaded):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    jpeg = product_jpeg(1)
    messages = image_message(data_url(jpeg), PROMPT_TEXT)
    prompt = f"<|user|>\n<|image_1|>{PROMPT_TEXT}<|end|><|assistant|>\n"
    expected = reference_answer(loaded, prompt, [jpeg], 10)

    resp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10)
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.content == expected
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert 0 < resp.usage.completion_tokens <= 10 and resp.usage.prompt_tokens > 16

    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [resp.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == resp.usage.completion_tokens

    with httpx.stream(
        "POST", f"{server}/v1/chat/completions", json={"messages": messages, "max_tokens": 3, "stream": True}
    ) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_concurrent_requests_are_batched_and_answer_as_alone(server, loaded):
    """Six concurrent requests with different photos and max_tokens: each gets its solo answer."""
    jpegs = [product_jpeg(i) for i in range(6)]
    max_tokens = [3, 8, 5, 8, 1, 6]
    prompt = f"<|user|>\n<|image_1|>{PROMPT_TEXT}<|end|><|assistant|>\n"
    expected = [reference_answer(loaded, prompt, [j], n) for j, n in zip(jpegs, max_tokens)]
    before = _metric(server, "productvlm_batch_size_count")

    async def ask_all():
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:
            calls = [
                client.post(
                    "/v1/chat/completions",
                    json={"messages": image_message(data_url(j), PROMPT_TEXT), "max_tokens": n},
                )
                for j, n in zip(jpegs, max_tokens)
            ]
            return await asyncio.gather(*calls)

    responses = asyncio.run(ask_all())
    assert [r.status_code for r in responses] == [200] * 6
    assert [r.json()["choices"][0]["message"]["content"] for r in responses] == expected
    assert all(r.json()["usage"]["completion_tokens"] <= n for r, n in zip(responses, max_tokens))
    batches = _metric(server, "productvlm_batch_size_count") - before
    assert 1 <= batches < 6  # some requests shared a generate call


def test_catalog_endpoint(server, loaded):
    jpeg = product_jpeg(2)
    r = httpx.post(f"{server}/v1/catalog", files={"file": ("bag.jpg", jpeg, "image/jpeg")}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert {"title", "category", "price", "raw", "confidence", "needs_review"} <= set(body)
    assert body["raw"] == reference_answer(
        loaded, loaded[2].photo_prompt(), [jpeg], LIMITS["catalog_max_tokens"]
    )
    parsed = parse_answer(body["raw"])
    assert (body["title"], body["category"], body["price"]) == (parsed.title, parsed.category, parsed.price)


def test_health_models_and_metrics(server):
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    assert httpx.get(f"{server}/v1/models").json()["data"][0]["id"] == "tiny"
    before = _metric(server, 'productvlm_requests_total{endpoint="/v1/chat/completions",status="400"}')
    httpx.post(f"{server}/v1/chat/completions", json={"messages": []})
    text = httpx.get(f"{server}/metrics").text
    after = _metric(server, 'productvlm_requests_total{endpoint="/v1/chat/completions",status="400"}')
    assert after == before + 1
    for name in (
        "productvlm_request_seconds_bucket",
        "productvlm_batch_size_bucket",
        "productvlm_queue_depth",
    ):
        assert name in text


def _metric(server: str, name: str) -> float:
    for line in httpx.get(f"{server}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _chat(url: str, max_tokens: int = 2) -> dict:
    return {"messages": image_message(url), "max_tokens": max_tokens}


BAD_CHAT = {
    "malformed JSON": (b'{"messages": [', 400, "invalid_json"),
    "invalid base64": (_chat("data:image/jpeg;base64,@@not*base64@@"), 400, "invalid_base64"),
    "not an image": (_chat(data_url(b"just some text, not a picture", "image/png")), 400, "invalid_image"),
    "huge image": (_chat(data_url(png(1100, 1000), "image/png")), 400, "image_too_large"),
    "too many images": (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": data_url(png(20, 20))}}] * 3,
                }
            ]
        },
        400,
        "too_many_images",
    ),
    "max_tokens over the limit": (_chat(data_url(png(20, 20)), max_tokens=65), 400, "max_tokens_too_large"),
    "remote URL not allowed": (_chat("https://example.com/bag.jpg"), 400, "remote_images_disabled"),
    "file URL": (_chat("file:///etc/passwd"), 400, "invalid_image_url"),
    "no messages": ({"messages": []}, 400, "invalid_value"),
    "unknown part type": (
        {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]},
        400,
        "invalid_value",
    ),
    "image token in text": (
        {"messages": [{"role": "user", "content": "hi <|image_1|>"}]},
        400,
        "invalid_prompt",
    ),
    "n > 1": ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "unsupported_value"),
}


@pytest.mark.parametrize("case", list(BAD_CHAT))
def test_bad_chat_requests_get_4xx_json_errors(server, case):
    body, status, code = BAD_CHAT[case]
    if isinstance(body, bytes):
        r = httpx.post(
            f"{server}/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
    else:
        r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=30)
    assert_error(r, status, code)
    assert httpx.get(f"{server}/health").status_code == 200


def test_oversized_bodies_get_413(server):
    big = {"messages": image_message(data_url(b"\0" * (3 * 1024 * 1024)))}
    assert_error(httpx.post(f"{server}/v1/chat/completions", json=big, timeout=30), 413, "body_too_large")

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        for _ in range(40):
            yield b"x" * 100_000

    r = httpx.post(
        f"{server}/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_error(r, 413, "body_too_large")
    assert httpx.get(f"{server}/health").status_code == 200


def test_bad_catalog_uploads(server):
    url = f"{server}/v1/catalog"
    assert_error(
        httpx.post(url, files={"file": ("a.jpg", b"not an image", "image/jpeg")}), 400, "invalid_image"
    )
    assert_error(
        httpx.post(url, files={"file": ("a.png", png(1100, 1000), "image/png")}), 400, "image_too_large"
    )
    assert_error(
        httpx.post(url, files={"other": ("a.jpg", product_jpeg(0), "image/jpeg")}), 400, "invalid_value"
    )
    assert_error(httpx.post(url, content=b"raw bytes"), 400, None)
    assert_error(httpx.get(f"{server}/nope"), 404, None)
    assert httpx.get(f"{server}/health").status_code == 200


def test_remote_urls_to_private_addresses_are_refused(loaded):
    model, processor, trained = loaded
    app = create_app(model, processor, trained, ServeSettings(allow_remote_images=True))
    with running_server(app) as server:
        port = server.rsplit(":", 1)[1]
        for target in (
            f"http://127.0.0.1:{port}/health",
            f"http://localhost:{port}/health",
            "http://[::1]/a.jpg",
            "http://169.254.169.254/latest/meta-data",
            "http://10.1.2.3/a.jpg",
            "http://192.168.0.1/a.jpg",
            "http://[::ffff:127.0.0.1]/a.jpg",
            f"http://0x7f000001:{port}/health",  # 127.0.0.1 in hex: getaddrinfo resolves it, the resolver refuses
        ):
            r = httpx.post(f"{server}/v1/chat/completions", json=_chat(target), timeout=30)
            assert_error(r, 400, "image_url_not_allowed")
        assert httpx.get(f"{server}/health").status_code == 200


def test_every_redirect_hop_is_checked():
    """With 127.0.0.2 standing in for the one public address: the image loads through a redirect;
    redirects to a literal loopback IP, to a name that resolves to loopback (caught in the resolver)
    or to a file: URL are refused before any connection is made to them."""
    from aiohttp import web

    from productvlm.serving.errors import APIError
    from productvlm.serving.images import RemoteFetcher

    jpeg = product_jpeg(3)

    async def scenario():
        targets = {
            "to-self": "/img.jpg",
            "to-loopback": "http://127.0.0.1:{port}/img.jpg",
            "to-localhost": "http://localhost:{port}/img.jpg",
            "to-file": "file:///etc/passwd",
        }

        async def image(request):
            return web.Response(body=jpeg, content_type="image/jpeg")

        async def redirect(request):
            target = targets[request.match_info["name"]].format(port=request.url.port)
            raise web.HTTPFound(target)

        app = web.Application()
        app.router.add_get("/img.jpg", image)
        app.router.add_get("/{name}", redirect)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.2", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        fetcher = RemoteFetcher(ImageLimits(), allowed=lambda ip: ip == "127.0.0.2")
        codes = {}
        try:
            im = await fetcher.fetch(f"http://127.0.0.2:{port}/to-self", "image 1")
            codes["ok"] = im.size
            for path in ("to-loopback", "to-localhost", "to-file"):
                try:
                    await fetcher.fetch(f"http://127.0.0.2:{port}/{path}", "image 1")
                except APIError as e:
                    codes[path] = e.code
        finally:
            await fetcher.close()
            await runner.cleanup()
        return codes

    codes = asyncio.run(scenario())
    assert codes["ok"] == Image.open(io.BytesIO(jpeg)).size
    assert codes["to-loopback"] == "image_url_not_allowed"
    assert codes["to-localhost"] == "image_url_not_allowed"
    assert codes["to-file"] == "invalid_image_url"


def test_full_queue_answers_503_and_nothing_is_lost(loaded):
    model, processor, trained = loaded
    settings = ServeSettings(max_queue=2, max_batch_size=1, batch_wait_ms=0)
    app = create_app(model, processor, trained, settings)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40}

    async def burst(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*[client.post("/v1/chat/completions", json=body) for _ in range(12)])

    with running_server(app) as url:
        responses = asyncio.run(burst(url))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses
        for r in responses:
            if r.status_code == 503:
                assert_error(r, 503, "queue_full")
            else:
                assert r.json()["choices"][0]["message"]["content"] is not None
        assert httpx.get(f"{url}/health").status_code == 200
        text = httpx.get(f"{url}/metrics").text
    assert 'productvlm_batch_size_bucket{le="1.0"} ' in text
    ones = [line for line in text.splitlines() if line.startswith('productvlm_batch_size_bucket{le="1.0"}')]
    count = [line for line in text.splitlines() if line.startswith("productvlm_batch_size_count")]
    assert ones[0].split()[-1] == count[0].split()[-1]  # --no-batching: every batch had one request


def test_data_url_needs_base64():
    from productvlm.serving.errors import APIError
    from productvlm.serving.images import decode_data_url

    with pytest.raises(APIError) as e:
        decode_data_url("data:image/png,rawbytes", ImageLimits(), "image 1")
    assert e.value.code == "invalid_image_url"
    ok = decode_data_url(data_url(png(30, 20)), ImageLimits(), "image 1")
    assert ok.size == (30, 20) and ok.mode == "RGB"
