"""The search server: a JSON API and one page over one or more indexes of the same images.

    python -m pipeline serve MANIFEST --index baseline --index mcip [--host 127.0.0.1] [--port 8000]

    GET  /                          the page (stages/index/page.py); GET /app.js its script
    GET  /api/indexes               {"indexes": [{name, kind, rows, dim, k, recall_at_k}, ...]}
    GET  /api/search?text=..&k=20 {"query", "seconds", "results": {index: [{key, score, url, caption, alt}]}}
    GET  /api/search?key=..&k=20    the same, by a picture of the collection (its stored vector)
    POST /api/search/image?k=20     the same, by the picture in the request body (raw bytes)
    GET  /api/texts?key=..&k=20     image -> text: the caption set's best captions (`texts: true`)
    GET  /api/picture/{key}         the picture, read from its tar at the offset its key recorded

Every index answers each query, so the page shows the result lists side by side. Bounds: k <=
`max_k`, text <= MAX_TEXT_CHARS, an upload <= `max_upload_bytes` (read in chunks; the connection's
body is never read past the bound) and <= `max_pixels` by its header (the download stage's check).
A bad request is a 4xx with `{"error": "<one line>"}`; an unexpected failure is a 500 with one line
(the traceback goes to the server's log only). FastAPI runs the synchronous handlers in a thread
pool, so queries run concurrently (stages/index/search.py says why that is safe). Needs fastapi and
uvicorn (`pip install -e '.[serve]'`).
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time
import logging
import threading
import time
from contextlib import contextmanager

from stages.errors import StageConfigError
from stages.index.page import HTML, SCRIPT
from stages.index.search import QueryError, SearchIndex

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 1000
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'unsafe-inline'; "
    "script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _fastapi():
    try:
        import fastapi
        import uvicorn
    except ImportError:
        raise StageConfigError("serve needs fastapi and uvicorn: pip install -e '.[serve]'") from None
    return fastapi, uvicorn


def make_app(
    indexes: dict[str, SearchIndex],
    max_k: int = 100,
    max_upload_bytes: int = 8 << 20,
    max_pixels: float = 4.0e7,
):
    """The FastAPI application over `indexes` (name -> opened index)."""
    fastapi, _ = _fastapi()
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    app = fastapi.FastAPI(title="MCIP search", docs_url=None, redoc_url=None, openapi_url=None)

    def fail(status: int, reason: str):
        return JSONResponse({"error": " ".join(str(reason).split())[:300]}, status, headers=SECURITY_HEADERS)

    @app.exception_handler(QueryError)
    async def _query_error(request, err):
        return fail(404 if str(err).startswith("no picture with key") else 400, str(err))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, err):
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return fail(422, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(HTTPException)
    async def _http(request, err):
        return fail(err.status_code, err.detail)

    @app.exception_handler(Exception)
    async def _unexpected(request, err):
        log.exception("search server: %s %s failed", request.method, request.url.path)
        return fail(500, f"internal error ({type(err).__name__}); see the server's log")

    def check_k(k: int) -> int:
        if not 1 <= k <= max_k:
            raise QueryError(f"k must be between 1 and {max_k}, got {k}")
        return k

    def everywhere(query) -> dict:
        started = time.perf_counter()
        results = {name: [hit.to_dict() for hit in query(index)] for name, index in indexes.items()}
        return {"results": results, "seconds": time.perf_counter() - started}

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse(HTML, headers=SECURITY_HEADERS)

    @app.get("/app.js")
    def script():
        return Response(SCRIPT, media_type="text/javascript", headers=SECURITY_HEADERS)

    @app.get("/api/indexes")
    def list_indexes():
        fields = ("kind", "rows", "dim", "k", "recall_at_k")
        return {"indexes": [{"name": n, **{f: i.card[f] for f in fields}} for n, i in indexes.items()]}

    @app.get("/api/search")
    def search(text: str | None = None, key: str | None = None, k: int = 20):
        check_k(k)
        if (text is None) == (key is None):
            raise QueryError("give exactly one of text= or key=")
        if text is not None:
            if len(text) > MAX_TEXT_CHARS:
                raise QueryError(f"text is longer than {MAX_TEXT_CHARS} characters")
            return {"query": {"text": text}, **everywhere(lambda index: index.by_text(text, k))}
        return {"query": {"key": key}, **everywhere(lambda index: index.by_key(key, k))}

    @app.post("/api/search/image")
    async def search_image(request: fastapi.Request, k: int = 20):
        check_k(k)
        data = await _bounded_body(request, max_upload_bytes)
        return {
            "query": {"image_bytes": len(data)},
            **await run_in_threadpool(everywhere, lambda index: index.by_image(data, k, max_pixels)),
        }

    @app.get("/api/texts")
    def texts(key: str, k: int = 20):
        """Image -> text: each index's best captions of the caption set for a picture (`texts: true`)."""
        check_k(k)
        return {
            "query": {"key": key},
            "results": {n: i.texts_for_image(None, key, k, max_pixels) for n, i in indexes.items()},
        }

    @app.get("/api/picture/{key}")
    def picture(key: str):
        first = next(iter(indexes.values()))
        return Response(first.picture(key), media_type="image/jpeg", headers=SECURITY_HEADERS)

    return app


async def _bounded_body(request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is longer than `limit` bytes."""
    from starlette.exceptions import HTTPException

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"upload of {declared} bytes is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"upload is larger than {limit} bytes")
        chunks.append(chunk)
    if not size:
        raise QueryError("empty upload: send the picture's bytes as the request body")
    return b"".join(chunks)


@contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0):
    """uvicorn serving `app` in a thread; yields the base URL (the real port when `port` is 0)."""
    _, uvicorn = _fastapi()
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="search-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise StageConfigError(f"cannot serve on {host}:{port} (in use, or not an address of this host)")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
