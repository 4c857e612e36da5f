"""The Ray Serve application: an HTTP ingress (FastAPI) over a batching extraction deployment.

    POST /localize ──► Localizer (ingress replica; reserves ``replica_cpus``)
        auth (optional bearer token) ─ overload check (503 + Retry-After) ─ body read up to the limit
        (413 from Content-Length before any of it is read) ─ decode + resize to the store's size
        ──► QueryExtractor.extract (deployment; @serve.batch: concurrent requests, one forward pass;
            a GPU per replica where the cluster has one)
        ──► ServingState.answer: top-K on the pinned index, tokens through the chunk cache, rerank
    GET /state, /health, /positions, /thumbnail/{image_id}, / (the page), /docs (OpenAPI)

The ingress follows the published pointer (``state.StateFollower``); the extractor loads the
model of a new state before the ingress switches to it. Uploads are held in memory for the
request only: never written, never logged.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from ray import serve

from ..images import ImageReadError
from ..log import get_logger
from ..rerank.rerankers import RERANKERS
from . import TOKEN_ENV, ServeConfig
from .extractor import ExtractionModels, decode_query
from .page import PAGE
from .state import ModelKey, StateFollower

log = get_logger(__name__)


# ---------------------------------------------------------------- the answer, as OpenAPI documents it
class Candidate(BaseModel):
    rank: int
    image_id: int
    path: str
    utm_east: float | None
    utm_north: float | None
    global_score: float
    rerank_score: float | None


class Estimate(BaseModel):
    utm_east: float | None
    utm_north: float | None
    confidence: float | None
    confidence_kind: str  # inliers (ransac) | match_probability (r2former) | global_similarity (none)


class StateLabel(BaseModel):
    index_version: str | None
    store_generation: int | None


class LocalizeAnswer(BaseModel):
    candidates: list[Candidate]
    estimate: Estimate
    state: StateLabel
    timings: dict[str, float]


ERRORS = {400: {"description": "empty body, not an image, corrupt image, unknown reranker"},
          401: {"description": "a bearer token is required"}, 413: {"description": "body over the limit"},
          415: {"description": "not image/* or multipart/form-data"},
          503: {"description": "overloaded or not ready: retry after Retry-After seconds"}}

api = FastAPI(title="r2f localization service", version="1",
              description="Where was this photo taken? Top-K retrieval on the published index, reranked "
                          "(ransac | r2former | none), answered from one published state.")


def token_digest(token: str | None) -> str | None:
    """Replicas get the token's hash only: the token itself never enters Ray's config or logs."""
    return hashlib.sha256(token.encode()).hexdigest() if token else None


# ---------------------------------------------------------------- the extraction deployment
@serve.deployment(name="QueryExtractor")
class QueryExtractor:
    def __init__(self, device: str, threads: int | None, max_batch_size: int, batch_wait_s: float):
        self.models = ExtractionModels(device, threads)
        self.extract.set_max_batch_size(max_batch_size)
        self.extract.set_batch_wait_timeout_s(batch_wait_s)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="extract")  # the event loop keeps batching

    def load(self, key: ModelKey) -> None:
        self.models.load(key)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def extract(self, keys: list[ModelKey], pixels: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._run, keys, pixels)

    def _run(self, keys: list[ModelKey], pixels: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        out: list[Any] = [None] * len(keys)
        for key in dict.fromkeys(keys):  # one forward per model (a switch may mix two briefly)
            idx = [i for i, k in enumerate(keys) if k == key]
            desc, tokens = self.models.extract(key, np.stack([pixels[i] for i in idx]))
            for j, i in enumerate(idx):
                out[i] = (desc[j], tokens[j])
        return out


# ---------------------------------------------------------------- the ingress
def _thumbnail(path: str, side: int = 240) -> bytes:
    from PIL import Image

    from ..images import read_bytes

    data = read_bytes(path)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            im.thumbnail((side, side))
            out = io.BytesIO()
            im.save(out, format="JPEG", quality=85)
    except Exception as exc:
        raise ImageReadError("decode", f"{type(exc).__name__}: {exc}") from None
    return out.getvalue()


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """Never a 500: an unexpected failure is a 503 the client may retry; the log names the cause only."""
    log.warning("serve: %s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    return JSONResponse({"detail": f"could not answer ({type(exc).__name__}); retry later"}, status_code=503,
                        headers={"Retry-After": "1"})


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> HTTPException:
    return HTTPException(status_code=status, detail=message, headers=headers)


@serve.deployment(name="Localizer")
@serve.ingress(api)
class Localizer:
    async def __init__(self, settings: dict[str, Any], extractor, token_sha256: str | None = None):
        self.cfg = ServeConfig(**settings)
        self.extractor = extractor
        self.token_sha256 = token_sha256
        self.in_flight = 0
        self.pool = ThreadPoolExecutor(max(1, self.cfg.work_threads), thread_name_prefix="localize")
        self.follower = StateFollower(
            self.cfg.database_store, self.cfg.index_dir, self.cfg.backbone, self.cfg.checkpoint,
            poll_s=self.cfg.poll_s, keep_previous_s=self.cfg.keep_previous_s,
            lease_heartbeat_s=self.cfg.lease_heartbeat_s, cache_chunks=self.cfg.cache_chunks,
            use_gpu=self.cfg.use_gpu, ensure_model=self._ensure_model,
            job=f"serve-{socket.gethostname()}-{os.getpid()}")
        await asyncio.get_running_loop().run_in_executor(self.pool, self.follower.start)

    def _ensure_model(self, key: ModelKey) -> None:
        # Called from the follower's thread, never the event loop: blocking on the handle is allowed there.
        self.extractor.load.remote(key).result(timeout_s=self.cfg.request_timeout_s * 10)

    def check_health(self) -> None:
        if self.follower.current is None:
            raise RuntimeError("no published state loaded")

    def __del__(self) -> None:
        follower = getattr(self, "follower", None)
        if follower is not None:
            follower.stop()

    # ---------------------------------------------------------------- request checks
    def _authorize(self, request: Request) -> None:
        if not self.token_sha256:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token_digest(token.strip()) or "", self.token_sha256):
            raise _error(401, "a bearer token is required (Authorization: Bearer <token>)",
                         {"WWW-Authenticate": "Bearer"})

    async def _read_body(self, request: Request) -> bytes:
        limit = int(self.cfg.max_body_bytes)
        length = request.headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise _error(400, f"Content-Length {length!r} is not a number") from None
            if declared > limit:  # refused before a byte of the body is read
                raise _error(413, f"the body is {declared} bytes; the limit is {limit} bytes (--max-body-bytes)")
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise _error(413, f"the body is over the limit of {limit} bytes (--max-body-bytes)")
        return bytes(buf)

    async def _upload(self, request: Request) -> bytes:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not (ctype.startswith("image/") or ctype == "multipart/form-data"):
            raise _error(415, f"Content-Type {ctype or '(none)'} is not accepted: send the image as the body with "
                              f"Content-Type image/jpeg or image/png, or as multipart/form-data field 'image'")
        body = await self._read_body(request)
        if ctype == "multipart/form-data":
            body = await self._multipart_image(request, body)
        if not body:
            raise _error(400, "empty body: no image bytes were sent")
        return body

    @staticmethod
    async def _multipart_image(request: Request, body: bytes) -> bytes:
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.request", "body": b"", "more_body": False}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
        except Exception as exc:
            raise _error(400, f"unreadable multipart body: {exc}") from None
        field = form.get("image")
        if field is None or isinstance(field, str):
            raise _error(400, "the multipart body has no file field named 'image'")
        return await field.read()

    def _overloaded(self) -> HTTPException:
        return _error(503, f"overloaded: {self.in_flight} requests in progress (--max-queue "
                           f"{self.cfg.max_queue}); retry later", {"Retry-After": str(self.cfg.retry_after_s)})

    async def _work(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # ---------------------------------------------------------------- routes
    @api.post("/localize", response_model=LocalizeAnswer, responses=ERRORS,
              summary="Localize one photo (raw image body or multipart field 'image')")
    async def localize(self, request: Request,
                       candidates: int | None = Query(None, ge=1, description="top-K reranked (capped)"),
                       reranker: str | None = Query(None, description="auto | r2former | ransac | none")):
        self._authorize(request)
        if self.in_flight >= self.cfg.max_queue:
            raise self._overloaded()
        self.in_flight += 1
        try:
            return await self._localize(request, candidates, reranker)
        except HTTPException:
            raise
        except Exception as exc:  # never a 500: the client may retry; the log names the cause, not the upload
            log.warning("serve: /localize failed: %s: %s", type(exc).__name__, exc)
            raise _error(503, f"could not answer ({type(exc).__name__}); retry later",
                         {"Retry-After": str(self.cfg.retry_after_s)}) from None
        finally:
            self.in_flight -= 1

    async def _localize(self, request: Request, candidates: int | None, reranker: str | None) -> Response:
        t_all = time.perf_counter()
        name = reranker or self.cfg.reranker
        if name not in RERANKERS:
            raise _error(400, f"unknown reranker {name!r}; choose one of {', '.join(RERANKERS)}")
        asked = candidates or self.cfg.candidates
        k = min(asked, self.cfg.max_candidates)
        data = await self._upload(request)
        timings: dict[str, float] = {"read_ms": (time.perf_counter() - t_all) * 1e3}
        with self.follower.acquire() as st:
            try:
                name = await self._work(st.resolve_reranker, name)
            except ValueError as exc:
                raise _error(400, str(exc)) from None
            t = time.perf_counter()
            try:
                pixels = await self._work(decode_query, data, st.key)
            except ImageReadError as exc:
                raise _error(400, f"not a readable image: {exc.reason}") from None
            del data
            timings["decode_ms"] = (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            try:
                desc, tokens = await asyncio.wait_for(self.extractor.extract.remote(st.key, pixels),
                                                      self.cfg.request_timeout_s)
            except asyncio.TimeoutError:
                raise _error(503, f"extraction took over {self.cfg.request_timeout_s} s; retry later",
                             {"Retry-After": str(self.cfg.retry_after_s)}) from None
            timings["extract_ms"] = (time.perf_counter() - t) * 1e3
            answer = await self._work(st.answer, desc, tokens, k, name, timings)
        answer.pop("reranker", None)
        timings["total_ms"] = (time.perf_counter() - t_all) * 1e3
        answer["timings"] = {k_: round(v, 3) for k_, v in timings.items()}
        headers = {"X-Reranker": name}
        if k < asked:
            headers["X-Candidates-Capped"] = str(k)
        return JSONResponse(answer, headers=headers)

    @api.get("/health", summary="200 when a published state is loaded")
    async def health(self):
        cur = self.follower.current
        if cur is None:
            raise _error(503, "no published state loaded yet", {"Retry-After": str(self.cfg.retry_after_s)})
        return {"status": "ok", "state": cur.label}

    @api.get("/state", summary="the state answered from, the states held, the model and the settings")
    async def state(self, request: Request):
        self._authorize(request)
        f = self.follower
        cur = f.current
        if cur is None:
            raise _error(503, "no published state loaded yet", {"Retry-After": str(self.cfg.retry_after_s)})
        return {"state": cur.label, "store": cur.state.store, "index_dir": cur.state.index_dir,
                "num_images": cur.num_images, "model": cur.key.as_dict(),
                "held": [{**s.label, "in_flight": s.in_flight} for s in f.held()],
                "switches": f.switches, "last_switch": f.last_switch, "last_error": f.last_error,
                "settings": {k: v for k, v in asdict(self.cfg).items() if k in (
                    "reranker", "candidates", "max_candidates", "poll_s", "keep_previous_s", "max_body_bytes",
                    "max_queue")}}

    @api.get("/positions", summary="database positions of a held state (for the page's plot)")
    async def positions(self, request: Request, index_version: str | None = None):
        self._authorize(request)
        st = self.follower.find(index_version)
        if st is None:
            raise _error(404, f"index version {index_version} is not held by this service")
        return {"state": st.label, "positions": st.positions()}

    @api.get("/thumbnail/{image_id}", summary="a database image of a held state, by image_id only",
             responses={404: {"description": "no such image in that state"}})
    async def thumbnail(self, request: Request, image_id: int, index_version: str | None = None):
        self._authorize(request)
        st = self.follower.find(index_version)
        if st is None:
            raise _error(404, f"index version {index_version} is not held by this service")
        path = st.thumbnail_path(image_id)
        if path is None:
            raise _error(404, f"image {image_id} is not in {st.label}")
        try:
            data = await self._work(_thumbnail, path)
        except ImageReadError as exc:
            raise _error(404, f"image {image_id} cannot be read: {exc.reason}") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self):
        return HTMLResponse(PAGE)


# ---------------------------------------------------------------- the application
def build_app(config: ServeConfig, token: str | None = None):
    """The bound application (``serve.run`` it, or name ``app_builder`` in a RayService)."""
    from ..cluster import cluster_gpus
    from ..config import parse_use_gpu

    gpus = 1 if parse_use_gpu(config.use_gpu) is not False and cluster_gpus() > 0 else 0
    extractor = QueryExtractor.options(
        num_replicas=config.extractor_replicas,
        ray_actor_options={"num_cpus": config.replica_cpus, "num_gpus": gpus},
        max_ongoing_requests=max(2 * config.max_batch_size, 4),
    ).bind("cuda" if gpus else "cpu", config.extract_threads, config.max_batch_size, config.batch_wait_s)
    return Localizer.options(
        num_replicas=config.ingress_replicas,
        ray_actor_options={"num_cpus": config.replica_cpus},
        # Above our own bound, so that a request over it reaches our check (503 + Retry-After) even
        # while the ones before it still wait in the proxy to be assigned (a burst, a slow body);
        # Serve's queue stays bounded too.
        max_ongoing_requests=config.max_queue + 4, max_queued_requests=2 * config.max_queue + 4,
    ).bind(asdict(config), extractor, token_digest(token))


def app_builder(args: dict[str, Any]):
    """``import_path: pipeline.serve.app:app_builder`` (RayService ``serveConfigV2``): ``args`` are
    ServeConfig fields; the bearer token comes from the ``R2F_SERVE_TOKEN`` environment variable."""
    from ..config import from_dict

    return build_app(from_dict(ServeConfig, args), os.environ.get(TOKEN_ENV))
