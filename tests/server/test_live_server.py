"""`python -m pyvlm` as a live server on loopback, called the three ways of
SGLang's vision tutorial (curl, requests, the official openai client), with
images served by a loopback HTTP server, plus concurrency with disconnects,
errors and a clean SIGTERM."""

import base64
import functools
import http.server
import io
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
import torch
from PIL import Image

from pyvlm.utils import terminate_process, wait_for_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    """A loopback HTTP server with two PNGs; yields (base url, {name: bytes})."""
    folder = tmp_path_factory.mktemp("images")
    files = {}
    for name, size in (("a.png", (48, 40)), ("b.png", (30, 70))):
        pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        files[name] = buf.getvalue()
        (folder / name).write_bytes(files[name])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", files
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(tiny_checkpoint_qwen2, tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("server") / "server.log", "wb")
    cmd = [sys.executable, "-m", "pyvlm", "--model", str(tiny_checkpoint_qwen2), "--port",
           str(port), "--device", "cpu", "--page-size", "4", "--max-total-tokens", "8192",
           "--served-model-name", "tiny", "--allow-private-media-urls", "--enable-cache-report",
           "--enable-metrics", "--context-length", "1024"]
    # A file, not a pipe: nobody reads a pipe during the tests, and a full
    # pipe would block the server's logging.
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(base, timeout=120, process=process)
        yield base, process
    finally:
        terminate_process(process)
        log.close()


def chat(base, messages, **fields):
    body = {"model": "tiny", "messages": messages, "max_tokens": 16, "temperature": 0, **fields}
    return requests.post(f"{base}/v1/chat/completions", json=body, timeout=120)


def image_message(*urls, text="What is in the image?"):
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def test_openai_client_stream_equals_non_stream(server, image_server):
    from openai import OpenAI

    base, _ = server
    img_base, _ = image_server
    client = OpenAI(base_url=f"{base}/v1", api_key="EMPTY")
    messages = image_message(f"{img_base}/a.png")
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16,
                                           temperature=0)
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens_details.cached_tokens >= 0
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1


def test_base64_and_url_give_the_same_answer_and_the_image_is_cached(server, image_server):
    base, _ = server
    img_base, files = image_server
    uri = "data:image/png;base64," + base64.b64encode(files["b.png"]).decode()
    by_url = chat(base, image_message(f"{img_base}/b.png")).json()
    by_data = chat(base, image_message(uri)).json()
    assert by_url["choices"][0]["message"]["content"] == by_data["choices"][0]["message"]["content"]
    assert by_data["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the same bytes hit


def test_multi_image_and_multi_turn_with_requests(server, image_server):
    base, _ = server
    img_base, _ = image_server
    messages = image_message(f"{img_base}/a.png", f"{img_base}/b.png", text="Compare them.")
    first = chat(base, messages)
    assert first.status_code == 200, first.text
    answer = first.json()["choices"][0]["message"]["content"]
    messages += [{"role": "assistant", "content": answer},
                 {"role": "user", "content": "And now?"}]
    second = chat(base, messages)
    assert second.status_code == 200 and second.json()["usage"]["prompt_tokens"] > \
        first.json()["usage"]["prompt_tokens"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_as_in_the_tutorial(server, image_server):
    base, _ = server
    img_base, _ = image_server
    body = json.dumps({"model": "tiny", "max_tokens": 8, "messages": image_message(f"{img_base}/a.png")})
    out = subprocess.run(["curl", "-s", f"{base}/v1/chat/completions", "-H",
                          "Content-Type: application/json", "-d", body],
                         capture_output=True, text=True, timeout=120)
    reply = json.loads(out.stdout)
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant"


def test_bad_inputs_get_openai_errors_and_the_server_keeps_serving(server, image_server):
    base, _ = server
    img_base, _ = image_server
    bad = requests.post(f"{base}/v1/chat/completions", data=b"{not json", timeout=30)
    assert bad.status_code == 400 and set(bad.json()["error"]) >= {"message", "type", "param", "code"}
    missing = chat(base, image_message(f"{img_base}/nope.png"))
    assert missing.status_code == 422 and "messages[0].content[0]" in missing.json()["error"]["param"]
    wrong_model = chat(base, [{"role": "user", "content": "hi"}], model="other")
    assert wrong_model.status_code == 404
    assert requests.get(f"{base}/health", timeout=30).status_code == 200
    assert chat(base, [{"role": "user", "content": "hi"}]).status_code == 200


def _stream_and_maybe_leave(base, index: int, leave: bool):
    body = {"model": "tiny", "messages": [{"role": "user", "content": f"story {index}"}],
            "max_tokens": 24, "temperature": 0, "stream": True, "ignore_eos": True}
    with requests.post(f"{base}/v1/chat/completions", json=body, stream=True, timeout=300) as r:
        lines = []
        for line in r.iter_lines():
            if line:
                lines.append(line)
            if leave and len(lines) >= 3:
                return "left"
        return lines[-1]


def test_64_streaming_clients_with_a_quarter_disconnecting(server):
    base, _ = server
    results = [None] * 64
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, _stream_and_maybe_leave(base, i, leave=i % 4 == 0))) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(results[i] == b"data: [DONE]" for i in range(64) if i % 4), results
    for _ in range(100):  # the disconnects reach the engine within a few steps
        metrics = requests.get(f"{base}/metrics", timeout=30).text
        running = [l for l in metrics.splitlines() if l.startswith("pyvlm:num_running_reqs")]
        if running and float(running[0].split()[-1]) == 0:
            break
        time.sleep(0.1)
    assert running and float(running[0].split()[-1]) == 0, running
    # No pages held beyond the prefix cache (token usage counts cached pages as free).
    usage = [l for l in metrics.splitlines() if l.startswith("pyvlm:token_usage")]
    assert usage and float(usage[0].split()[-1]) == 0, usage


def test_the_benchmarks_read_the_engines_steps_by_path(server):
    """benchmarks.load.serving_phases.step_paths reads the engine's step
    counters through /get_server_info: a CPU server captures no graphs, so
    its steps all ran eagerly, and a request adds to them."""
    import asyncio

    from benchmarks.load.serving_phases import step_paths

    base, _ = server
    before = asyncio.run(step_paths(base))
    reply = chat(base, [{"role": "user", "content": "count the steps"}], ignore_eos=True)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 16
    after = asyncio.run(step_paths(base))
    assert set(after) == {"decode_graph", "piecewise_graphs", "eager"}, after
    assert after["decode_graph"] == after["piecewise_graphs"] == 0
    assert after["eager"] >= before["eager"] + 16  # a prefill and 15 decode steps at least


def test_sigterm_shuts_down_cleanly(tiny_checkpoint_qwen2):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "pyvlm", "--model", str(tiny_checkpoint_qwen2),
                                "--port", str(port), "--device", "cpu", "--max-total-tokens", "2048"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_server(f"http://127.0.0.1:{port}", timeout=120, process=process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0


def test_a_taken_port_exits_at_once_with_one_line_naming_it(tiny_checkpoint_qwen2):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The bind comes before the engine load, so the process ends well
        # within 5 s even where loading the model takes longer.
        result = subprocess.run([sys.executable, "-m", "pyvlm", "--model", str(tiny_checkpoint_qwen2),
                                 "--port", str(port), "--device", "cpu"],
                                capture_output=True, text=True, timeout=5)
    assert result.returncode == 2
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert f"127.0.0.1:{port}" in lines[0] and "already in use" in lines[0] and "--port" in lines[0]


def _probe_health(base: str):
    try:
        return requests.get(f"{base}/health", timeout=5).status_code
    except requests.ConnectionError:
        return None


def assert_default_refusals_name_their_flags(base: str, image_server_url: str):
    """With default flags each refused image names what would allow it."""
    expected = {image_server_url: "--allow-private-media-urls",
                "/etc/hostname": "--allowed-local-media-path",
                "file:///etc/hostname": "--allowed-local-media-path",
                "htp:/example.com/cat.png": "'htp:' is not a supported URL scheme"}
    for source, needle in expected.items():
        reply = chat(base, image_message(source))
        error = reply.json()["error"]
        assert reply.status_code == 422 and needle in error["message"], (source, error)
        assert error["param"] == "messages[0].content[0].image_url"


def test_ready_is_logged_once_and_only_when_requests_succeed(tiny_checkpoint_qwen2, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "pyvlm", "--model",
                                    str(tiny_checkpoint_qwen2), "--port", str(port), "--device",
                                    "cpu", "--max-total-tokens", "2048", "--served-model-name", "tiny"],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        probes = []  # (was "Ready" already logged before this probe, /health status)
        deadline = time.monotonic() + 120
        while not (probes and probes[-1][0]) and time.monotonic() < deadline:
            assert process.poll() is None, log_path.read_text()
            logged = f"Ready: serving tiny at {base}" in log_path.read_text()
            probes.append((logged, _probe_health(base)))
            time.sleep(0.05)
        assert probes[-1][0], log_path.read_text()
        # Once the line is there, the server answers; before it, only 503 (or 200
        # when the engine finished between reading the log and probing).
        assert all(status == 200 for logged, status in probes if logged), probes
        assert {status for logged, status in probes if not logged} <= {None, 503, 200}, probes
        assert chat(base, [{"role": "user", "content": "hi"}]).status_code == 200
        assert_default_refusals_name_their_flags(base, image_server_url=f"{base}/health")
    finally:
        terminate_process(process)
    text = log_path.read_text()
    assert text.count("Ready: serving") == 1, text
    assert "listening on" not in text
