"""llama.cpp for GGUF models, through xllamacpp, which embeds llama.cpp's own server in-process:
the model's chat template, stop strings, usage, and continuous batching over `n_parallel` slots.

Requests are handed to xllamacpp on worker threads (it releases the GIL); streamed chunks come back
through a callback whose return value tells llama.cpp to stop, which is how a disconnected client
cancels its generation.

`n` answers (up to the n_parallel slots) and a list of prompts run as one llama.cpp request each,
merged into one answer with the usage summed (engines/completions.py); completions come back in
OpenAI's completions shape (cmpl- ids, legacy logprobs, echo). A completion with a `suffix` is
llama.cpp's infill (fill-in-the-middle with the model's FIM tokens), asked of the llama.cpp HTTP server
that xllamacpp embeds on loopback, because its in-process API has no infill.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from shoal.engines.base import ESTIMATE_DEFAULTS, Engine, EngineConfig
from shoal.engines.completions import LegacyLogprobs, Part, answer_id, fan_out, summed_usage
from shoal.errors import InvalidRequest, ShoalError

DEFAULT_PARALLEL: int = ESTIMATE_DEFAULTS["llama.cpp"]["parallel"]
DEFAULT_CONTEXT: int = ESTIMATE_DEFAULTS["llama.cpp"]["context"]  # per slot, capped by the model's own
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's bound; llama.cpp has none and returns the vocabulary)
_END = object()
# OpenAI completions fields that llama.cpp's /infill does not take (or that Shoal sends in its own way)
_NOT_INFILL = frozenset(
    {"prompt", "suffix", "max_tokens", "max_completion_tokens", "n", "echo", "best_of", "stream",
     "stream_options", "user", "logprobs"}
)  # fmt: skip


@dataclass
class _Answer:
    """What the answers of one request share while they are shaped into one."""

    id: str
    chosen_only: bool  # drop each token's alternatives (see bound_logprobs)
    echo: bool  # completions: the prompt goes before each choice's text
    logprobs: LegacyLogprobs = field(default_factory=LegacyLogprobs)
    echoed: set[int] = field(default_factory=set)


def _raise_if_error(result: dict[str, Any]) -> dict[str, Any]:
    """xllamacpp returns llama.cpp's errors as dicts ({"code", "message", "type"} or {"error": {...}})."""
    error = result.get("error") if isinstance(result.get("error"), dict) else None
    if error is None and "code" in result and "choices" not in result:
        error = result
    if error is None:
        return result
    message = str(error.get("message", error))
    if int(error.get("code", 500)) < 500:
        raise InvalidRequest(message)
    raise ShoalError(f"llama.cpp: {message}")


def bound_logprobs(body: dict[str, Any], chat: bool) -> bool:
    """Refuse more than MAX_LOGPROBS alternatives per token. Returns True when the caller wants the
    chosen tokens' log probabilities with no alternatives (chat `logprobs: true` without
    `top_logprobs`, completions `logprobs: 0`): llama.cpp gives no log probabilities at all for 0
    alternatives and 20 when none are named, so one is asked for here and dropped by the caller."""
    key = "top_logprobs" if chat else "logprobs"
    for name in (key, "n_probs"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= MAX_LOGPROBS:
            raise InvalidRequest(f"{name} must be from 0 to {MAX_LOGPROBS}, not {value}")
    if body.get("n_probs"):
        return False
    if chat and body.get("logprobs") is True and not body.get("top_logprobs"):
        body["top_logprobs"] = 1
        return True
    if not chat and body.get("logprobs") == 0 and not isinstance(body.get("logprobs"), bool):
        body["logprobs"] = 1
        return True
    return False


def drop_alternatives(result: dict[str, Any]) -> None:
    """Empty each token's top_logprobs in a response or a streamed chunk (see bound_logprobs)."""
    for choice in result.get("choices") or []:
        logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
        for token in (logprobs or {}).get("content") or []:
            token["top_logprobs"] = []


def start_server(
    config: EngineConfig, opts: dict[str, Any], api_key: str | None = None
) -> tuple[Any, int, int]:
    """llama.cpp's server for `config` with the launch options llama.cpp engines share:
    (server, slots, context per slot). Also used by the LLM reranker. The model's own chat template
    is rendered with Jinja (as `llama-server --jinja`), which is what renders a request's tools."""
    import xllamacpp as xl

    n_parallel = int(opts.get("n_parallel", DEFAULT_PARALLEL))
    slot_context = int(opts.get("n_ctx", min(DEFAULT_CONTEXT, config.context_length or DEFAULT_CONTEXT)))
    params = xl.CommonParams()
    params.model.path = str(config.model_path)
    params.n_parallel = n_parallel
    params.n_ctx = slot_context * n_parallel  # llama.cpp splits n_ctx across the slots
    params.n_gpu_layers = int(opts.get("n_gpu_layers", -1 if config.device == "cuda" else 0))
    if "n_batch" in opts:
        params.n_batch = int(opts["n_batch"])
    params.use_jinja = True
    if "chat_template" in opts:
        params.chat_template = str(opts["chat_template"])
    if config.n_threads:
        params.cpuparams.n_threads = config.n_threads
        params.cpuparams_batch.n_threads = config.n_threads
    # llama.cpp's embedded HTTP server also listens on a loopback port; a random key keeps
    # anything but this process out of it (Shoal serves the runner on its own socket).
    params.api_keys = [api_key or secrets.token_hex(16)]
    params.verbosity = 0
    params.endpoint_metrics = True  # llama.cpp's counters, served by metrics()
    try:
        return xl.Server(params), n_parallel, slot_context
    except RuntimeError as exc:
        raise RuntimeError(f"llama.cpp could not load {config.model_path}: {exc}") from exc


def template_renders_tools(server: Any, api_key: str) -> bool:
    """Whether the model's chat template renders tools: llama.cpp tells by rendering it with and
    without a probe tool (its /props `chat_template_caps`), which the in-process API does not expose."""
    import httpx

    props = httpx.get(
        f"{server.listening_address}/props", headers={"Authorization": f"Bearer {api_key}"}, timeout=30
    )
    props.raise_for_status()
    return bool(props.json().get("chat_template_caps", {}).get("supports_tools"))


class LlamaCppEngine(Engine):
    name = "llama.cpp"

    def load(self) -> None:
        opts = self.pop_options()
        key = secrets.token_hex(16)
        self._server, self.n_parallel, self.slot_context = start_server(self.config, opts, key)
        self._key = key
        self._http: Any = None  # the embedded HTTP server's client, made at the first infill
        self.template_tools = template_renders_tools(self._server, key)
        # One thread per slot plus room for requests waiting on a slot.
        self._pool = ThreadPoolExecutor(max_workers=self.n_parallel * 4, thread_name_prefix="llama")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        del self._server

    def _check(self, body: dict[str, Any], chat: bool) -> tuple[dict[str, Any], bool]:
        """The body llama.cpp gets, and whether to drop the logprobs' alternatives from the answer."""
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        if max_tokens is not None and int(max_tokens) > self.slot_context:
            raise InvalidRequest(
                f"max_tokens={max_tokens} is more than this model's context of {self.slot_context} tokens"
            )
        n = body.get("n") or 1
        if isinstance(n, int) and n > self.n_parallel:
            raise InvalidRequest(
                f"n={n} is more than the {self.n_parallel} answers this model makes at once "
                f"(launch it with n_parallel={n} or more)"
            )
        if not chat and body.get("echo") and body.get("logprobs") is not None:
            raise InvalidRequest(
                "echo with logprobs is not supported on llama.cpp: it gives no log probabilities "
                "for the prompt's tokens; send one of them"
            )
        body = dict(body)
        body.pop("model", None)
        return body, bound_logprobs(body, chat)

    def _shape(self, chunk: dict[str, Any], part: Part, chat: bool, state: _Answer) -> dict[str, Any]:
        """One answer's result or streamed chunk as part of the whole: its choice index, the answer's
        id, the model's uid; completions: logprobs in their own shape and the echoed prompt."""
        chunk.pop("timings", None)
        chunk["id"], chunk["model"] = state.id, self.config.model_uid
        if state.chosen_only:
            drop_alternatives(chunk)
        for choice in chunk.get("choices") or []:
            choice["index"] = part.index
            if not chat:
                choice["logprobs"] = state.logprobs.convert(part.index, choice.get("logprobs"))
                if state.echo and part.index not in state.echoed and part.prompt is not None:
                    choice["text"] = part.prompt + (choice.get("text") or "")
                    state.echoed.add(part.index)
        return chunk

    async def _call(self, fn: Callable[..., Any], body: dict[str, Any], chat: bool) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        checked, chosen_only = self._check(body, chat)
        parts = fan_out(checked, chat)
        state = _Answer(answer_id(chat), chosen_only, bool(body.get("echo")))

        async def one(part: Part) -> dict[str, Any]:
            try:
                result = await loop.run_in_executor(self._pool, fn, part.body)
            except (ValueError, RuntimeError) as exc:  # llama.cpp's own refusal of the request's content
                raise InvalidRequest(f"llama.cpp refused the request: {exc}") from exc
            return self._shape(_raise_if_error(result), part, chat, state)

        results = await asyncio.gather(*(one(part) for part in parts))
        whole = results[0]
        if len(results) > 1:
            whole["choices"] = [c for r in results for c in r.get("choices") or []]
            n = int(checked.get("n") or 1)
            usages = [(p.index % n == 0, r.get("usage") or {}) for p, r in zip(parts, results, strict=True)]
            whole["usage"] = summed_usage(usages)
        return whole

    async def _stream(
        self, fn: Callable[..., Any], body: dict[str, Any], chat: bool
    ) -> AsyncIterator[dict[str, Any]]:
        checked, chosen_only = self._check(body, chat)
        checked["stream"] = True
        parts = fan_out(checked, chat)
        state = _Answer(answer_id(chat), chosen_only, bool(body.get("echo")))
        n = int(checked.get("n") or 1)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()

        def on_chunk_of(part: Part) -> Callable[[dict[str, Any]], bool]:
            def on_chunk(chunk: dict[str, Any]) -> bool:  # runs on a llama.cpp thread
                loop.call_soon_threadsafe(queue.put_nowait, (part, chunk))
                return cancelled.is_set()  # True tells llama.cpp to stop this generation

            return on_chunk

        futures = []
        for part in parts:
            future = loop.run_in_executor(self._pool, fn, part.body, on_chunk_of(part))
            future.add_done_callback(lambda _: queue.put_nowait(_END))
            futures.append(future)
        usages: list[tuple[bool, dict[str, Any]]] = []
        last: dict[str, Any] = {}
        try:
            ended = 0
            while ended < len(futures):
                item = await queue.get()
                if item is _END:
                    ended += 1
                    continue
                part, chunk = item
                chunk = self._shape(_raise_if_error(chunk), part, chat, state)
                if len(parts) > 1 and "usage" in chunk:  # summed over the answers, sent once at the end
                    usages.append((part.index % n == 0, chunk.pop("usage") or {}))
                last = chunk
                yield chunk
            for future in futures:
                try:
                    future.result()
                except (ValueError, RuntimeError) as exc:  # refused before the first chunk: a 400
                    raise InvalidRequest(f"llama.cpp refused the request: {exc}") from exc
            if usages:
                head: dict[str, Any] = {k: last[k] for k in ("id", "object", "created", "model") if k in last}
                yield {**head, "choices": [], "usage": summed_usage(usages)}
        finally:
            cancelled.set()

    def metrics(self) -> dict[str, float]:
        """llama.cpp's Prometheus counters (tokens predicted, decode calls...), as numbers."""
        values: dict[str, float] = {}
        for line in self._server.handle_metrics().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name.removeprefix("llamacpp:")] = float(value)
        return values

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._call(self._server.handle_chat_completions, body, chat=True)

    def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self._stream(self._server.handle_chat_completions, body, chat=True)

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("suffix"):
            return await self._infill(body)
        return await self._call(self._server.handle_completions, body, chat=False)

    async def _infill(self, body: dict[str, Any]) -> dict[str, Any]:
        """Fill-in-the-middle: the text between `prompt` and `suffix`, from llama.cpp's /infill, in
        OpenAI's completions shape. One prompt string and one answer, without echo or logprobs."""
        import httpx

        prompt = body.get("prompt")
        if not isinstance(prompt, str) or (body.get("n") or 1) != 1 or body.get("echo"):
            raise InvalidRequest("suffix (fill-in-the-middle) takes one prompt string, n 1 and no echo")
        if body.get("logprobs") is not None:
            raise InvalidRequest("suffix (fill-in-the-middle) is answered without logprobs: leave them out")
        checked, _ = self._check(body, chat=False)
        sent = {k: v for k, v in checked.items() if k not in _NOT_INFILL}
        sent.update(input_prefix=prompt, input_suffix=body["suffix"], stream=False)
        if checked.get("max_tokens"):
            sent["n_predict"] = checked["max_tokens"]
        if self._http is None:
            self._http = httpx.AsyncClient(
                base_url=self._server.listening_address,
                headers={"Authorization": f"Bearer {self._key}"},
                timeout=httpx.Timeout(None, connect=10),
                trust_env=False,
            )
        response = await self._http.post("/infill", json=sent)
        result = response.json()
        if response.status_code != 200:
            message = str((result.get("error") or {}).get("message", response.text))
            if response.status_code < 500 or response.status_code == 501:  # 501: this model has no FIM
                raise InvalidRequest(f"llama.cpp refused the infill (suffix): {message}")
            raise ShoalError(f"llama.cpp infill: {message}")
        prompt_tokens, completion_tokens = int(result["tokens_evaluated"]), int(result["tokens_predicted"])
        choice = {
            "index": 0,
            "text": result.get("content") or "",
            "logprobs": None,
            "finish_reason": "length" if result.get("stop_type") == "limit" else "stop",
        }
        return {
            "id": answer_id(chat=False),
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.config.model_uid,
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def complete_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self._stream(self._server.handle_completions, body, chat=False)
