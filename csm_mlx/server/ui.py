"""The web page at / : plain HTML, CSS and JS modules from ui/, served as they are (no build step,
nothing fetched from the network). The page calls the same API as any client."""

from pathlib import Path
from typing import Dict, Tuple

from fastapi import FastAPI
from fastapi.responses import Response
from starlette.exceptions import HTTPException

UI_DIR = Path(__file__).parent / "ui"
UI_PREFIX = "/ui/"  # the page's own files, open without the API key as / is
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}


def ui_files() -> Dict[str, Tuple[bytes, str]]:
    """Every file the page is made of, read once: a request names one of these or gets a 404, so
    no request reaches the file system."""
    return {path.name: (path.read_bytes(), MEDIA_TYPES[path.suffix])
            for path in sorted(UI_DIR.iterdir()) if path.suffix in MEDIA_TYPES}


def add_ui(app: FastAPI) -> None:
    files = ui_files()
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

    def send(name: str) -> Response:
        if name not in files:
            raise HTTPException(404)
        content, media_type = files[name]
        return Response(content, media_type=media_type, headers=headers)

    @app.get("/", include_in_schema=False)
    async def page():
        return send("index.html")

    @app.get(UI_PREFIX + "{name}", include_in_schema=False)
    async def page_file(name: str):
        return send(name)
