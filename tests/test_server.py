"""spac-serve against the real openai client: a live uvicorn server on a free loopback port,
started here and stopped at the end, on the tiny qwen3_moe package."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from spac.runtime import Runtime
from spac.runtime.manifest import load_manifest
from spac.runtime.memory import resident_bytes
from spac.runtime.routing import load_routing
from spac.runtime.chat import chat_prompt
from spac.runtime.server import BackgroundServer, Server

FAMILY = "qwen3_moe"
PROMPTS = ["def fibonacci(n):", "import os\nfor name in", "class Queue:", "x = [1, 2,"]
MESSAGES = [{"role": "user", "content": "Write a loop."}]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LiveServer(BackgroundServer):
    def client(self, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def runtime(exported):
    with Runtime(exported(FAMILY).output, profile="cpu-only", draft_len=4) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def live(runtime):
    server = LiveServer(Server(runtime, "tiny"))
    yield server
    server.stop()


def wait_idle(server: Server) -> None:
    deadline = time.monotonic() + 60
    while server.queue.pending:
        assert time.monotonic() < deadline, "the queue did not drain"
        time.sleep(0.02)


def assert_still_serving(live: LiveServer) -> None:
    reply = live.client().completions.create(model="tiny", prompt="x", max_tokens=2)
    assert reply.usage.completion_tokens == 2


def completion_ids(live: LiveServer, prompt, extra_body=None, **options) -> list[int]:
    reply = live.client().completions.create(model="tiny", prompt=prompt,
                                             extra_body={"return_token_ids": True, **(extra_body or {})}, **options)
    return reply.choices[0].model_extra["token_ids"]


def test_models_and_health(live):
    assert [model.id for model in live.client().models.list()] == ["tiny"]
    assert httpx.get(f"{live.url}/health").json()["status"] == "ok"


def test_greedy_completion_equals_generate(live, runtime):
    for prompt in PROMPTS[:2]:
        expected = runtime.generate(prompt, max_new_tokens=16).token_ids
        reply = live.client().completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                                 extra_body={"return_token_ids": True})
        choice = reply.choices[0]
        assert choice.model_extra["token_ids"] == expected
        assert choice.text == runtime.tokenizer.decode(expected)
        assert choice.finish_reason == "length"
        assert reply.usage.completion_tokens == 16
        assert reply.usage.prompt_tokens == len(runtime.tokenizer.encode(prompt))
        spac = reply.usage.model_extra["spac"]
        assert {"tokens_per_second", "acceptance_rate", "expert_hit_rate", "bytes_paged"} <= set(spac)


def test_chat_streaming_equals_whole_and_generate(live, runtime):
    ids = chat_prompt(runtime.tokenizer, MESSAGES)
    expected = runtime.generate(ids, max_new_tokens=12)
    client = live.client()
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12)
    assert whole.choices[0].message.content == expected.text
    assert whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_stop_and_seeded_sampling(live, runtime):
    client = live.client()
    full = runtime.generate(PROMPTS[0], max_new_tokens=16).text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    reply = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, stop=[stop])
    assert reply.choices[0].text == full[:full.find(stop)] and reply.choices[0].finish_reason == "stop"
    options = dict(max_tokens=12, temperature=0.9, top_p=0.95, seed=7,
                   extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.2})
    first = completion_ids(live, PROMPTS[1], frequency_penalty=0.5, presence_penalty=0.3, **options)
    again = completion_ids(live, PROMPTS[1], frequency_penalty=0.5, presence_penalty=0.3, **options)
    assert first == again and len(first) == 12
    expected = runtime.generate(PROMPTS[1], max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7, top_k=20,
                                min_p=0.01, repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.3)
    assert first == expected.token_ids


def test_concurrent_clients_get_sequential_outputs(live):
    sequential = [completion_ids(live, prompt, max_tokens=10) for prompt in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        concurrent = list(pool.map(lambda prompt: completion_ids(live, prompt, max_tokens=10), PROMPTS))
    assert concurrent == sequential


def slow_target(runtime, monkeypatch) -> None:
    """Every target pass takes 20 ms more (the tiny model is otherwise done before a hang-up lands)."""
    forward = runtime.target.forward
    monkeypatch.setattr(runtime.target, "forward", lambda tokens: (time.sleep(0.02), forward(tokens))[1])


def test_disconnecting_client_cancels_its_generation(live, runtime, monkeypatch):
    slow_target(runtime, monkeypatch)
    budget = runtime.context - 8
    request = {"prompt": PROMPTS[0], "max_tokens": budget, "stream": True}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{live.url}/v1/completions", json=request) as response:
            assert response.status_code == 200
            # The first event (the role) is sent before the worker starts; the second is a token,
            # so the generation has begun (a hang-up before that skips it: last_result stays old).
            events = (line for line in response.iter_lines() if line.startswith("data:"))
            next(events), next(events)
    wait_idle(live.server)
    assert runtime.last_result.interrupted and len(runtime.last_result.token_ids) < budget
    assert_still_serving(live)


@pytest.mark.parametrize("body, param", [
    ('{"prompt": "x", "max_tokens": 4', None),  # malformed JSON
    ('{"prompt": "x", "max_tokens": "four"}', "max_tokens"),
    ('{"prompt": "x", "max_tokens": -3}', "max_tokens"),
    ('{"prompt": "x", "temperature": "hot"}', "temperature"),
    ('{"prompt": "x", "top_p": 0}', "top_p"),
    ('{"prompt": "x", "n": 2}', "n"),
    ('{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', "stop"),  # OpenAI's limit is 4
    ('{"max_tokens": 4}', "prompt"),
    ('{"prompt": [999999999]}', "prompt"),
    ('[1, 2]', None),
])
def test_bad_requests_get_openai_errors(live, body, param):
    response = httpx.post(f"{live.url}/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if param:
        assert error["param"].startswith(param)
    assert_still_serving(live)


def test_prompt_over_the_context(live, runtime):
    with pytest.raises(openai.BadRequestError) as caught:
        live.client().completions.create(model="tiny", prompt=[5] * runtime.context, max_tokens=4)
    assert caught.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        live.client().chat.completions.create(model="tiny", messages=[], max_tokens=4)
    response = httpx.get(f"{live.url}/v1/nothing")
    assert response.status_code == 404 and "error" in response.json()
    assert_still_serving(live)


def test_second_chat_turn_reuses_the_cache(live, runtime):
    client = live.client()
    first = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8)
    turn = MESSAGES + [{"role": "assistant", "content": first.choices[0].message.content},
                       {"role": "user", "content": "Now a function."}]
    second = client.chat.completions.create(model="tiny", messages=turn, max_tokens=8,
                                            extra_body={"return_token_ids": True})
    assert second.usage.model_extra["spac"]["reused_prompt_tokens"] > len(chat_prompt(runtime.tokenizer, MESSAGES)) // 2
    fresh = runtime.generate(chat_prompt(runtime.tokenizer, turn), max_new_tokens=8)  # no reuse
    assert second.choices[0].model_extra["token_ids"] == fresh.token_ids


def test_api_key_and_queue_limit(runtime, live, monkeypatch):
    slow_target(runtime, monkeypatch)
    guarded = LiveServer(Server(runtime, "tiny", api_key="sesame", queue_limit=1))
    try:
        with pytest.raises(openai.AuthenticationError):
            guarded.client("wrong").models.list()
        assert httpx.get(f"{guarded.url}/v1/models").status_code == 401
        client = guarded.client("sesame")
        assert [model.id for model in client.models.list()] == ["tiny"]
        # One long generation holds the only place in the queue: the next request gets 503.
        request = {"prompt": PROMPTS[0], "max_tokens": runtime.context - 8, "stream": True}
        headers = {"Authorization": "Bearer sesame"}
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", f"{guarded.url}/v1/completions", json=request, headers=headers) as response:
                next(response.iter_lines())
                busy = http.post(f"{guarded.url}/v1/completions", json={"prompt": "x"}, headers=headers)
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "queue_full"
        wait_idle(guarded.server)
        assert client.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2
    finally:
        guarded.stop()


def endless_body(mebibytes: int):
    """A JSON body sent in 1 MiB chunks (no Content-Length), the same chunk each time."""
    chunk = b"x" * (1 << 20)
    yield b'{"prompt": "'
    for _ in range(mebibytes):
        yield chunk
    yield b'"}'


def test_a_client_without_the_key_cannot_make_the_server_hold_its_body(runtime):
    """FastAPI reads a whole body before it checks anything: 400 MB without the key took this
    process from 121 to 1,055 MiB. The key is checked first, and an over-long body is refused."""
    guarded = LiveServer(Server(runtime, "tiny", api_key="sesame"))
    try:
        before = resident_bytes()
        refused = httpx.post(f"{guarded.url}/v1/completions", content=endless_body(400), timeout=60,
                             headers={"Content-Type": "application/json"})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert resident_bytes() - before < 64 << 20
        assert httpx.get(f"{guarded.url}/health").status_code == 200  # open without the key
    finally:
        guarded.stop()


def test_request_bodies_past_the_bound_are_refused_unread(runtime):
    small = LiveServer(Server(runtime, "tiny", max_body_bytes=2 << 20))
    try:
        url, json_type = f"{small.url}/v1/completions", {"Content-Type": "application/json"}
        declared = httpx.post(url, content=b'{"prompt": "' + b"x" * (3 << 20) + b'"}', headers=json_type)
        streamed = httpx.post(url, content=endless_body(3), headers=json_type, timeout=60)
        for reply in (declared, streamed):
            assert reply.status_code == 413, reply.text
            error = reply.json()["error"]
            assert "larger than 2 MiB" in error["message"] and error["code"] == "request_too_large"
        within = httpx.post(url, json={"prompt": "def f(x):", "max_tokens": 2})  # the bound lets others through
        assert within.status_code == 200 and within.json()["usage"]["completion_tokens"] == 2
    finally:
        small.stop()


class SlowPieces:
    """A generation whose pieces come 0.4 s apart (a slow model, injected)."""

    def __init__(self, generation):
        self.generation = generation

    def __iter__(self):
        for piece in self.generation:
            time.sleep(0.4)
            yield piece

    def __getattr__(self, name):
        return getattr(self.generation, name)


def test_a_body_that_never_finishes_is_answered_408(runtime, monkeypatch):
    """A client that sends part of its body and then nothing (a slow-loris) would hold one of the
    bounded connections for ever: past the body deadline it gets 408 and the connection is let go.
    A body sent in time still works, and its answer may take longer than the deadline."""
    quick = LiveServer(Server(runtime, "tiny", body_timeout_s=1.0))
    host, port = quick.url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=15) as connection:
            connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Content-Length: 1000\r\n\r\n{")  # and the rest never comes
            started, reply = time.monotonic(), b""
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                piece = connection.recv(65536)
                if not piece:
                    break
                reply += piece
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
        assert time.monotonic() - started < 10
        # The app polls the connection while a generation runs (is it still there?): past the
        # body deadline too. A generation slowed on purpose makes the answer outlast it.
        stream = runtime.stream
        monkeypatch.setattr(runtime, "stream", lambda *args, **kwargs: SlowPieces(stream(*args, **kwargs)))
        started = time.monotonic()
        answered = httpx.post(f"{quick.url}/v1/completions", timeout=60, json={"prompt": "def f(x):", "max_tokens": 8})
        assert answered.status_code == 200, answered.text
        assert time.monotonic() - started > 2.0  # the deadline and several polls passed while it ran
    finally:
        quick.stop()


def test_open_requests_are_bounded(runtime):
    """Clients that open requests and never finish their bodies (each could hold 16 MiB for the
    body deadline) fill at most the queue's limit plus a few requests; the one past that gets an
    OpenAI-style 503 until they go."""
    bounded = LiveServer(Server(runtime, "tiny", queue_limit=1))
    host, port = bounded.url.removeprefix("http://").split(":")
    stalled = []
    try:
        for count in range(1, bounded.server.request_limit + 1):
            connection = socket.create_connection((host, int(port)))
            connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Content-Length: 1000\r\n\r\n{")  # and the rest never comes
            stalled.append(connection)
            deadline = time.monotonic() + 10
            while bounded.server.app.open_requests < count:  # one at a time, so the count is exact
                assert time.monotonic() < deadline, "the server did not take the request"
                time.sleep(0.01)
        refused = httpx.get(f"{bounded.url}/health")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_overloaded"
        for connection in stalled:
            connection.close()
        deadline = time.monotonic() + 10
        while httpx.get(f"{bounded.url}/health").status_code != 200:
            assert time.monotonic() < deadline, "the server did not recover"
            time.sleep(0.1)
    finally:
        for connection in stalled:
            connection.close()
        bounded.stop()


def test_connections_that_never_send_a_request_block_no_one(runtime):
    """A connection that sends part of a request head and then nothing (a slow-loris) holds no
    request: more of them than the request bound leave the server answering everyone else, and
    each is closed once the head deadline passes."""
    bounded = LiveServer(Server(runtime, "tiny", queue_limit=1, head_timeout_s=1.0))
    host, port = bounded.url.removeprefix("http://").split(":")
    idle = []
    try:
        for _ in range(bounded.server.request_limit + 4):
            connection = socket.create_connection((host, int(port)), timeout=15)
            connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHo")  # and the rest never comes
            idle.append(connection)
        assert httpx.get(f"{bounded.url}/health").status_code == 200
        started = time.monotonic()
        assert all(connection.recv(1024) == b"" for connection in idle)  # closed by the server
        assert time.monotonic() - started < 10
    finally:
        for connection in idle:
            connection.close()
        bounded.stop()


def test_spac_serve_command(exported, tmp_path):
    """The console command: binds where told, logs to --log-file, pages under --host-budget,
    answers, exits on SIGTERM having saved the routing of what it served (--save-routing); a bad
    package is one error line and exit code 2."""
    port = free_port()
    log_file, routing = tmp_path / "serve.log", tmp_path / "routing.json"
    process = subprocess.Popen([sys.executable, "-m", "spac.runtime.server", "--package", str(exported(FAMILY).output),
                                "--port", str(port), "--api-key", "k", "-v", "--log-file", str(log_file),
                                "--host-budget", "25%", "--save-routing", str(routing)],
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, "spac-serve did not start"
                time.sleep(0.2)
        assert health.json()["status"] == "ok"
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", headers={"Authorization": "Bearer k"},
                           json={"prompt": "x", "max_tokens": 3}, timeout=60)
        assert reply.json()["usage"]["completion_tokens"] == 3
        assert reply.json()["usage"]["spac"]["bytes_paged"] > 0  # --host-budget reached the runtime
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "serving" in log_file.read_text()
    manifest = load_manifest(exported(FAMILY).output)
    counts = load_routing(routing, manifest).counts[manifest.target.moe_layers]
    prompt_tokens = reply.json()["usage"]["prompt_tokens"]
    # every MoE layer saw the same rows: at least the prompt's and each new token's but the last
    assert len(set(counts.sum(axis=1))) == 1 and counts.sum(axis=1)[0] >= (prompt_tokens + 2) * manifest.target.dims["top_k"]
    bad = subprocess.run([sys.executable, "-m", "spac.runtime.server", "--package", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("spac-serve: error:") and len(bad.stderr.strip().splitlines()) == 1
