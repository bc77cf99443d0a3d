"""Talking to an OpenAI-compatible judge: which key goes where, the client, retries, budget.

* Key scope: ``OPENAI_API_KEY`` is sent only to the OpenAI API (no ``judge.base_url``, or
  one whose host is ``api.openai.com`` over https). Any other endpoint gets the key in the
  variable named by ``judge.api_key_env`` (default ``HHDPO_JUDGE_API_KEY``), or no
  ``Authorization`` header at all when that variable is unset. ``OPENAI_BASE_URL`` is not
  read: the endpoint comes from the config only, so no variable can redirect the key.
* One ``AsyncOpenAI`` client (Responses API, or chat completions with ``api="chat"``) with
  ``max_retries=0``: retries are ours (exponential backoff with jitter, honouring
  ``Retry-After``/``retry-after-ms``) so they are testable and the same for every server.
  Auth/model errors (401/403/404, ``insufficient_quota``) raise :class:`JudgeFatal`.
* Budget caps (``max_requests``, ``max_tokens``) stop new requests.
* :func:`run_all` runs the concurrent requests' workers like ``asyncio.TaskGroup`` (3.10 has none).
* With no ``OPENAI_API_KEY`` and no base URL, :func:`judge_endpoint` serves a local vLLM
  judge (:mod:`hhdpo.evaluation.serve`) for ``judge.serve_model``; it is sent no key.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import urlsplit

from hhdpo.core.config import JudgeConfig, redact
from hhdpo.core.errors import BadInput
from hhdpo.evaluation.pairwise import CHOSEN_ID
from hhdpo.evaluation.verdict import SCHEMA_NAME, TEMPLATES

OPENAI_URL = "https://api.openai.com/v1"
# headers the SDK fills from OPENAI_ORG_ID / OPENAI_PROJECT_ID: OpenAI's business only
_OPENAI_ACCOUNT_HEADERS = ("openai-organization", "openai-project")


class BudgetExhausted(Exception):
    """A budget cap was reached; no new requests are sent."""


class JudgeFatal(BadInput):
    """An error no retry can fix (bad key, unknown model, no quota): bad config, the run stops."""


class RequestFailed(Exception):
    """One request failed for good (after retries, or a 4xx that retrying cannot fix)."""


@dataclass
class JudgeSettings:
    """A judging run: the ``judge`` config section plus the options that only shape this run."""

    judge: JudgeConfig = field(default_factory=JudgeConfig)
    retry_errors: bool = True  # re-judge saved verdicts that carry judge_error (a rerun completes the run)
    structured: bool = True  # request JSON-schema output (dropped automatically if refused)
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    chosen_id: str = CHOSEN_ID
    progress: bool = True


# --------------------------------------------------------------------------- endpoint and key


def is_openai_api(base_url: Optional[str]) -> bool:
    """True for the OpenAI API itself: no base URL, or https://api.openai.com[...]."""
    if not base_url:
        return True
    u = urlsplit(base_url)
    return u.scheme == "https" and u.hostname == "api.openai.com"


def endpoint_key(base_url: Optional[str], api_key_env: str) -> Optional[str]:
    """The key for this endpoint, from the environment; None = send no Authorization header."""
    return os.environ.get("OPENAI_API_KEY" if is_openai_api(base_url) else api_key_env) or None


def _drop_headers(names: tuple[str, ...]):
    """An httpx request hook removing ``names`` on the wire, whatever the SDK or
    ``OPENAI_CUSTOM_HEADERS`` put there (the SDK insists on an api_key)."""
    async def hook(request) -> None:
        for name in names:
            request.headers.pop(name, None)
    return hook


def make_client(base_url: Optional[str], timeout: float, api_key_env: str = JudgeConfig.api_key_env,
                keyless: bool = False):
    """AsyncOpenAI for ``base_url`` with our own retry policy and the key scope above;
    ``keyless`` sends no key (a server we started ourselves)."""
    from openai import AsyncOpenAI, DefaultAsyncHttpxClient

    openai_api = is_openai_api(base_url)
    key = None if keyless else endpoint_key(base_url, api_key_env)
    if openai_api and not key:
        raise JudgeFatal("OPENAI_API_KEY is not set (or set judge.base_url to an OpenAI-compatible server)")
    drop = () if openai_api else _OPENAI_ACCOUNT_HEADERS + (() if key else ("authorization",))
    # an explicit Authorization wins over one from OPENAI_CUSTOM_HEADERS
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    http = DefaultAsyncHttpxClient(event_hooks={"request": [_drop_headers(drop)]} if drop else None)
    return AsyncOpenAI(api_key=key or "no-key", base_url=base_url or OPENAI_URL, default_headers=headers,
                       timeout=timeout, max_retries=0, http_client=http)


@contextlib.contextmanager
def judge_endpoint(jc: JudgeConfig, log_file=None):
    """Yield ``(judge config to use, served)``: ``jc`` itself when it names a base URL or
    ``OPENAI_API_KEY`` is set; else (the offline default) a local vLLM server for
    ``jc.serve_model`` with ``base_url``/``model`` pointing at it, stopped on exit."""
    if jc.base_url or os.environ.get("OPENAI_API_KEY"):
        yield jc, False
        return
    from hhdpo.evaluation.serve import VLLMServer

    print(f"hhdpo judge: no OPENAI_API_KEY and no judge.base_url: serving {jc.serve_model!r} locally "
          "with vLLM (takes ~30 s to start on CPU)", file=sys.stderr)
    with VLLMServer(jc.serve_model, log_file=log_file) as server:
        yield dataclasses.replace(jc, base_url=server.base_url, model=server.served_name), True


# --------------------------------------------------------------------------- retries and budget


def retry_after_seconds(headers) -> Optional[float]:
    """Server-requested wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(ra)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())


def backoff_delay(attempt: int, base: float, cap: float, retry_after: Optional[float] = None,
                  rng: random.Random | None = None) -> float:
    """Delay before retry ``attempt`` (0-based): the server's Retry-After if given (plus up to
    10 % jitter so clients do not return in lockstep), else equal-jitter exponential backoff."""
    rng = rng or random
    if retry_after is not None:
        return min(retry_after, 300.0) * (1.0 + 0.1 * rng.random())
    d = min(cap, base * (2 ** attempt))
    return d / 2 + rng.uniform(0, d / 2)


class Budget:
    def __init__(self, max_requests: Optional[int], max_tokens: Optional[int]):
        self.max_requests, self.max_tokens = max_requests, max_tokens
        self.requests = self.input_tokens = self.output_tokens = 0
        self.hit: Optional[str] = None

    def take_request(self) -> None:
        if self.hit is None and self.max_tokens is not None and self.input_tokens + self.output_tokens >= self.max_tokens:
            self.hit = f"max_tokens={self.max_tokens} reached ({self.input_tokens + self.output_tokens} tokens used)"
        if self.hit is None and self.max_requests is not None and self.requests >= self.max_requests:
            self.hit = f"max_requests={self.max_requests} reached"
        if self.hit:
            raise BudgetExhausted(self.hit)
        self.requests += 1

    def add_usage(self, inp: int, out: int) -> None:
        self.input_tokens += inp
        self.output_tokens += out


# --------------------------------------------------------------------------- one request


async def run_all(coros) -> list[BaseException]:
    """Run coroutines as tasks like ``asyncio.TaskGroup`` (not in Python 3.10): the first failure
    cancels the rest; once all have ended, returns the failures (not cancellations) in the order
    they happened. Cancelled from outside, it cancels and awaits every task, then re-raises the
    cancellation unless a task failed."""
    errors: list[BaseException] = []

    def failed(t: asyncio.Task):
        if not t.cancelled() and t.exception() is not None:
            errors.append(t.exception())

    tasks = [asyncio.create_task(c) for c in coros]
    for t in tasks:
        t.add_done_callback(failed)
    cancelled = None
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except asyncio.CancelledError as e:
        cancelled = e
    for t in tasks:
        t.cancel()  # a no-op on the tasks that ended
    await asyncio.gather(*tasks, return_exceptions=True)
    if cancelled is not None and not errors:
        raise cancelled
    return errors


def _usage(resp, api: str) -> tuple[int, int]:
    u = getattr(resp, "usage", None)
    if u is None:
        return 0, 0
    if api == "chat":
        return int(getattr(u, "prompt_tokens", 0) or 0), int(getattr(u, "completion_tokens", 0) or 0)
    return int(getattr(u, "input_tokens", 0) or 0), int(getattr(u, "output_tokens", 0) or 0)


def _text(resp, api: str) -> tuple[str, bool]:
    """The verdict text, and whether it was cut off by the output-token cap."""
    if api == "chat":
        choice = resp.choices[0] if resp.choices else None
        msg = choice.message if choice else None
        text = (msg.content or getattr(msg, "refusal", None) or "") if msg else ""
        return text, getattr(choice, "finish_reason", None) == "length"
    return getattr(resp, "output_text", "") or "", getattr(resp, "status", None) == "incomplete"


def error_message(e: Exception) -> str:
    msg = getattr(e, "message", None) or str(e) or type(e).__name__
    code = getattr(e, "status_code", None)
    return redact(f"HTTP {code}: {msg}" if code else f"{type(e).__name__}: {msg}")[:500]


class JudgeAPI:
    """Sends judgement requests to one endpoint with retries, shared across files so the budget is global."""

    def __init__(self, client, settings: JudgeSettings, log=None):
        self.client, self.s, self.jc = client, settings, settings.judge
        self.schema = TEMPLATES[self.jc.template].schema
        self.budget = Budget(self.jc.max_requests, self.jc.max_tokens)
        self.use_schema = settings.structured
        self.use_temperature = self.jc.temperature is not None
        self.rng = random.Random()
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self._sem = asyncio.Semaphore(self.jc.concurrency)  # bounds requests, also with both orders

    async def _call(self, messages: list[dict]):
        jc = self.jc
        kw: dict[str, Any] = {"model": jc.model}
        if self.use_temperature:
            kw["temperature"] = jc.temperature
        schema = {"name": SCHEMA_NAME, "schema": self.schema, "strict": True}
        if jc.api == "chat":
            if self.use_schema:
                kw["response_format"] = {"type": "json_schema", "json_schema": schema}
            return await self.client.chat.completions.create(
                messages=messages, max_completion_tokens=jc.max_output_tokens, **kw)
        if self.use_schema:
            kw["text"] = {"format": {"type": "json_schema", **schema}}
        return await self.client.responses.create(
            input=messages, max_output_tokens=jc.max_output_tokens, store=False, **kw)

    def _drop_refused_option(self, e) -> bool:
        """A 400 naming an option we can live without (schema, temperature): drop it, say so once."""
        msg = str(getattr(e, "message", "") or e).lower()
        if self.use_schema and any(k in msg for k in ("json_schema", "response_format", "text.format")):
            self.use_schema = False
            self.log("judge: server refused JSON-schema output; continuing with the tolerant text parser")
            return True
        if self.use_temperature and "temperature" in msg:
            self.use_temperature = False
            self.log("judge: server refused 'temperature'; continuing without it")
            return True
        return False

    async def request(self, messages: list[dict]) -> tuple[str, bool, int, int]:
        """Send one judgement request; returns (text, truncated, input_tokens, output_tokens).

        Retries 408/409/429/5xx, timeouts and connection errors up to ``max_retries``
        times; raises JudgeFatal for errors that would fail every request, RequestFailed
        for a request that failed for good, BudgetExhausted when no budget is left.
        """
        import openai

        attempt = 0
        while True:
            self.budget.take_request()
            try:
                async with self._sem:
                    resp = await self._call(messages)
            except openai.APIStatusError as e:
                code = e.status_code
                if code in (401, 403, 404) or getattr(e, "code", None) == "insufficient_quota":
                    raise JudgeFatal(error_message(e)) from None
                if code in (400, 422) and self._drop_refused_option(e):
                    continue  # not the server's fault: retry at once, not counted
                if code not in (408, 409, 429) and code < 500:
                    raise RequestFailed(error_message(e)) from None
                wait = retry_after_seconds(e.response.headers if e.response is not None else None)
                last = error_message(e)
            except (openai.APITimeoutError, openai.APIConnectionError) as e:
                wait, last = None, error_message(e)
            else:
                inp, out = _usage(resp, self.jc.api)
                self.budget.add_usage(inp, out)
                return (*_text(resp, self.jc.api), inp, out)
            if attempt >= self.jc.max_retries:
                raise RequestFailed(f"{last} (gave up after {attempt + 1} attempts)")
            await asyncio.sleep(backoff_delay(attempt, self.s.backoff_base, self.s.backoff_max, wait, self.rng))
            attempt += 1
