"""A scriptable fake OpenAI server for the judge's tests and benchmark (stdlib only).

Speaks the wire format of ``POST /v1/responses`` (a Response object: ``output`` with one
assistant message of ``output_text``, ``usage``, ``status``), ``POST /v1/chat/completions``
and ``GET /v1/models`` on 127.0.0.1 (random port, served from a thread, or as a
subprocess via ``python tests/fake_responses_server.py``).

Verdicts are deterministic from the request: the LONGER response wins (equal length:
tie, or A under the DPO template, which has no tie); ``mode="always_a"`` simulates a
position-biased judge. It recognises both hhdpo templates, answers with JSON that fits
the requested JSON schema when one is sent, and otherwise in the template's own format.

Faults are scripted per pair idx (``faults={idx: ["429 retry-after-ms=300", "500"]}``):
each request for that idx consumes the next entry; when the list is used up the request
succeeds. The pair is recognised from its prompt text (``set_index(pairs)``). Faults:

    429 [retry-after=S] [retry-after-ms=MS]   rate limit (optionally with a wait hint)
    500 | 503 | 400 | 401                     HTTP errors
    slow                                      sleep ``slow_seconds`` then answer (client times out)
    drop                                      close the connection without a response
    malformed | nonjson | badwinner           unparseable / invalid verdicts
    prose_json | fence | winner_line | truncated   tolerant-parser cases (a valid verdict inside)
    echo_auth                                 400 whose message echoes the Authorization header

Every request is logged in ``requests`` (idx, path, fault, status, auth = the Authorization
header or None when absent, openai_headers = names of OpenAI-* headers, structured, t).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_STRICT_RE = re.compile(r"\[Prompt\]\n(.*)\n\n\[Response A\]\n(.*)\n\n\[Response B\]\n(.*)\n\nReturn JSON only\.", re.S)
_DPO_RE = re.compile(r"Query: (.*)\n\nResponse A:\n(.*)\n\nResponse B:\n(.*)\n\nFIRST provide", re.S)


def _user_text(body: dict, path: str) -> str:
    msgs = body.get("messages") if path.endswith("/chat/completions") else body.get("input")
    if isinstance(msgs, str):
        return msgs
    for m in reversed(msgs or []):
        if m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, list):
                return "".join(part.get("text", "") for part in c if isinstance(part, dict))
            return c or ""
    return ""


def _schema(body: dict, path: str):
    if path.endswith("/chat/completions"):
        rf = body.get("response_format") or {}
        return (rf.get("json_schema") or {}) if rf.get("type") == "json_schema" else None
    fmt = (body.get("text") or {}).get("format") or {}
    return fmt if fmt.get("type") == "json_schema" else None


class FakeOpenAIServer:
    def __init__(self, latency: float = 0.0, faults: dict | None = None, mode: str = "longer",
                 schema_support: bool = True, slow_seconds: float = 3.0, fixed_usage: tuple | None = None):
        self.latency = latency
        self.faults = {k: list(v) for k, v in (faults or {}).items()}
        self.mode = mode
        self.schema_support = schema_support
        self.slow_seconds = slow_seconds
        self.fixed_usage = fixed_usage
        self.index: dict[str, object] = {}
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.httpd = None
        self.thread = None

    # ---- lifecycle

    def start(self, port: int = 0) -> "FakeOpenAIServer":
        fake = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False
            request_queue_size = 512  # bursts of concurrent connects must not hit SYN retries
            allow_reuse_address = True

        Server.fake = fake
        self.httpd = Server(("127.0.0.1", port), _Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # ---- scripting and inspection

    def set_index(self, pairs) -> None:
        """Map each pair's prompt text to its idx, so faults and counts speak idx."""
        self.index.update({p["prompt"].strip(): p["idx"] for p in pairs})

    def counts(self) -> dict:
        out: dict = {}
        for r in self.requests:
            out[r["idx"]] = out.get(r["idx"], 0) + 1
        return out

    # ---- the decision

    def answer(self, user: str, schema: dict | None) -> tuple[object, str]:
        """(idx, verdict text) for a judge request, or (None, '') when unrecognised."""
        m, tpl = _STRICT_RE.search(user), "strict"
        if m is None:
            m, tpl = _DPO_RE.search(user), "dpo"
        if m is None:
            return None, ""
        prompt, a, b = m.group(1).strip(), m.group(2), m.group(3)
        idx = self.index.get(prompt, hashlib.sha1(prompt.encode()).hexdigest()[:8])
        if self.mode == "always_a":
            w = "a"
        else:
            w = "a" if len(a) > len(b) else "b" if len(b) > len(a) else ("tie" if tpl == "strict" else "a")
        why = f"Response {w.upper()} is longer and more complete." if w != "tie" else "Both are equally good."
        props = ((schema or {}).get("schema") or {}).get("properties") or {}
        if "more_helpful" in props or (schema is None and tpl == "dpo"):
            if schema is not None:
                return idx, json.dumps({"comparison": why, "more_helpful": w.upper()})
            return idx, f"Comparison: {why}\nMore helpful: {w.upper()}"
        return idx, json.dumps({"winner": w, "explanation": why})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real API server
    disable_nagle_algorithm = True  # else Nagle + delayed ACK add ~40 ms per small response

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, status: int, obj, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): nothing to do

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": "fake-judge", "object": "model", "owned_by": "test"}]})
        else:
            self._send(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

    def do_POST(self):
        fake: FakeOpenAIServer = self.server.fake
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n) or b"{}")
        path = self.path.rstrip("/")
        if path not in ("/v1/responses", "/v1/chat/completions"):
            return self._send(404, {"error": {"message": f"no route {path}", "type": "invalid_request_error"}})
        schema = _schema(body, path)
        user = _user_text(body, path)
        idx, text = fake.answer(user, schema)
        auth = self.headers.get("Authorization")  # None: no header at all
        with fake.lock:
            script = fake.faults.get(idx)
            fault = script.pop(0) if script else None
            log = {"idx": idx, "path": path, "fault": fault, "auth": auth,
                   "openai_headers": sorted(k.lower() for k in self.headers if k.lower().startswith("openai-")),
                   "structured": schema is not None,
                   "schema_strict": bool(schema and schema.get("strict")), "model": body.get("model"),
                   "t": time.monotonic(), "status": 200}
            fake.requests.append(log)
        if fake.latency:
            time.sleep(fake.latency)
        if schema is not None and not fake.schema_support:
            log["status"] = 400
            return self._send(400, {"error": {"message": "Invalid parameter: 'text.format' of type 'json_schema' "
                                              "is not supported with this model.", "type": "invalid_request_error",
                                              "param": "text.format", "code": None}})
        if fault:
            kind, *opts = fault.split()
            opts = dict(o.split("=", 1) for o in opts)
            if kind in ("429", "500", "503", "400", "401"):
                log["status"] = int(kind)
                headers = {}
                if "retry-after" in opts:
                    headers["Retry-After"] = opts["retry-after"]
                if "retry-after-ms" in opts:
                    headers["retry-after-ms"] = opts["retry-after-ms"]
                msg = {"429": "Rate limit reached for requests", "401": "Incorrect API key provided"}.get(kind, "boom")
                return self._send(int(kind), {"error": {"message": msg, "type": "fake", "code": None}}, headers)
            if kind == "echo_auth":
                log["status"] = 400
                return self._send(400, {"error": {"message": f"bad request from {auth}", "type": "fake", "code": None}})
            if kind == "drop":
                log["status"] = 0
                self.close_connection = True
                return
            if kind == "slow":
                time.sleep(fake.slow_seconds)
            text = {
                "malformed": '{"winner": a, "explanation": "unquoted value"',
                "nonjson": "Both responses have their merits; it is hard to say.",
                "badwinner": json.dumps({"winner": "c", "explanation": "neither"}),
                "prose_json": f"After careful thought, here is my verdict: {text} I hope this helps.",
                "fence": f"```json\n{text}\n```",
                "winner_line": self._winner_line(text),
                "truncated": text[: text.find('"', text.find(":") + 3) + 1] + ', "explanation": "Response',
            }.get(kind, text)
        self._respond(path, body, text, fake, truncated=fault == "truncated")

    @staticmethod
    def _winner_line(text: str) -> str:
        obj = json.loads(text)
        w = obj.get("winner") or obj.get("more_helpful")
        return f"Having compared both, I prefer this one.\nWinner: {w.upper()}"

    def _respond(self, path: str, body: dict, text: str, fake: FakeOpenAIServer, truncated: bool = False) -> None:
        if fake.fixed_usage:
            inp, out = fake.fixed_usage
        else:
            inp, out = len(_user_text(body, path).split()), len(text.split())
        now = int(time.time())
        rid = hashlib.sha1(f"{now}{text}{time.monotonic()}".encode()).hexdigest()[:24]
        if path.endswith("/chat/completions"):
            return self._send(200, {
                "id": f"chatcmpl-{rid}", "object": "chat.completion", "created": now, "model": body.get("model"),
                "choices": [{"index": 0, "finish_reason": "length" if truncated else "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": text, "refusal": None}}],
                "usage": {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out}})
        self._send(200, {
            "id": f"resp_{rid}", "object": "response", "created_at": now,
            "status": "incomplete" if truncated else "completed", "model": body.get("model"), "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if truncated else None, "instructions": None,
            "metadata": {}, "parallel_tool_calls": True, "temperature": body.get("temperature"),
            "tool_choice": "auto", "tools": [], "top_p": 1.0, "text": body.get("text") or {"format": {"type": "text"}},
            "output": [{"type": "message", "id": f"msg_{rid}", "status": "incomplete" if truncated else "completed",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": text, "annotations": []}]}],
            "usage": {"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out,
                      "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}})


# --------------------------------------------------------------------------- HH test data

HH_FILE = "harmless-base-test.jsonl.gz"


def hh_data_path() -> Path:
    """The read-only HH test file: $HH_DATA (a file or its directory), else ../shared/data/hh-rlhf/."""
    env = os.environ.get("HH_DATA")
    if env:
        p = Path(env)
        return p / HH_FILE if p.is_dir() else p
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf" / HH_FILE


def _split_last_turn(text: str) -> tuple[str, str]:
    cut = text.rfind("\n\nAssistant:") + len("\n\nAssistant:")
    return text[:cut], text[cut:].strip()


def hh_generation_records(n: int, model_id: str = "policy_model") -> list[dict]:
    """n generation records in ``hhdpo generate``'s format built from real HH rows:
    ``response`` is the HH *rejected* reply (a realistic weaker model), ``HH_response`` the
    chosen one. Prompts are unique (the fake judge recognises pairs by prompt)."""
    path = hh_data_path()
    if not path.is_file():
        raise FileNotFoundError(f"real HH data not found at {path}; set HH_DATA to the file or its directory")
    rows, seen = [], set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            ex = json.loads(line)
            prompt, chosen = _split_last_turn(ex["chosen"])
            prompt_r, rejected = _split_last_turn(ex["rejected"])
            if prompt != prompt_r or prompt in seen or not chosen or not rejected or len(chosen) == len(rejected):
                continue
            seen.add(prompt)
            rows.append((prompt, chosen, rejected))
            if len(rows) == n:
                break
    if len(rows) < n:
        raise ValueError(f"{path}: only {len(rows)} usable rows, {n} wanted")
    return [{"idx": i, "prompt": p, "response": r, "HH_response": c, "model_id": model_id,
             "dataset": "Anthropic/hh-rlhf", "split": "test", "max_prompt_length": 512, "max_new_tokens": 256,
             "do_sample": True, "temperature": 0.7, "top_p": 0.9} for i, (p, c, r) in enumerate(rows)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Run the fake OpenAI server until killed; prints 'PORT <n>'.")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    args = p.parse_args(argv)
    srv = FakeOpenAIServer(latency=args.latency).start(args.port)
    print(f"PORT {srv.port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
