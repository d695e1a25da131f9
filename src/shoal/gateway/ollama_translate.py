"""Pure translation between the Ollama API and the OpenAI-shaped bodies the runners speak.

Requests: an Ollama chat/generate/embed body becomes the OpenAI body of /v1/chat/completions,
/v1/completions or /v1/embeddings (refusing, with InvalidRequest, what Shoal cannot honour).
Answers: the runner's SSE chunks are folded by `Turn` into Ollama's NDJSON lines, or into one
whole answer; the runner is always asked to stream, so the durations are measured the same way
for both. Running models are described in Ollama's shape for /api/tags, /api/ps and /api/show.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from shoal.errors import InvalidRequest
from shoal.gateway.upstream import upstream_error
from shoal.hub import names as hub_names
from shoal.protocol.ollama import Format
from shoal.protocol.ollama import OllamaChatRequest as ChatRequest
from shoal.protocol.ollama import OllamaEmbeddingsRequest as EmbeddingsRequest
from shoal.protocol.ollama import OllamaEmbedRequest as EmbedRequest
from shoal.protocol.ollama import OllamaGenerateRequest as GenerateRequest
from shoal.protocol.ollama import OllamaOptions as Options
from shoal.services.replicas import RunningModel

LATEST = ":latest"
OLLAMA_VERSION = "0.12.0"  # the Ollama API version whose shapes these routes follow
FOREVER = datetime(2318, 1, 1, tzinfo=UTC)  # Ollama's expires_at for a model kept loaded forever
# Ollama option → the OpenAI-side (llama.cpp) field that means the same; the rest are ignored.
SAME_OPTIONS = (
    "temperature", "top_p", "top_k", "min_p", "typical_p", "seed", "stop", "presence_penalty",
    "frequency_penalty", "repeat_last_n", "mirostat", "mirostat_tau", "mirostat_eta",
)  # fmt: skip
FINISH = {"stop": "stop", "length": "length", "tool_calls": "stop", "content_filter": "stop"}


def model_uid(name: str) -> str:
    """Ollama names carry a tag: NAME and NAME:latest are both the model with uid NAME; a hub name
    (hf.co/ORG/REPO:QUANT) is the model its launch named by default (hub.names.HubRef.default_uid)."""
    if hub_names.is_hub_name(name):
        ref = hub_names.parse(name)
        assert ref is not None
        return ref.default_uid()
    return name.removesuffix(LATEST)


def ollama_name(uid: str) -> str:
    return f"{uid}{LATEST}"


def now_iso(moment: datetime | None = None) -> str:
    return (moment or datetime.now(UTC)).isoformat().replace("+00:00", "Z")


# ---- requests ------------------------------------------------------------------------------------
def sampling(options: Options | None, engine: str) -> dict[str, Any]:
    """The OpenAI body's sampling fields for Ollama's `options`."""
    if options is None:
        return {}
    out = {k: getattr(options, k) for k in SAME_OPTIONS if getattr(options, k) is not None}
    if options.repeat_penalty is not None:
        name = "repeat_penalty" if engine == "llama.cpp" else "repetition_penalty"
        out[name] = options.repeat_penalty
    if options.num_predict is not None:
        if options.num_predict == 0:
            raise InvalidRequest("options.num_predict: 0 generates nothing; use a positive count or -1")
        if options.num_predict > 0:  # -1 (no limit) and -2 (fill the context): no max_tokens
            out["max_tokens"] = options.num_predict
    return out


def response_format(format_: Format | None) -> dict[str, Any] | None:
    if not format_:
        return None
    if format_ == "json":
        return {"type": "json_object"}
    assert isinstance(format_, dict)
    return {"type": "json_schema", "json_schema": {"name": "format", "schema": format_, "strict": True}}


def _common(body: ChatRequest | GenerateRequest, engine: str) -> dict[str, Any]:
    if body.think:
        raise InvalidRequest(f"think: {body.model!r} has no thinking switch in Shoal")
    out: dict[str, Any] = {
        "model": model_uid(body.model),
        "stream": True,
        "stream_options": {"include_usage": True},
        **sampling(body.options, engine),
    }
    if (fmt := response_format(body.format)) is not None:
        out["response_format"] = fmt
    if body.logprobs:
        out["logprobs"] = True
        if body.top_logprobs:
            out["top_logprobs"] = body.top_logprobs
    return out


def chat_messages(body: ChatRequest) -> list[dict[str, Any]]:
    """Ollama messages as OpenAI ones: tool calls get ids, and each tool result the id of its call."""
    out: list[dict[str, Any]] = []
    pending: list[str] = []  # ids of the last assistant message's calls, not yet answered
    for i, message in enumerate(body.messages):
        if message.images:
            raise InvalidRequest(f"messages[{i}].images: Shoal's Ollama API takes no images")
        item: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.role == "assistant" and message.tool_calls:
            pending = [f"call_{i}_{j}" for j in range(len(message.tool_calls))]
            item["tool_calls"] = [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        # json, not orjson: a client's arguments may hold integers past 64 bits
                        "arguments": json.dumps(call.function.arguments, ensure_ascii=False),
                    },
                }
                for call_id, call in zip(pending, message.tool_calls, strict=True)
            ]
        elif message.role == "tool":
            if pending:
                item["tool_call_id"] = pending.pop(0)
            if message.tool_name:
                item["name"] = message.tool_name
        out.append(item)
    return out


def chat_body(body: ChatRequest, engine: str) -> dict[str, Any]:
    out = {**_common(body, engine), "messages": chat_messages(body)}
    if body.tools:
        out["tools"] = body.tools
    return out


def generate_body(body: GenerateRequest, engine: str, templated: bool) -> dict[str, Any]:
    """/api/generate: through the model's chat template (Ollama's default), or as a raw completion
    (`raw`, or a model without a chat template, whose `system` is then ignored as Ollama does)."""
    for field in ("template", "suffix", "context", "images"):
        if getattr(body, field):
            raise InvalidRequest(f"{field}: not supported by Shoal's /api/generate (docs/api-compat.md)")
    out = _common(body, engine)
    if templated and not body.raw:
        system = [{"role": "system", "content": body.system}] if body.system else []
        return {**out, "messages": [*system, {"role": "user", "content": body.prompt}]}
    if body.logprobs:
        raise InvalidRequest("logprobs: not supported with raw (or template-less) generation")
    return {**out, "prompt": body.prompt}


def embed_body(body: EmbedRequest | EmbeddingsRequest) -> dict[str, Any]:
    """Ollama truncates an over-long input unless /api/embed says `truncate: false` (the legacy
    /api/embeddings has no such field)."""
    if isinstance(body, EmbeddingsRequest):
        return {"model": model_uid(body.model), "input": body.prompt, "truncate": True}
    out: dict[str, Any] = {
        "model": model_uid(body.model),
        "input": body.input,
        "truncate": body.truncate is not False,
    }
    if body.dimensions is not None:
        out["dimensions"] = body.dimensions
    return out


# ---- answers -------------------------------------------------------------------------------------
class Turn:
    """One answer being folded from OpenAI chunks into Ollama's shape (chat: `message`; generate:
    `response`). Durations are nanoseconds from `clock`, as Ollama reports them."""

    def __init__(
        self,
        name: str,
        chat: bool,
        started: int,
        load_ns: int,
        clock: Callable[[], int] = time.perf_counter_ns,
    ) -> None:
        self.name, self.chat, self.clock = name, chat, clock
        self.started, self.load_ns = started, load_ns  # the request's start; time spent loading
        self.forwarded = clock()
        self.first: int | None = None
        self.content: list[str] = []
        self.thinking: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.logprobs: list[dict[str, Any]] = []
        self.finish: str | None = None
        self.usage: dict[str, Any] = {}
        self.pieces = 0
        self.error: str | None = None
        self.error_status = 500

    def _line(self, **fields: Any) -> dict[str, Any]:
        return {"model": self.name, "created_at": now_iso(), **fields}

    def _text(self, content: str, thinking: str | None = None) -> dict[str, Any]:
        if not self.chat:
            return {"response": content, **({"thinking": thinking} if thinking else {})}
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if thinking:
            message["thinking"] = thinking
        return {"message": message}

    def take(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """Fold one OpenAI chunk; the Ollama line to stream for it, if it carries text."""
        if "error" in chunk:
            error = upstream_error(chunk["error"])
            self.error, self.error_status = error.message, error.status
            return None
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        choices = chunk.get("choices") or []
        if not choices:
            return None
        choice = choices[0]
        self.finish = choice.get("finish_reason") or self.finish
        delta = choice.get("delta") or {}
        text = delta.get("content") if "delta" in choice else choice.get("text")  # chat / completions
        thinking = delta.get("reasoning_content")
        for call in delta.get("tool_calls") or []:
            self._add_call(call)
        logprobs = (choice.get("logprobs") or {}).get("content") or []
        self.logprobs.extend(logprobs)
        if not text and not thinking:
            return None
        self.first = self.first or self.clock()
        self.pieces += 1
        self.content.append(text or "")
        self.thinking.append(thinking or "")
        line = self._line(**self._text(text or "", thinking), done=False)
        if logprobs:
            line["logprobs"] = logprobs
        return line

    def _add_call(self, delta: dict[str, Any]) -> None:
        call = self.calls.setdefault(int(delta.get("index", len(self.calls))), {"name": "", "arguments": ""})
        function = delta.get("function") or {}
        call["name"] += function.get("name") or ""
        call["arguments"] += function.get("arguments") or ""

    def tool_calls(self) -> list[dict[str, Any]]:
        out = []
        for _, call in sorted(self.calls.items()):
            try:
                arguments = orjson.loads(call["arguments"] or "{}")
            except orjson.JSONDecodeError:
                arguments = {"arguments": call["arguments"]}  # not JSON: kept, not lost
            out.append({"function": {"name": call["name"], "arguments": arguments}})
        return out

    def _stats(self) -> dict[str, Any]:
        end = self.clock()
        first = self.first or end
        return {
            "done": True,
            "done_reason": FINISH.get(self.finish or "stop", self.finish),
            "total_duration": end - self.started,
            "load_duration": self.load_ns,
            "prompt_eval_count": int(self.usage.get("prompt_tokens") or 0),
            "prompt_eval_duration": first - self.forwarded,
            "eval_count": int(self.usage.get("completion_tokens") or self.pieces),
            "eval_duration": end - first,
        }

    def calls_line(self) -> dict[str, Any] | None:
        """Streaming: the tool calls, whole, in one line before the last (as Ollama sends them)."""
        if not self.calls or not self.chat:
            return None
        return self._line(
            message={"role": "assistant", "content": "", "tool_calls": self.tool_calls()}, done=False
        )

    def last_line(self) -> dict[str, Any]:
        return self._line(**self._text(""), **self._stats())

    def whole(self) -> dict[str, Any]:
        answer = self._line(**self._text("".join(self.content), "".join(self.thinking) or None))
        if self.chat and self.calls:
            answer["message"]["tool_calls"] = self.tool_calls()
        if self.logprobs:
            answer["logprobs"] = self.logprobs
        return {**answer, **self._stats()}


def loaded(name: str, chat: bool, reason: str = "load") -> dict[str, Any]:
    """The answer to a chat or generate with nothing to say: Ollama's way to load a model (or, with
    keep_alive 0, to unload it: reason "unload")."""
    text = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
    return {"model": name, "created_at": now_iso(), **text, "done": True, "done_reason": reason}


def embed_answer(name: str, answer: dict[str, Any], total_ns: int, load_ns: int) -> dict[str, Any]:
    return {
        "model": name,
        "embeddings": [item["embedding"] for item in answer.get("data") or []],
        "total_duration": total_ns,
        "load_duration": load_ns,
        "prompt_eval_count": int((answer.get("usage") or {}).get("prompt_tokens") or 0),
    }


# ---- running models ------------------------------------------------------------------------------
def parameter_size(billions: float | str | None) -> str:
    try:
        value = float(str(billions).replace("_", "."))
    except ValueError:
        return ""
    return f"{value * 1000:.0f}M" if value < 1 else f"{value:g}B"


def details(model: RunningModel) -> dict[str, Any]:
    fmt = model.spec.model_format
    return {
        "parent_model": "",
        "format": "gguf" if fmt.startswith("gguf") else fmt,
        "family": model.family.model_name,
        "families": [model.family.model_name],
        "parameter_size": parameter_size(model.spec.model_size_in_billions),
        "quantization_level": "" if model.spec.quantization == "none" else model.spec.quantization,
    }


def digest(model: RunningModel) -> str:
    """A stable identifier of what runs under the uid (not a hash of the weights' bytes)."""
    spec = model.spec
    key = (
        f"{model.uid}\0{model.family.model_name}\0{spec.model_format}\0{spec.quantization}\0{model.source!r}"
    )
    return hashlib.sha256(key.encode()).hexdigest()


def tag(model: RunningModel) -> dict[str, Any]:
    """/api/tags: one model; size is the estimate of its weights."""
    name = ollama_name(model.uid)
    return {
        "name": name,
        "model": name,
        "modified_at": now_iso(datetime.fromtimestamp(model.created, UTC)),
        "size": int(model.plan.breakdown.get("weights") or 0),
        "digest": digest(model),
        "details": details(model),
    }


def expires_at(model: RunningModel, now: datetime, idle_seconds: float) -> datetime:
    """When it becomes evictable (Shoal evicts only when another launch needs the room)."""
    if model.request.pinned or model.keep_alive < 0:
        return FOREVER
    return now + timedelta(seconds=max(0.0, model.keep_alive - idle_seconds))


def process(model: RunningModel, context_length: int, now: datetime, monotonic: float) -> dict[str, Any]:
    """/api/ps: one loaded model; size is what the ledger reserves for it, size_vram the GPU part."""
    held = [r.reservation for r in model.replicas if r.reservation is not None]
    size = sum(r.reserved * len(r.devices) for r in held)
    idle = min((monotonic - r.last_used for r in model.replicas), default=0.0)
    return {
        **tag(model),
        "size": size,
        "size_vram": size if model.plan.kind == "gpu" else 0,
        "expires_at": now_iso(expires_at(model, now, idle)),
        "context_length": context_length,
    }


# Shoal's abilities as Ollama's capabilities ("tools" and "thinking" come from the catalog's labels:
# tool calls work on every chat model, but only a model trained for them calls tools well)
CAPABILITIES = {
    "chat": "completion",
    "generate": "completion",
    "embed": "embedding",
    "vision": "vision",
    "tools": "tools",
    "reasoning": "thinking",
}


def capabilities(abilities: list[str]) -> list[str]:
    return list(dict.fromkeys(CAPABILITIES[a] for a in abilities if a in CAPABILITIES))


def show(model: RunningModel, context_length: int) -> dict[str, Any]:
    arch = model.family.model_name
    info: dict[str, Any] = {
        "general.architecture": arch,
        "general.basename": model.family.model_name,
        f"{arch}.context_length": context_length,
        "shoal.model_type": model.family.model_type,
        "shoal.model_engine": model.engine,
    }
    if model.family.dimensions:
        info[f"{arch}.embedding_length"] = model.family.dimensions
    return {
        "modelfile": "",
        "parameters": "",
        "template": "",
        "license": model.family.license or "",
        "details": details(model),
        "model_info": info,
        "capabilities": capabilities(model.abilities),
        "modified_at": now_iso(datetime.fromtimestamp(model.created, UTC)),
    }


# ---- /api/pull -----------------------------------------------------------------------------------
async def pull_lines(progress: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """Shoal's pull progress as Ollama's lines: "pulling manifest", then per file "pulling
    DIGEST12" with digest, total and completed, then "verifying sha256 digest", "writing
    manifest" and "success" (or {"error": ...})."""
    yield {"status": "pulling manifest"}
    last: dict[str, Any] = {}
    async for step in progress:
        last = step
        for f in step.get("files", []):
            digest = f["digest"]
            yield {"status": f"pulling {digest.removeprefix('sha256:')[:12]}", "digest": digest,
                   "total": f["size"], "completed": f["completed"]}  # fmt: skip
    if last.get("status") == "failed":
        yield {"error": last.get("error") or "the download failed"}
        return
    yield {"status": "verifying sha256 digest"}
    yield {"status": "writing manifest"}
    yield {"status": "success"}
