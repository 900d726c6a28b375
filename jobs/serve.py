"""`vidkd serve`: video indexes searched by text over HTTP, as a Ray Serve application.

    vidkd serve runs/demo/index --port 8000          # http://127.0.0.1:8000/

One application, two kinds of deployment:
- `TextEncoder`, one per index: that index's own student (the copy in its `model/`), encoding
  queries in batches (`@serve.batch`: requests that arrive together share one forward);
- `SearchApi`, the HTTP ingress (FastAPI): the indexes' embeddings in memory, cosine search
  (`core.index.VideoIndex`: exact, or through its HNSW graph for a large index), thumbnails of the
  hits' middle frames, and a search page.

Routes: `GET /search?q=...&k=5[&index=NAME]` (JSON: ids, scores, paths), `GET /` (the page; with
`?q=` it searches on load, so a search has a URL), `GET /thumbnail/{index}/{video_id}` (JPEG),
`GET /healthz`. A bad request gets a 4xx and `{"error": "<one line>"}`, never a traceback.
"""

from __future__ import annotations

import asyncio
import functools
import html
import io
import logging
import os
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from core.config import RayConfig
from core.index import VideoIndex, read_meta

APP_NAME = "vidkd-search"
MAX_K = 100
MAX_QUERY_CHARS = 500
BATCH_SIZE = 32  # queries per text forward at most
BATCH_WAIT_S = 0.005  # how long a query waits for others to share its forward
THUMBNAIL_PX = 160
MAX_ONGOING = 256  # requests one ingress replica takes at once; the text encoder batches what arrives together
THUMBNAILS_KEPT = 512


class BadRequest(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def refusing(route: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A route whose BadRequest becomes its 4xx answer, `{"error": reason}`. (FastAPI's exception
    handlers do not reach the routes of a Serve deployment class: the exception would travel back
    through Ray as a 500.)"""

    @functools.wraps(route)
    async def answer(*args: Any, **kwargs: Any) -> Any:
        try:
            return await route(*args, **kwargs)
        except BadRequest as error:
            return JSONResponse({"error": error.reason}, status_code=error.status)

    return answer


@dataclass(frozen=True)
class ServedIndex:
    """An index to serve: the name requests use (`index=`) and its directory."""

    name: str
    directory: Path

    @classmethod
    def from_dirs(cls, dirs: list[Path]) -> list["ServedIndex"]:
        """Named by their directory names (`runs/demo/index` is `index`); every directory is
        checked here, before anything starts, and a clash of names is an error."""
        served: list[ServedIndex] = []
        for directory in dirs:
            read_meta(directory)  # FileNotFoundError with what to do, for a directory that is no index
            name = directory.resolve().name
            if any(s.name == name for s in served):
                raise ValueError(f"two indexes named {name!r}: serve indexes whose directory names differ")
            served.append(cls(name, directory.resolve()))
        if not served:
            raise ValueError("give at least one index directory")
        return served


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=4 * BATCH_SIZE)
class TextEncoder:
    """One index's student, encoding text queries in batches."""

    def __init__(self, model_path: str, kernel: str, threads: int = 1):
        import torch

        from core.student import load_student_model
        from jobs.runtime import import_quant_backend

        torch.set_num_threads(threads)
        if Path(model_path).is_dir():  # an INT4 student: gptqmodel's import banner only at --verbose
            import_quant_backend()
        self.student = load_student_model(model_path, kernel=kernel)

    @serve.batch(max_batch_size=BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def __call__(self, queries: list[str]) -> list[np.ndarray]:
        import torch

        with torch.no_grad():
            return list(self.student.encode_text(queries).float().numpy())


api = FastAPI(title="vidkd search")


def parse_query(q: str | None, k: str | None) -> tuple[str, int]:
    """The query and k of a request, or the one-line reason they are refused (400)."""
    query = (q or "").strip()
    if not query:
        raise BadRequest(400, "the query is empty: give q=<words>")
    if len(query) > MAX_QUERY_CHARS:
        raise BadRequest(400, f"the query is {len(query)} characters long; at most {MAX_QUERY_CHARS}")
    try:
        top = int(k) if k not in (None, "") else 5
    except ValueError:
        raise BadRequest(400, f"k must be a whole number, got {k!r}") from None
    if not 1 <= top <= MAX_K:
        raise BadRequest(400, f"k must be between 1 and {MAX_K}, got {top}")
    return query, top


# Above the ingress class: serve.ingress captures the module's names when the class is defined.
def middle_frame_jpeg(path: str) -> bytes | None:
    """A video's middle frame (the contact sheet's, `jobs.plots.middle_frame`) as JPEG, or None
    when it cannot be decoded."""
    from PIL import Image

    from jobs.plots import middle_frame

    frame = middle_frame(path, THUMBNAIL_PX)
    if frame is None:
        return None
    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="JPEG", quality=85)
    return out.getvalue()


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>vidkd search</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
#hits {{ display: flex; flex-wrap: wrap; gap: 1em; margin-top: 1em; }}
figure {{ margin: 0; width: 170px; font-size: 12px; }}
figure img {{ width: 160px; height: 160px; object-fit: cover; background: #eee; }}
#error {{ color: #b00; }}
</style></head>
<body>
<h1>vidkd search</h1>
<form id="search" method="get" action="/">
  <input id="q" name="q" size="50" placeholder="a red car turning left at night" value="{query}" autofocus>
  <input id="k" name="k" type="number" min="1" max="{max_k}" value="8">
  <select name="index">{options}</select>
  <button type="submit">Search</button>
</form>
<p id="error"></p>
<div id="hits"></div>
<script>
const params = new URLSearchParams(window.location.search);
async function run() {{
  if (!params.get("q")) return;
  const response = await fetch("/search?" + params.toString());
  const body = await response.json();
  if (!response.ok) {{ document.getElementById("error").textContent = body.error; return; }}
  const hits = document.getElementById("hits");
  for (const hit of body.hits) {{
    const figure = document.createElement("figure");
    figure.className = "hit";
    const img = document.createElement("img");
    img.alt = hit.video_id;
    img.onload = () => {{ img.dataset.loaded = img.naturalWidth + "x" + img.naturalHeight; }};
    img.src = hit.thumbnail;
    const caption = document.createElement("figcaption");
    caption.textContent = hit.rank + ". " + hit.video_id + " (" + hit.score.toFixed(3) + ")";
    figure.append(img, caption);
    hits.append(figure);
  }}
  document.body.dataset.hits = body.hits.length;
}}
run();
</script>
</body></html>
"""


def search_page(names: list[str], selected: str, query: str) -> str:
    options = "".join(f'<option value="{html.escape(n)}"{" selected" if n == selected else ""}>{html.escape(n)}</option>'
                      for n in names)
    return PAGE.format(query=html.escape(query), options=options, max_k=MAX_K)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=MAX_ONGOING)
@serve.ingress(api)
class SearchApi:
    """The HTTP ingress: the indexes in memory, a text encoder handle for each."""

    def __init__(self, indexes: list[ServedIndex], encoders: dict[str, Any]):
        self.indexes = {s.name: VideoIndex.load(s.directory) for s in indexes}
        self.rows = {name: {vid: row for row, vid in enumerate(index.ids)} for name, index in self.indexes.items()}
        self.default = indexes[0].name
        self.encoders = encoders
        self.thumbnails: OrderedDict[tuple[str, str], bytes | None] = OrderedDict()

    def _index(self, name: str | None) -> tuple[str, VideoIndex]:
        name = name or self.default
        if name not in self.indexes:
            raise BadRequest(404, f"unknown index {name!r}: this server has {', '.join(sorted(self.indexes))}")
        return name, self.indexes[name]

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "indexes": {name: len(index.ids) for name, index in self.indexes.items()}}

    @api.get("/search")
    @refusing
    async def search(self, q: str | None = None, k: str | None = None, index: str | None = None) -> dict:
        query, top = parse_query(q, k)
        name, video_index = self._index(index)
        embedding = await self.encoders[name].remote(query)
        hits = await asyncio.to_thread(video_index.search, embedding, top)  # exact over a large index: milliseconds
        return {"query": query, "index": name, "k": top, "model": video_index.meta.model,
                "hits": [{"rank": h.rank, "video_id": h.video_id, "score": round(h.score, 6), "path": h.path,
                          "thumbnail": f"/thumbnail/{name}/{h.video_id}"} for h in hits]}

    @api.get("/thumbnail/{index}/{video_id}")
    @refusing
    async def thumbnail(self, index: str, video_id: str) -> Response:
        name, video_index = self._index(index)
        row = self.rows[name].get(video_id)
        if row is None:
            raise BadRequest(404, f"no video {video_id!r} in index {name!r}")
        key = (name, video_id)
        if key not in self.thumbnails:
            path = video_index.paths[row]
            self.thumbnails[key] = await asyncio.to_thread(middle_frame_jpeg, path)  # decoding: off the event loop
            while len(self.thumbnails) > THUMBNAILS_KEPT:
                self.thumbnails.popitem(last=False)
        self.thumbnails.move_to_end(key)
        jpeg = self.thumbnails[key]
        if jpeg is None:
            raise BadRequest(404, f"video {video_id!r} cannot be decoded any more (moved or changed since indexing?)")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @api.get("/", response_class=HTMLResponse)
    async def page(self, q: str | None = None, index: str | None = None) -> HTMLResponse:
        return HTMLResponse(search_page(sorted(self.indexes), index or self.default, q or ""))


def build_app(indexes: list[ServedIndex], kernel: str = "auto", replicas: int = 1) -> Any:
    """The application: a text encoder per index (`replicas` each) and the ingress."""
    encoders = {s.name: TextEncoder.options(name=f"text-{s.name}", num_replicas=replicas).bind(
                    str(s.directory / read_meta(s.directory).model_path), kernel)
                for s in indexes}
    return SearchApi.bind(indexes, encoders)


def check_port(host: str, port: int) -> None:
    """A port another process holds is a one-line error before Ray starts."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ValueError(f"cannot listen on {host}:{port} ({error.strerror}): choose another --port") from None


def start(indexes: list[ServedIndex], host: str = "127.0.0.1", port: int = 8000, kernel: str = "auto",
          replicas: int = 1) -> str:
    """Run the application on the Ray instance this driver is connected to; its URL."""
    from jobs.runtime import log_level

    # Serve's own INFO lines (replicas starting, endpoints) only at --verbose, and no access-log line
    # per request on the driver's console (hundreds a second under load)
    logs = {"log_level": logging.getLevelName(log_level()), "enable_access_log": False}
    logging.getLogger("ray.serve").setLevel(log_level())  # this driver's "Started Serve", "is ready"
    serve.start(http_options={"host": host, "port": port}, logging_config=logs)
    serve.run(build_app(indexes, kernel, replicas), name=APP_NAME, route_prefix="/", logging_config=logs)
    return f"http://{host}:{port}/"


def serve_until_stopped(indexes: list[ServedIndex], ray_cfg: RayConfig, host: str, port: int, kernel: str,
                        replicas: int, ready: Callable[[str], None]) -> None:
    """`vidkd serve` on the Ray instance `ray_cfg` named (joined or started): run the application,
    call `ready(url)`, and serve until interrupted (Ctrl-C, or SIGTERM made SystemExit); then
    remove the application from a cluster that outlives this command."""
    joined = bool(ray_cfg.address or os.environ.get("RAY_ADDRESS"))
    try:
        ready(start(indexes, host, port, kernel, replicas))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if joined:
            stop()


def stop() -> None:
    """Remove the application from the cluster this driver joined. (Serve's controller and proxies
    stay, as other applications may use them. A local Ray instance this driver started ends with
    it, Serve included: nothing to remove there.)"""
    serve.delete(APP_NAME)
