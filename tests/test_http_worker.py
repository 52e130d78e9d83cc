"""The OpenAI-compatible worker against a small server on 127.0.0.1: images sent inline, transient failures
retried with backoff, a bad response or a dead endpoint counted as a row's status and never fatal."""

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from mmemb_lab.method.http_worker import HTTPWorker, HTTPWorkerSpec
from mmemb_lab.method.workers import generate_candidates
from mmemb_lab.model.embed import Input


class _Handler(BaseHTTPRequestHandler):
    """Behaviour chosen by the query text: ok, flaky (503 twice), slow (first answer after the timeout),
    garbage (not JSON), broken (JSON without choices), down (500 always), long (finish_reason length)."""

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        text = body["messages"][0]["content"][-1]["text"]
        kind = text.split("\n")[0]
        with srv.lock:
            srv.requests.append(body)
            srv.tries[kind] = srv.tries.get(kind, 0) + 1
            n = srv.tries[kind]
        if kind == "flaky" and n <= 2 or kind == "down":
            return self._send(503 if kind == "flaky" else 500, b"{}")
        if kind == "slow" and n == 1:
            srv.release.wait(5)
        if kind == "garbage":
            return self._send(200, b"<html>proxy error</html>")
        if kind == "broken":
            return self._send(200, json.dumps({"object": "chat.completion"}).encode())
        finish = "length" if kind == "long" else "stop"
        reply = {"choices": [{"message": {"role": "assistant", "content": f"<think>the {kind} chain</think>"},
                              "finish_reason": finish}], "usage": {"completion_tokens": 5}}
        self._send(200, json.dumps(reply).encode())

    def _send(self, code, payload):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture()
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.lock, srv.requests, srv.tries, srv.release = threading.Lock(), [], {}, threading.Event()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


def _worker(srv, **kw):
    spec = HTTPWorkerSpec("api", f"http://127.0.0.1:{srv.server_address[1]}/v1", "some-model",
                          **{"timeout_s": 1.0, "retries": 2, "backoff_s": 0.01, "api_key_env": None, **kw})
    return HTTPWorker(spec)


def test_every_outcome_is_a_row_and_transient_failures_are_retried(server):
    image = Image.new("RGB", (8, 8), (200, 10, 10))
    kinds = ["ok", "flaky", "slow", "garbage", "broken", "down", "long"]
    inputs = [Input(k, image if k == "ok" else None, "", None, f"row-{k}") for k in kinds]
    worker = _worker(server)
    out = dict(zip(kinds, worker(inputs, seed=7)))
    assert out["ok"].status == "ok" and out["ok"].text == "the ok chain" and out["ok"].n_tokens == 5
    assert out["flaky"].status == "ok" and server.tries["flaky"] == 3  # two 503s, then an answer
    assert out["slow"].status == "ok" and server.tries["slow"] == 2  # the first try timed out
    assert out["garbage"].status == "bad_response" and server.tries["garbage"] == 1  # answered: not retried
    assert out["broken"].status == "bad_response"
    assert out["down"].status == "error" and server.tries["down"] == 3  # 1 try + 2 retries, then given up
    assert out["long"].status == "overlong" and out["long"].text == ""
    assert worker.counts["transient"] == 2 + 1 + 3 and worker.counts["error"] == 1
    # the request: model, sampling seed per input, the image inline as a PNG data URL
    ok = next(r for r in server.requests if r["messages"][0]["content"][-1]["text"].startswith("ok"))
    assert ok["model"] == "some-model" and ok["seed"] == 7 + kinds.index("ok")
    url = ok["messages"][0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).getpixel((0, 0)) == (200, 10, 10)


def test_a_dead_endpoint_never_stops_a_generation_job(tmp_path):
    spec = HTTPWorkerSpec("api", "http://127.0.0.1:9/v1", "m", timeout_s=0.5, retries=1, backoff_s=0.01,
                          api_key_env=None)  # port 9 (discard): connection refused
    rows = [(f"r{i}", Input(f"query {i}")) for i in range(3)]
    report = generate_candidates(HTTPWorker(spec), rows, tmp_path / "cands", {"worker": "api"}, shard_size=2,
                                 progress=False)
    assert report.rows == 3 and report.status_counts == {"error": 3}
