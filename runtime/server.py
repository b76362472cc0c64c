"""spac-serve: an OpenAI-compatible HTTP server for one spac package.

One model and one sequence at a time (the expert pager belongs to the process): requests wait in
arrival order for a single worker thread that runs Runtime.stream, up to --queue-limit of them;
past that the answer is 503. A client that disconnects cancels its generation after the current
round. Chat requests reuse the KV cache of the conversation the previous request left.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from spac.ops.storage import PackageFileError

from . import openai_api as api
from .chat import chat_prompt
from .cli import add_expert_cache_flags, expert_cache_options, routing_record, save_routing
from .logs import add_logging_flags, setup_logging
from .manifest import load_manifest
from .runtime import GenerationError

log = logging.getLogger("spac.server")

DONE, PIECE, FAILED = "done", "piece", "failed"
# A request body past this is refused unread: a whole context of token ids as JSON (128k of them)
# is about 1 MB, and the body is held in memory while it is parsed.
MAX_BODY_BYTES = 16 << 20
# A request's whole body must arrive within this many seconds of its headers; past it the answer
# is 408. Else a client that sends part of a body and then nothing holds a connection for ever.
BODY_TIMEOUT_S = 30.0
# A connection must send a whole request head (request line and headers) within this many
# seconds of opening, or of its last answer, else it is closed (see HeadDeadlineProtocol).
HEAD_TIMEOUT_S = 10.0
OPEN_PATHS = ("/health",)  # answered without the API key
# Requests open at once past the queue's limit (health probes, the queue_full answers); one more
# gets 503 server_overloaded. Each open request may hold a body of MAX_BODY_BYTES while it is read.
SPARE_REQUESTS = 8


class APIError(Exception):
    """An answer other than 200, with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, api.error_body(message, type_, param, code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status)


class Job:
    """One request's generation: the worker thread posts its pieces and its end to the event loop."""

    def __init__(self, pieces, loop: asyncio.AbstractEventLoop):
        self.pieces, self.loop = pieces, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def post(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is gone: the server is shutting down
            self.cancelled.set()


class GenerationQueue:
    """Runs jobs one at a time in arrival order on a single worker thread; at most `limit` wait or run."""

    def __init__(self, runtime, limit: int):
        self.runtime, self.limit = runtime, limit
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spac-generate")
        self.lock = threading.Lock()
        self.pending = 0

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.pending >= self.limit:
                raise APIError(503, f"the server is busy: {self.pending} requests are already waiting or running "
                                    f"(the queue limit is {self.limit}, spac-serve --queue-limit); retry later",
                               "server_busy", code="queue_full")
            self.pending += 1
        self.worker.submit(self._run, job)

    def _run(self, job: Job) -> None:
        try:
            if job.cancelled.is_set():  # its client left while it waited
                job.pieces.close()
                return
            for piece in job.pieces:
                job.post(PIECE, piece)
            job.post(DONE, job.pieces.result)
        except PackageFileError as error:  # a package file found bad while paging: one line, no traceback
            log.error("generation failed: %s", error)
            job.post(FAILED, f"generation failed: {error}")
        except Exception as error:  # noqa: BLE001 - the worker must survive any one request
            log.exception("generation failed")
            job.post(FAILED, f"generation failed: {error}")
        finally:
            with self.lock:
                self.pending -= 1

    def close(self) -> None:
        self.worker.shutdown(wait=True, cancel_futures=True)


def finish_reason(result, tokenizer) -> str | None:
    if result.interrupted:
        return None
    if result.token_ids and result.token_ids[-1] in tokenizer.eos_token_ids:
        return "stop"
    # A stop string cut the text short of what the tokens decode to.
    return "stop" if result.text != tokenizer.decode(result.token_ids) else "length"


def usage(result) -> api.Usage:
    stats = result.stats.as_dict()
    prompt, completion = stats["prompt_tokens"], len(result.token_ids)
    return api.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion, spac=stats)


class Server:
    """The FastAPI app around one Runtime."""

    def __init__(self, runtime, model_name: str, api_key: str | None = None, queue_limit: int = 16, on_stop=None,
                 max_body_bytes: int = MAX_BODY_BYTES, body_timeout_s: float = BODY_TIMEOUT_S,
                 head_timeout_s: float = HEAD_TIMEOUT_S):
        """`on_stop()` runs once the app shuts down and the last generation has ended."""
        self.runtime, self.model_name, self.on_stop = runtime, model_name, on_stop
        self.queue = GenerationQueue(runtime, queue_limit)
        self.request_limit = queue_limit + SPARE_REQUESTS
        self.head_timeout_s = head_timeout_s
        app = FastAPI(title="spac-serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=self._lifespan)
        self.app = RequestGate(app, api_key, max_body_bytes, body_timeout_s, self.request_limit)  # what uvicorn serves

        @app.exception_handler(APIError)
        async def api_error(request, error: APIError):
            return error.response()

        @app.exception_handler(RequestValidationError)
        async def invalid_request(request, error: RequestValidationError):
            first = error.errors()[0]
            param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
            message = f"{param}: {first['msg']}" if param else first["msg"]
            return JSONResponse(api.error_body(message, param=param), status_code=400)

        @app.exception_handler(HTTPException)
        async def http_error(request, error: HTTPException):
            code = getattr(error, "code", None) or str(error.status_code)
            return JSONResponse(api.error_body(str(error.detail), code=code), status_code=error.status_code)

        @app.get("/health")
        async def health():
            return {"status": "ok", "model": self.model_name, "pending": self.queue.pending}

        @app.get("/v1/models")
        async def models():
            return api.ModelList(data=[api.ModelCard(id=self.model_name)]).model_dump()

        @app.post("/v1/chat/completions")
        async def chat_completions(body: api.ChatCompletionRequest, request: Request):
            messages = [message.as_template_message() for message in body.messages]
            try:
                ids = chat_prompt(runtime.tokenizer, messages, None, body.add_generation_prompt,
                                  body.chat_template_kwargs)
            except Exception as error:  # noqa: BLE001 - a template failing on these messages is the request's
                raise APIError(400, f"cannot render the chat template for these messages: {error}",
                               param="messages") from error
            return await self._answer(request, body, ids, chat=True)

        @app.post("/v1/completions")
        async def completions(body: api.CompletionRequest, request: Request):
            try:
                ids = runtime.tokenizer.encode_prompt(body.prompt)
            except (ValueError, TypeError) as error:
                raise APIError(400, str(error), param="prompt") from error
            return await self._answer(request, body, ids, chat=False)

    def uvicorn_options(self) -> dict:
        """What uvicorn.run or uvicorn.Config is given besides the app, host and port."""
        protocol = type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), {"head_timeout_s": self.head_timeout_s})
        return {"http": protocol}

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        yield
        self.queue.close()
        if self.on_stop:
            self.on_stop()

    async def _answer(self, request: Request, body: api.SamplingRequest, ids: list[int], chat: bool):
        context = self.runtime.context
        if len(ids) >= context:
            raise APIError(400, f"the prompt has {len(ids)} tokens; the model's context is {context} tokens, which "
                                "must also hold at least one new token", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        job = Job(None, asyncio.get_running_loop())
        try:
            job.pieces = self.runtime.stream(ids, body.max_new_tokens or context, reuse_cache=True,
                                             cancel=job.cancelled.is_set, **body.generation_options())
        except (GenerationError, ValueError, TypeError) as error:
            raise APIError(400, str(error)) from error
        self.queue.submit(job)
        reply = _Reply(self.model_name, chat, self.runtime.tokenizer, body.return_token_ids)
        if body.stream:
            return StreamingResponse(self._events(job, reply, body.include_usage), media_type="text/event-stream")
        result = await self._wait(job, request)
        if result is None:  # nobody is listening any more
            return JSONResponse(api.error_body("the client disconnected"), status_code=499)
        return JSONResponse(reply.whole(result))

    async def _wait(self, job: Job, request: Request):
        """The finished result, or None when the client left (its generation then stops)."""
        while True:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    return None
                continue
            if kind == DONE:
                return value
            if kind == FAILED:
                raise APIError(500, value, "server_error")

    async def _events(self, job: Job, reply: "_Reply", include_usage: bool):
        """Server-sent events; a client that disconnects cancels the task, and so the generation."""
        try:
            yield sse(reply.chunk(role=True))
            while True:
                kind, value = await job.events.get()
                if kind == PIECE:
                    yield sse(reply.chunk(value))
                elif kind == FAILED:
                    yield sse(api.error_body(value, "server_error"))
                    break
                else:
                    yield sse(reply.chunk(finish=finish_reason(value, reply.tokenizer)))
                    if include_usage:
                        yield sse(reply.usage_chunk(value))
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # no effect once the job is done


class BodyTooLarge(HTTPException):
    """Raised while FastAPI reads a body (it lets an HTTPException through, anything else becomes
    a 400), answered by the app's handler."""

    code = "request_too_large"

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit >> 20} MiB")


class BodyTimeout(HTTPException):
    """Raised while FastAPI reads a body that did not arrive in time, answered by the app's handler."""

    code = "request_timeout"

    def __init__(self, seconds: float):
        super().__init__(408, f"the request body did not arrive within {seconds:g} s")


class RequestGate:
    """ASGI middleware in front of the app: a request without the API key (where one is set; not
    for OPEN_PATHS) or with a body past `max_body_bytes` is answered before the app reads its
    body. FastAPI reads a whole body before any dependency runs, so a client without the key could
    otherwise make the server hold any number of bytes (400 MB took it from 121 to 1,055 MiB).
    A body not whole within `body_timeout_s` of the headers is answered 408 (uvicorn has no such
    bound), and past `request_limit` requests open at once the next is answered 503: so requests
    hold at most request_limit bodies, each for a bounded time. (uvicorn's own limit_concurrency
    counts connections, and connections that never send a whole request would fill it: see
    HeadDeadlineProtocol.)"""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, body_timeout_s: float, request_limit: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes
        self.body_timeout_s, self.request_limit = body_timeout_s, request_limit
        self.open_requests = 0  # (one event loop: no lock)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan
            return await self.app(scope, receive, send)
        if self.open_requests >= self.request_limit:
            busy = APIError(503, f"the server has {self.open_requests} requests open, its limit; retry later",
                            "server_error", code="server_overloaded")
            return await busy.response()(scope, receive, send)
        self.open_requests += 1
        try:
            await self._gate(scope, receive, send)
        finally:
            self.open_requests -= 1

    async def _gate(self, scope, receive, send):
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] not in OPEN_PATHS and not hmac.compare_digest(
                headers.get(b"authorization", b""), f"Bearer {self.api_key}".encode()):
            refusal = APIError(401, "a valid API key is required: send the header 'Authorization: Bearer <key>'",
                               "authentication_error", code="invalid_api_key")
            return await refusal.response()(scope, receive, send)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body_bytes:
            too_large = BodyTooLarge(self.max_body_bytes)
            return await APIError(413, too_large.detail, code=too_large.code).response()(scope, receive, send)
        received, body_done = 0, False
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s

        async def bounded_receive():
            """A body sent in chunks (no Content-Length) stops at the bound, and a body must be
            whole by the deadline. Once it is, receive() only waits for the client to hang up
            (a streamed answer listens for that), which may take as long as the answer does."""
            nonlocal received, body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:  # (TimeoutError itself from Python 3.11 on)
                raise BodyTimeout(self.body_timeout_s) from None
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise BodyTooLarge(self.max_body_bytes)
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, bounded_receive, send)


class HeadDeadlineProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol (h11) with a deadline for each request head: a connection that
    has not sent a whole request line and headers within `head_timeout_s` of opening, or of its
    last answer, is closed. uvicorn's keep-alive timer stops at the first byte that arrives, so a
    client sending a partial head and then nothing held its connection for ever (and with
    uvicorn's limit_concurrency, such connections made it answer every other client 503)."""

    head_timeout_s = HEAD_TIMEOUT_S
    head_deadline = None
    awaited_after = None  # the request/response cycle the head deadline waits for a successor of

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_head()

    def on_response_complete(self) -> None:
        self._await_head()  # first: a pipelined request's head is handled inside the call below
        super().on_response_complete()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not self.awaited_after:  # a head arrived
            self._stop_head_deadline()

    def connection_lost(self, exc) -> None:
        self._stop_head_deadline()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        self._stop_head_deadline()
        self.awaited_after = self.cycle
        self.head_deadline = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _stop_head_deadline(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def _head_timed_out(self) -> None:
        self.head_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


class BackgroundServer:
    """uvicorn serving a Server from a thread of this process (tests, benchmarks, notebooks);
    port 0 picks a free one."""

    def __init__(self, server: Server, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0):
        import socket
        import time

        import uvicorn

        self.server = server
        if port == 0:
            with socket.socket() as probe:
                probe.bind((host, 0))
                port = probe.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(server.app, host=host, port=port, log_level="warning",
                                                     **server.uvicorn_options()))
        self.thread = threading.Thread(target=self.uvicorn.run, name="spac-serve", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.uvicorn.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class _Reply:
    """Builds one request's response objects, chat or plain completion."""

    def __init__(self, model: str, chat: bool, tokenizer, token_ids: bool = False):
        self.model, self.chat, self.tokenizer, self.token_ids = model, chat, tokenizer, token_ids
        self.id = api.response_id("chatcmpl" if chat else "cmpl")

    def whole(self, result) -> dict:
        finish = finish_reason(result, self.tokenizer)
        ids = result.token_ids if self.token_ids else None
        if self.chat:
            choice = api.ChatChoice(message=api.ChoiceMessage(content=result.text), finish_reason=finish, token_ids=ids)
            response = api.ChatCompletion(id=self.id, model=self.model, choices=[choice], usage=usage(result))
        else:
            choice = api.TextChoice(text=result.text, finish_reason=finish, token_ids=ids)
            response = api.Completion(id=self.id, model=self.model, choices=[choice], usage=usage(result))
        return response.model_dump(exclude_none=True)

    def chunk(self, text: str | None = None, role: bool = False, finish: str | None = None) -> dict:
        if self.chat:
            delta = api.ChatDelta(role="assistant", content="") if role else api.ChatDelta(content=text)
            choice = api.ChatChunkChoice(delta=delta, finish_reason=finish)
            return api.ChatCompletionChunk(id=self.id, model=self.model, choices=[choice]).model_dump(
                exclude_none=True)
        choice = api.TextChoice(text=text or "", finish_reason=finish)
        return api.Completion(id=self.id, model=self.model, choices=[choice]).model_dump(exclude_none=True)

    def usage_chunk(self, result) -> dict:
        kind = api.ChatCompletionChunk if self.chat else api.Completion
        return kind(id=self.id, model=self.model, choices=[], usage=usage(result)).model_dump()


# ---------------------------------------------------------------------------------------------
# The command


DESCRIPTION = """\
Serve a package made by spac-export over an OpenAI-compatible HTTP API: /v1/chat/completions,
/v1/completions, /v1/models and /health. One request generates at a time; the others wait."""

EPILOG = """\
example:
  spac-serve --package packages/qwen3-moe --profile cpu-only --port 8080
  curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'"""


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="spac-serve", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", required=True, help="package directory made by spac-export")
    parser.add_argument("--profile", default="cpu-only", help="device profile name or YAML path (default: cpu-only)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port (default: 8080)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1 requests (/health stays open)")
    parser.add_argument("--model-name", default=None, help="the model id clients see (default: the package's folder)")
    parser.add_argument("--queue-limit", type=int, default=16,
                        help="requests waiting or running at most; more get 503 (default: 16)")
    parser.add_argument("--draft-len", type=int, default=None, help="γ, draft tokens per round (default: profile's)")
    add_expert_cache_flags(parser)
    add_logging_flags(parser)
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    if args.queue_limit < 1:
        parser.error(f"--queue-limit must be at least 1, got {args.queue_limit}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging("spac-serve", args)
    import uvicorn

    from .profile import ProfileError
    from .runtime import Runtime

    try:
        manifest = load_manifest(args.package)
        routing = routing_record(args, manifest)
        runtime = Runtime(manifest, profile=args.profile, draft_len=args.draft_len, global_thread_pool=True,
                          **expert_cache_options(args))
    except (PackageFileError, ProfileError, ValueError, RuntimeError) as error:
        print(f"spac-serve: error: {error}", file=sys.stderr)
        return 2
    if routing is not None:
        routing.start(runtime)

    def on_stop() -> None:
        """The counts of every request served. At the app's shutdown: uvicorn ends the process by
        the signal that stopped it once the app is down, before any code after run() would run."""
        save_routing(routing, "spac-serve")

    server = Server(runtime, args.model_name or Path(args.package).resolve().name, args.api_key, args.queue_limit,
                    on_stop=on_stop if routing else None)
    log.info("serving %s on http://%s:%d", args.package, args.host, args.port)
    try:
        uvicorn.run(server.app, host=args.host, port=args.port, log_level=logging.getLevelName(
            logging.getLogger().level).lower(), log_config=None, **server.uvicorn_options())
    finally:
        runtime.close()
    return 0


def command() -> None:
    sys.exit(main())


if __name__ == "__main__":
    command()
