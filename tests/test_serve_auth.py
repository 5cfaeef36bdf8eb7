"""`--api-key`: /v1/* needs `Authorization: Bearer <key>` (compared with hmac.compare_digest) and answers
OpenAI's 401 error otherwise, before the body is read; /, /health stay open, /metrics as configured;
the official openai client works with `api_key=`; the CLI takes the key from PRODUCTVLM_API_KEY."""

from __future__ import annotations

import httpx
import pytest

from productvlm.models.loading import load_pretrained
from productvlm.prompting.settings import load_prompt_settings
from productvlm.serving import auth
from productvlm.serving.app import ServeSettings, create_app
from serve_helpers import data_url, image_message, product_jpeg, running_server

KEY = "pvlm-test-key-7f3a"
MODEL = "tiny"


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    model, processor = load_pretrained(tiny_model_dir)
    return model, processor, load_prompt_settings(tiny_model_dir)


def _server(loaded, **settings):
    model, processor, trained = loaded
    app = create_app(
        model, processor, trained, ServeSettings(model_name=MODEL, max_body_bytes=1 << 20, **settings)
    )
    return running_server(app)


@pytest.fixture(scope="module")
def server(loaded):
    with _server(loaded, api_key=KEY) as url:
        yield url


def _bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def assert_401(r: httpx.Response, says: str) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
    assert says in error["message"] and KEY not in error["message"]


def test_v1_needs_the_key(server):
    jpeg = product_jpeg(0)
    assert_401(httpx.get(f"{server}/v1/models"), "didn't provide an API key")
    assert_401(httpx.get(f"{server}/v1/models", headers=_bearer("wrong")), "Incorrect API key")
    assert_401(httpx.get(f"{server}/v1/models", headers=_bearer(KEY + "x")), "Incorrect API key")
    assert_401(httpx.get(f"{server}/v1/models", headers={"Authorization": f"Basic {KEY}"}), "didn't provide")
    assert_401(httpx.post(f"{server}/v1/catalog", files={"file": ("a.jpg", jpeg, "image/jpeg")}), "provide")
    chat = {"messages": image_message(data_url(jpeg)), "max_tokens": 2}
    assert_401(httpx.post(f"{server}/v1/chat/completions", json=chat), "provide")
    # refused before the body is read: a body over the limit still gets 401, not 413
    assert_401(httpx.post(f"{server}/v1/catalog", content=b"\0" * (2 << 20)), "provide")

    ok = httpx.get(f"{server}/v1/models", headers=_bearer(KEY))
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == MODEL
    lower = httpx.get(f"{server}/v1/models", headers={"authorization": f"bearer {KEY}"})
    assert lower.status_code == 200  # the scheme is case-insensitive, as RFC 7235 says
    r = httpx.post(
        f"{server}/v1/catalog",
        files={"file": ("a.jpg", jpeg, "image/jpeg")},
        headers=_bearer(KEY),
        timeout=60,
    )
    assert r.status_code == 200 and set(r.json()) >= {"title", "category", "price", "raw"}


def test_page_health_and_metrics_stay_open(server):
    assert httpx.get(f"{server}/").status_code == 200
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    before = _count_401(httpx.get(f"{server}/metrics").text)
    httpx.get(f"{server}/v1/models")
    assert _count_401(httpx.get(f"{server}/metrics").text) == before + 1  # refusals are counted


def _count_401(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith('productvlm_requests_total{endpoint="/v1/models",status="401"}'):
            return float(line.split()[-1])
    return 0.0


def test_metrics_can_need_the_key(loaded):
    with _server(loaded, api_key=KEY, metrics_need_key=True) as url:
        assert_401(httpx.get(f"{url}/metrics"), "provide")
        assert httpx.get(f"{url}/metrics", headers=_bearer(KEY)).status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200


def test_no_key_means_no_authentication(loaded):
    with _server(loaded) as url:
        assert httpx.get(f"{url}/v1/models").status_code == 200
        assert httpx.get(f"{url}/v1/models", headers=_bearer("anything")).status_code == 200


def test_openai_client_with_api_key(server):
    import openai

    messages = image_message(data_url(product_jpeg(1)))
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    assert resp.choices[0].message.content is not None and resp.usage.completion_tokens <= 3
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, stream=True)
    assert (
        "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        == resp.choices[0].message.content
    )

    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"


def test_the_key_is_compared_in_constant_time(server, monkeypatch):
    seen = []

    def spy(a, b):
        seen.append((a, b))
        return real(a, b)

    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert httpx.get(f"{server}/v1/models", headers=_bearer("guess")).status_code == 401
    assert httpx.get(f"{server}/v1/models", headers=_bearer(KEY)).status_code == 200
    assert seen == [(b"guess", KEY.encode()), (KEY.encode(), KEY.encode())]


def test_bearer_token_parsing():
    assert auth.bearer_token([(b"authorization", b"Bearer abc")]) == b"abc"
    assert auth.bearer_token([(b"Authorization", b"  BEARER   abc  ")]) == b"abc"
    assert auth.bearer_token([(b"authorization", b"Bearer ")]) is None
    assert auth.bearer_token([(b"authorization", b"Token abc")]) is None
    assert auth.bearer_token([(b"x-api-key", b"abc")]) is None
    assert auth.needs_key("/v1/models", False) and not auth.needs_key("/metrics", False)
    assert auth.needs_key("/metrics", True) and not auth.needs_key("/health", True)
    assert not auth.needs_key("/", True) and not auth.needs_key("/v1x", True)


def test_cli_takes_the_key_from_the_environment(tiny_model_dir, monkeypatch):
    import typer
    import uvicorn
    from typer.testing import CliRunner

    from productvlm.serving.cli import serve_command

    app = typer.Typer()
    app.command("serve")(serve_command)
    app.command("other")(lambda: None)
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: seen.update(app=app))
    runner = CliRunner()
    args = ["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32"]
    result = runner.invoke(app, args, env={auth.API_KEY_ENV: KEY})
    assert result.exit_code == 0, result.output
    settings = seen["app"].state.settings
    assert settings.api_key == KEY and not settings.metrics_need_key and KEY not in repr(settings)
    assert "API key required" in result.output and KEY not in result.output

    result = runner.invoke(
        app, [*args, "--api-key", "flag-key", "--metrics-need-key"], env={auth.API_KEY_ENV: ""}
    )
    assert result.exit_code == 0, result.output
    assert seen["app"].state.settings.api_key == "flag-key" and seen["app"].state.settings.metrics_need_key

    result = runner.invoke(app, [*args, "--metrics-need-key"], env={auth.API_KEY_ENV: ""})
    assert result.exit_code != 0 and "--api-key" in str(result.exception or result.output)
