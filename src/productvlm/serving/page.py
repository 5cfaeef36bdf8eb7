"""`GET /`: one self-contained page (no CDN, no build step): the model's name and held-out metrics, then
drop or choose one or several photos and see a table of photo + catalog entry (price with its currency,
the time each answer took). With `--api-key` the page asks for the key once and keeps it for the tab.

The page is static (`templates/serve.html`): everything it shows from the server (model name, currency,
the model's answers, error messages) is set with `textContent`, never parsed as HTML."""

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from productvlm.pages import template_text

PAGE = template_text("serve.html")

router = APIRouter()


@router.get("/", response_class=HTMLResponse)
async def page() -> str:
    return PAGE
