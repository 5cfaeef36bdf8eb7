"""The HTTP API: the FastAPI app around a loaded model, made of the routers of the serving package.

`create_app(model, processor, trained, settings)` builds it around a loaded model and its prompt settings;
`app_from_folder(model_dir, settings)` loads any folder `load_pretrained` reads first. The routes:
openai_routes.py (`/v1/models`, `/v1/chat/completions`), catalog_routes.py (`/v1/catalog`), page.py (`/`),
health_routes.py (`/health`, `/metrics`); what they share is model_server.py's `ModelServer`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI

from productvlm.prompting.settings import PromptSettings
from productvlm.serving import catalog_routes, health_routes, openai_routes, page
from productvlm.serving.auth import APIKeyMiddleware
from productvlm.serving.errors import install_error_handlers
from productvlm.serving.images import is_public
from productvlm.serving.metrics import MetricsMiddleware
from productvlm.serving.middleware import BodyLimitMiddleware
from productvlm.serving.model_server import ModelServer, ServeSettings

ROUTERS = (page.router, health_routes.router, openai_routes.router, catalog_routes.router)


def create_app(
    model,
    processor,
    trained: PromptSettings,
    settings: ServeSettings | None = None,
    address_allowed: Callable[[str], bool] = is_public,
    model_info: dict | None = None,
    calibration=None,
) -> FastAPI:
    """The app around a loaded model. `trained` = load_prompt_settings(model_dir) (prompt, num_crops).
    `model_info` = models.eval_records.model_summary(model_dir) (last evaluation, currency) for the page."""
    settings = settings or ServeSettings()
    server = ModelServer.around(
        model, processor, trained, settings, address_allowed, model_info=model_info, calibration=calibration
    )
    app = FastAPI(title="productvlm", lifespan=server.lifespan, docs_url=None, redoc_url=None)
    app.state.server, app.state.settings, app.state.batcher = server, settings, server.batcher
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    _add_middleware(app, server)
    return app


def _add_middleware(app: FastAPI, server: ModelServer) -> None:
    """Outermost last: the metrics count every answer, the API key is checked before the body limit."""
    app.add_middleware(BodyLimitMiddleware, max_bytes=server.settings.max_body_bytes)
    if server.settings.api_key:
        app.add_middleware(
            APIKeyMiddleware,
            api_key=server.settings.api_key,
            protect_metrics=server.settings.metrics_need_key,
        )
    app.add_middleware(MetricsMiddleware, metrics=server.metrics)


def app_from_folder(
    model_dir: str | Path, settings: ServeSettings | None = None, dtype="float32", device="cpu"
):
    from productvlm.models.eval_records import model_summary
    from productvlm.models.loading import load_pretrained, resolve_model_dir
    from productvlm.prompting.confidence import load_calibration
    from productvlm.prompting.settings import load_prompt_settings

    model, processor = load_pretrained(model_dir, dtype=dtype, device=device)
    where = resolve_model_dir(model_dir)
    info = model_summary(where) if isinstance(where, Path) else None
    calibration = load_calibration(where) if isinstance(where, Path) else None
    return create_app(
        model, processor, load_prompt_settings(where), settings, model_info=info, calibration=calibration
    )


__all__ = ["ServeSettings", "app_from_folder", "create_app"]
