"""A deliberately unreliable OpenAI-compatible server, for the HTTP judge and client tests.

A real HTTP server (the standard library's ThreadingHTTPServer) on
127.0.0.1 that answers ``/v1/chat/completions`` by a rule a test can
predict, and fails on demand: each distinct request can fail its first
``fail_first`` attempts with one of the faults below, or every attempt.

Faults: ``"500"`` / ``"503"`` / ``"404"`` (an OpenAI error object with that
status), ``"429"`` (with ``Retry-After: 0``), ``"slow"`` (the answer after
``slow_seconds``), ``"garbage"`` (200 with a body that is not JSON),
``"drop"`` (the connection closed without an answer).

The rule (:func:`rule_reply`): asked to compare answers A and B, it names
the longer one (whichever order they come in); asked for a score, it
replies ``Score: N`` with N the answer's word count, at most 10.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


def rule_reply(prompt: str) -> str:
    pair = re.search(r"(?:Answer|Candidate) A: (.*?)\n\n(?:Answer|Candidate) B: (.*?)\n\n", prompt, re.S)
    if pair:
        return "A" if len(pair.group(1)) >= len(pair.group(2)) else "B"
    answer = re.search(r"(?:Answer|Candidate reply): (.*?)\n\n", prompt, re.S)
    return f"Score: {min(10, len(answer.group(1).split()))}" if answer else "I cannot tell."


def rule_score(answer: str) -> float:
    return float(min(10, len(answer.strip().split())))


class ScriptedServer:
    """Start with ``with ScriptedServer() as server:``; ``server.url`` is its ``/v1`` root."""

    def __init__(self, reply: Callable[[str], str] = rule_reply) -> None:
        self.reply = reply
        self.fault: str | None = None
        self.fail_first = 0  # attempts of each distinct request that fail with ``fault``; -1: every attempt
        self.slow_seconds = 2.0
        self.bodies: list[dict[str, Any]] = []
        self.authorizations: list[str | None] = []
        self.attempts: dict[str, int] = {}
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> "ScriptedServer":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _fault_for(self, body: dict[str, Any]) -> str | None:
        key = json.dumps(body, sort_keys=True)
        with self.lock:
            self.bodies.append(body)
            self.attempts[key] = attempt = self.attempts.get(key, 0) + 1
        if self.fault and (self.fail_first < 0 or attempt <= self.fail_first):
            return self.fault
        return None

    def _handler(self) -> type:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                server.authorizations.append(self.headers.get("authorization"))
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._answer(body, server._fault_for(body))
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _answer(self, body: dict[str, Any], fault: str | None) -> None:
                if fault == "drop":
                    self.close_connection = True
                    return
                if fault == "slow":
                    time.sleep(server.slow_seconds)
                if fault in ("500", "503", "404", "429"):
                    headers = {"Retry-After": "0"} if fault == "429" else {}
                    self._send(int(fault), json.dumps({"error": {"message": f"scripted {fault}"}}).encode(), headers)
                    return
                if fault == "garbage":
                    self._send(200, b"<html>upstream proxy error</html>")
                    return
                prompt = body["messages"][-1]["content"]
                text = server.reply(prompt)
                answer = {"id": "x", "object": "chat.completion", "model": body.get("model"),
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                       "finish_reason": "stop"}]}
                self._send(200, json.dumps(answer).encode())

            def _send(self, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (a timeout test)
                    pass

        return Handler
