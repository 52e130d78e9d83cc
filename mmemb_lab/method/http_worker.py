"""A worker behind an OpenAI-compatible chat endpoint: a proprietary model or a vLLM server.

Concept
    The paper's third kind of worker is a large proprietary model; a served open model (``vllm serve``)
    speaks the same protocol. :class:`HTTPWorker` asks ``POST {base_url}/chat/completions`` for a
    rationale per input, the images (frames, pages) sent inline as PNG data URLs, and returns the same
    ``workers.Rationale`` rows as ``HFWorker``, so selection cannot tell them apart.

    A long generation job must survive a flaky endpoint. Each request has a timeout; a timeout, a refused
    connection, HTTP 429 or a 5xx is retried ``retries`` times with exponential backoff; what still fails is
    a row with status ``"error"``, and a response that is not a chat completion is a row with status
    ``"bad_response"`` (not retried: the server answered). Neither stops the run; ``counts`` tallies every
    outcome, and ``workers.generate_candidates`` reports them per status. The API key is read from the
    environment variable the spec names, so it never lands in a manifest.

Used by: selection on real data (any worker callable), ``generate_candidates``.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from ..model.backbone import THINK_CLOSE, THINK_OPEN
from ..model.embed import Input
from ..model.inference import MAX_NEW_TOKENS
from .workers import DEFAULT_PROMPT, Rationale

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class HTTPWorkerSpec:
    name: str
    base_url: str
    """The API root, e.g. ``http://127.0.0.1:8000/v1`` (vLLM) or a provider's ``https://.../v1``."""
    model: str
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = MAX_NEW_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    max_rationale_tokens: int = 60
    """Longer rationales are unusable ("overlong"), as for ``HFWorker``."""
    timeout_s: float = 60.0
    retries: int = 3
    """Extra tries after a transient failure (timeout, connection, 408/429/5xx)."""
    backoff_s: float = 1.0
    """Wait before the first retry; doubled after each."""
    concurrency: int = 4
    """Requests in flight."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Environment variable holding the key (sent as a bearer token when set)."""


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _parse(content: str, finish: str | None, n_tokens: int, max_tokens: int) -> tuple[str, str]:
    body = content.split(THINK_CLOSE)[0] if THINK_CLOSE in content else content
    body = body.replace(THINK_OPEN, "").strip()
    if finish == "length" or n_tokens > max_tokens:
        return "", "overlong"
    return (body, "ok") if body else ("", "empty")


class HTTPWorker:
    """Generate rationales through an OpenAI-compatible chat endpoint (see the module docstring)."""

    def __init__(self, spec: HTTPWorkerSpec):
        self.spec = spec
        self.counts: Counter = Counter()
        self._lock = threading.Lock()

    def request_body(self, x: Input, seed: int) -> dict:
        spec = self.spec
        text = "\n".join(t for t in (x.instruction, x.text, spec.prompt) if t)
        content = [{"type": "image_url", "image_url": {"url": _data_url(im)}} for im in x.images()]
        content.append({"type": "text", "text": text})
        return {"model": spec.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": spec.max_new_tokens, "temperature": spec.temperature, "top_p": spec.top_p,
                "seed": seed}

    def _post(self, body: dict) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.spec.api_key_env) if self.spec.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.spec.base_url.rstrip("/") + "/chat/completions",
                                     data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.spec.timeout_s) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def one(self, x: Input, seed: int = 0) -> Rationale:
        """One input's rationale; never raises for what the endpoint does."""
        spec, body = self.spec, self.request_body(x, seed)
        wait, outcome = spec.backoff_s, "error"
        for attempt in range(spec.retries + 1):
            if attempt:
                time.sleep(wait)
                wait *= 2
            try:
                status, raw = self._post(body)
            except (urllib.error.URLError, http.client.HTTPException, socket.timeout, TimeoutError, ConnectionError):
                self._count("transient")
                continue
            if status in RETRY_STATUS:
                self._count("transient")
                continue
            if status != 200:
                outcome = "error"
                break
            try:
                resp = json.loads(raw)
                choice = resp["choices"][0]
                content = choice["message"]["content"] or ""
                n = int((resp.get("usage") or {}).get("completion_tokens") or len(content.split()))
            except (ValueError, KeyError, IndexError, TypeError):
                outcome = "bad_response"
                break
            text, outcome = _parse(content, choice.get("finish_reason"), n, spec.max_rationale_tokens)
            self._count(outcome)
            return Rationale(spec.name, text, outcome, n)
        self._count(outcome)
        return Rationale(spec.name, "", outcome, 0)

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def __call__(self, inputs: Sequence[Input], seed: int = 0) -> list[Rationale]:
        """Rationales in input order; input ``i`` is asked with sampling seed ``seed + i``."""
        with ThreadPoolExecutor(max(1, self.spec.concurrency)) as pool:
            return list(pool.map(lambda ix: self.one(ix[1], seed + ix[0]), enumerate(inputs)))


__all__ = ["HTTPWorker", "HTTPWorkerSpec", "RETRY_STATUS"]
