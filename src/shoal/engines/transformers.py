"""Hugging Face transformers for causal LMs in pytorch/safetensors format (CPU or CUDA, torch).

One worker thread owns the model. It takes every request waiting when it is free (up to
`max_batch_size`), prefills them together left-padded, then decodes them step by step as one batch
over a shared KV cache; a row that finishes, hits a stop string or whose client went away is cut out
of the batch (and its cache) at the next step. Requests arriving meanwhile wait for the next batch.

A request with a JSON `response_format` carries a grammar matcher (engines/structured.py): its row's
logits are masked to the tokens the grammar allows before the pick, the picked token is fed to the
matcher, and the request ends with finish_reason "stop" when the grammar is complete.

Results cross to the event loop with `loop.call_soon_threadsafe` into one asyncio queue per call, so
the loop never waits on torch.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from shoal.engines.base import ESTIMATE_DEFAULTS, Engine
from shoal.engines.structured import Grammars, Matcher, constraint, llg_tokenizer, mask_logits
from shoal.engines.torch_park import park_modules, wake_modules
from shoal.errors import InvalidRequest, ModelUnavailable, ShoalError

# The memory estimate assumes these when a launch names no max_batch_size / context_length.
DEFAULT_MAX_BATCH: int = ESTIMATE_DEFAULTS["transformers"]["parallel"]
DEFAULT_CONTEXT: int = ESTIMATE_DEFAULTS["transformers"]["context"]  # per sequence, capped by the model's
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class _Sampling:
    temperature: float
    top_p: float
    seed: int | None
    stops: tuple[str, ...]
    bias: tuple[tuple[int, float], ...] = ()  # OpenAI's logit_bias: (token id, added to its logit)


@dataclass(frozen=True)
class _Done:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


Emit = Callable[[tuple[int, str, Any]], object]  # (prompt index, "text" | "done" | "error", payload)


class _Detokenizer:
    """Incremental decoding that never splits a multi-byte character (a window decode is kept until
    it no longer ends in U+FFFD) and holds back text that could be the start of a stop string."""

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...]) -> None:
        self._decode = decode
        self._stops = stops
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens already turned into text
        self.text = ""
        self.sent = 0  # characters of text handed out

    def add(self, token: int) -> tuple[str, bool]:
        """The text that may be sent now, and whether a stop string ended the answer."""
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)
        hits = [i for i in (self.text.find(s, self.sent) for s in self._stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self.flush(), True
        end = len(self.text) - self._held()
        delta = self.text[self.sent : end] if end > self.sent else ""
        self.sent += len(delta)
        return delta, False

    def _held(self) -> int:
        """Length of the longest unsent suffix that is a proper prefix of a stop string."""
        unsent = len(self.text) - self.sent
        for k in range(min(max((len(s) for s in self._stops), default=1) - 1, unsent), 0, -1):
            if any(len(s) > k and self.text.endswith(s[:k]) for s in self._stops):
                return k
        return 0

    def flush(self) -> str:
        delta = self.text[self.sent :]
        self.sent = len(self.text)
        return delta


@dataclass
class _Request:
    index: int
    prompt: list[int]
    max_new: int
    sampling: _Sampling
    detok: _Detokenizer
    emit: Emit
    generator: torch.Generator | None = None
    grammar: Matcher | None = None  # response_format's constraint
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: int = 0

    def send(self, kind: str, payload: Any) -> None:
        try:
            self.emit((self.index, kind, payload))
        except RuntimeError:  # the caller's event loop is gone: nobody is listening
            self.cancelled.set()

    def finish(self, reason: str) -> None:
        self.send("done", _Done(reason, len(self.prompt), self.generated))

    def advance(self, token: int, eos: frozenset[int]) -> bool:
        """Take one generated token; True when this request is finished (and told so)."""
        self.generated += 1
        if token in eos:
            self.finish("stop")
            return True
        if self.grammar is not None:
            try:
                self.grammar.accept(token)
            except ShoalError as exc:  # this request only: the rest of the batch goes on
                self.send("error", exc)
                return True
        delta, stopped = self.detok.add(token)
        if stopped or (self.grammar is not None and self.grammar.done):
            if delta:
                self.send("text", delta)
            self.finish("stop")
            return True
        if self.generated >= self.max_new:
            delta += self.detok.flush()
            if delta:
                self.send("text", delta)
            self.finish("length")
            return True
        if delta:
            self.send("text", delta)
        return False


def _sample(logits: torch.Tensor, s: _Sampling, generator: torch.Generator | None) -> int:
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.top_p >= 1:
        return int(torch.multinomial(probs, 1, generator=generator))
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < s.top_p  # smallest set reaching top_p
    keep[0] = True
    choice = torch.multinomial(sorted_probs * keep, 1, generator=generator)
    return int(order[choice])


def _cancel(requests: list[_Request]) -> None:
    for request in requests:
        request.cancelled.set()


def _flat_content(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise InvalidRequest(f"this model reads text only, not {part.get('type')!r} content")
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def _tool_call(call: Any) -> Any:
    """An OpenAI tool call as chat templates read it: `arguments` a dict (Hugging Face's convention)
    when the JSON string holds an object; anything else is left as it came."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    arguments = call["function"].get("arguments")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            return call
        if isinstance(parsed, dict):
            return {**call, "function": {**call["function"], "arguments": parsed}}
    return call


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    """A chat message for the template: content as text; an assistant's `tool_calls` with their
    arguments parsed; `tool` messages (with `tool_call_id`) pass as they are."""
    out = {**message, "content": _flat_content(message.get("content"))}
    if isinstance(message.get("tool_calls"), list):
        out["tool_calls"] = [_tool_call(c) for c in message["tool_calls"]]
    return out


class TransformersEngine(Engine):
    name = "transformers"
    can_park = True

    def load(self) -> None:
        opts = self.pop_options()
        if self.config.n_threads:
            torch.set_num_threads(self.config.n_threads)
        self.cap_cuda_memory(opts)  # the scheduler's reservation, before any weight
        if self.config.device == "cuda":
            # torch sends masked SDPA to cuDNN first on recent GPUs, and cuDNN builds a plan for each
            # new (batch, length): every decode step. Measured on an H100 with a 121M-parameter
            # model: 45 ms a step instead of 5. The flash / memory-efficient kernels need no plan.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self._load_weights(opts)
        self._setup_generation(int(opts.get("context_length") or DEFAULT_CONTEXT))
        self.max_batch_size = int(opts.get("max_batch_size") or DEFAULT_MAX_BATCH)
        self.batches_run = 0  # batches prefilled since load
        self.peak_batch_size = 0  # most requests decoded together
        self.requests_cancelled = 0  # requests dropped because their caller went away
        self._tokenizer_lock = threading.Lock()  # fast tokenizers are not safe across threads
        self._grammars = Grammars(self._llg_tokenizer)
        self.template_tools = self._renders_tools()
        self._cond = threading.Condition()
        self._waiting: list[_Request] = []
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="transformers-batch", daemon=True)
        self._worker.start()

    def _load_weights(self, opts: dict[str, Any]) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        remote = bool(opts.get("trust_remote_code", False))
        path = str(self.config.model_path)
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=remote)
        model: Any = AutoModelForCausalLM.from_pretrained(
            path,
            local_files_only=True,
            trust_remote_code=remote,
            dtype=self._dtype(opts.get("dtype", opts.get("torch_dtype")), self.config.device == "cuda"),
        )
        # .to() rather than device_map=, which needs accelerate (not a dependency here)
        self._model = model.to(self.config.device).eval()
        self._device = self._model.device

    def _llg_tokenizer(self) -> Any:
        vocab = int(self._model.get_output_embeddings().weight.shape[0])  # the logits' width
        with self._tokenizer_lock:
            return llg_tokenizer(self._tokenizer, vocab, sorted(self._eos))

    def _renders_tools(self) -> bool:
        """Whether the chat template writes a `tools` list: a probe rendered with and without one."""
        if not self._tokenizer.chat_template:
            return False
        probe = [{"role": "user", "content": "hi"}]
        parameters = {"type": "object", "properties": {}}
        tool: dict[str, Any] = {
            "type": "function",
            "function": {"name": "probe_tool", "parameters": parameters},
        }

        def render(tools: Any) -> Any:
            return self._tokenizer.apply_chat_template(
                probe, tools=tools, add_generation_prompt=True, tokenize=False
            )

        try:
            plain, told = render(None), render([tool])
        except Exception:  # a template that refuses tools (raise_exception), or this probe
            return False
        return bool(plain != told)

    @staticmethod
    def _dtype(name: Any, cuda: bool) -> Any:
        if name is None:
            if not cuda:
                return torch.float32
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if name == "auto" or isinstance(name, torch.dtype):
            return name
        if str(name) not in _DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; not {name!r}")
        return _DTYPES[str(name)]

    def _setup_generation(self, context: int) -> None:
        text_config = self._model.config.get_text_config()
        limits = (getattr(text_config, "max_position_embeddings", None), self.config.context_length)
        self.context = min([context, *(int(n) for n in limits if n)])  # tokens per sequence
        eos = getattr(self._model.generation_config, "eos_token_id", None)
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self._tokenizer.eos_token_id is not None:
            eos_ids.add(self._tokenizer.eos_token_id)
        self._eos = frozenset(int(i) for i in eos_ids)
        pad = self._tokenizer.pad_token_id
        self._pad = int(pad if pad is not None else min(self._eos, default=0))
        params = inspect.signature(self._model.forward).parameters
        # transformers 5 renamed past_key_values to cache
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep_last = "logits_to_keep" in params

    def park(self) -> None:
        park_modules([self._model], self.config.device)

    def wake(self) -> None:
        wake_modules([self._model], self.config.device)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout=30)
        del self._model
        if self.config.device == "cuda":
            torch.cuda.empty_cache()

    # ---- the worker thread ----

    def _loop(self) -> None:
        with torch.inference_mode():
            while (batch := self._take()) is not None:
                try:
                    self._run_batch(batch)
                except Exception as exc:  # reported to every caller in the batch
                    error = exc if isinstance(exc, ShoalError) else ShoalError(f"transformers: {exc!r}")
                    for request in batch:
                        request.send("error", error)
        with self._cond:
            for request in self._waiting:
                request.send("error", ModelUnavailable("the model is shutting down"))

    def _take(self) -> list[_Request] | None:
        with self._cond:
            while True:
                if self._closed:
                    return None
                live = [r for r in self._waiting if not r.cancelled.is_set()]
                self.requests_cancelled += len(self._waiting) - len(live)
                if live:
                    batch, self._waiting = live[: self.max_batch_size], live[self.max_batch_size :]
                    return batch
                self._waiting = []
                self._cond.wait()

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any) -> torch.Tensor:
        extra: dict[str, Any] = {self._cache_arg: cache, "use_cache": True}
        if self._keep_last:
            extra["logits_to_keep"] = 1
        out = self._model(input_ids=ids, attention_mask=mask, position_ids=pos, **extra)
        return out.logits[:, -1, :]  # type: ignore[no-any-return]

    def _prefill(self, batch: list[_Request], cache: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded prefill: returns the last logits, the attention mask and next positions."""
        width = max(len(r.prompt) for r in batch)
        ids = torch.full((len(batch), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, request in enumerate(batch):
            ids[row, width - len(request.prompt) :] = torch.tensor(request.prompt)
            mask[row, width - len(request.prompt) :] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        logits = self._forward(ids, mask, pos, cache)
        self.batches_run += 1
        self.peak_batch_size = max(self.peak_batch_size, len(batch))
        return logits, mask, pos[:, -1] + 1

    def _pick(self, logits: torch.Tensor, batch: list[_Request]) -> list[int]:
        for row, request in enumerate(batch):
            for token, value in request.sampling.bias:  # -100 bans a token, +100 all but forces it
                logits[row, token] += value
        mask_logits(logits, [(row, r.grammar) for row, r in enumerate(batch) if r.grammar is not None])
        greedy = logits.argmax(-1).tolist()
        return [
            greedy[row] if r.sampling.temperature <= 0 else _sample(logits[row], r.sampling, r.generator)
            for row, r in enumerate(batch)
        ]

    def _run_batch(self, batch: list[_Request]) -> None:
        from transformers import DynamicCache

        cache: Any = DynamicCache(config=self._model.config)
        logits, mask, next_pos = self._prefill(batch, cache)
        while True:
            tokens = self._pick(logits, batch)
            keep: list[int] = []
            for row, (request, token) in enumerate(zip(batch, tokens, strict=True)):
                if request.cancelled.is_set():
                    self.requests_cancelled += 1
                elif not request.advance(token, self._eos):
                    keep.append(row)
            if not keep or self._closed:
                for row in keep:
                    batch[row].send("error", ModelUnavailable("the model is shutting down"))
                return
            if len(keep) < len(batch):  # cut finished rows out of the batch and its cache
                index = torch.tensor(keep, device=self._device)
                cache.reorder_cache(index)
                batch, mask, next_pos = [batch[i] for i in keep], mask[index], next_pos[index]
            step = torch.tensor([tokens[i] for i in keep], device=self._device).unsqueeze(-1)
            mask = torch.cat([mask, mask.new_ones((len(batch), 1))], dim=-1)
            logits = self._forward(step, mask, next_pos.unsqueeze(-1), cache)
            next_pos = next_pos + 1

    # ---- the event-loop side ----

    def _decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return str(
                self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            )

    def _encode(self, text: str, special: bool) -> list[int]:
        with self._tokenizer_lock:
            return list(self._tokenizer(text, add_special_tokens=special)["input_ids"])

    def _chat_prompt(self, body: dict[str, Any]) -> list[int]:
        messages = [_template_message(m) for m in body["messages"]]
        if not self._tokenizer.chat_template:
            # No chat template in this tokenizer: a plain "role: content" transcript, which any
            # causal LM can continue, with the usual special tokens (BOS) added by the tokenizer.
            lines = [f"{m['role']}: {m['content']}" for m in messages]
            return self._encode("\n".join([*lines, "assistant:"]), special=True)
        from jinja2 import TemplateError

        kwargs = dict(body.get("chat_template_kwargs") or {})
        if self.template_tools and body.get("tools"):
            kwargs["tools"] = body["tools"]
        try:
            text = self._tokenizer.apply_chat_template(  # renders text only: no tokenizer state
                messages, add_generation_prompt=True, tokenize=False, **kwargs
            )
        except TemplateError as exc:
            raise InvalidRequest(f"the model's chat template refused these messages: {exc}") from exc
        return self._encode(str(text), special=False)  # the template wrote any BOS itself

    def _completion_prompts(self, body: dict[str, Any]) -> list[list[int]]:
        prompt = body["prompt"]
        return [self._encode(p, special=True) for p in ([prompt] if isinstance(prompt, str) else prompt)]

    def _sampling(self, body: dict[str, Any]) -> _Sampling:
        stop = body.get("stop")
        stops = tuple(s for s in ([stop] if isinstance(stop, str) else stop or []) if s)
        gen = self._model.generation_config
        default_t = float(gen.temperature or 1.0) if gen.do_sample else 1.0
        temperature = body.get("temperature")
        top_p = body.get("top_p")
        if top_p is None:
            top_p = (gen.top_p or 1.0) if gen.do_sample else 1.0
        vocabulary = int(self._model.config.vocab_size)
        bias = tuple((int(token), float(value)) for token, value in (body.get("logit_bias") or {}).items())
        if bad := [token for token, _ in bias if token >= vocabulary]:
            raise InvalidRequest(f"logit_bias: token {bad[0]} is past this model's {vocabulary} tokens")
        return _Sampling(
            temperature=default_t if temperature is None else float(temperature),
            top_p=float(top_p),
            seed=body.get("seed"),
            stops=stops,
            bias=bias,
        )

    def _max_new(self, body: dict[str, Any], prompt: list[int]) -> int:
        room = self.context - len(prompt)
        if room < 1:
            raise InvalidRequest(
                f"the prompt has {len(prompt)} tokens; this model's context is {self.context} tokens"
            )
        asked = body.get("max_completion_tokens") or body.get("max_tokens")
        if asked is None:
            return room
        if int(asked) > room:
            raise InvalidRequest(
                f"max_tokens={asked} plus the prompt's {len(prompt)} tokens is more than this "
                f"model's context of {self.context} tokens"
            )
        return int(asked)

    def _requests(self, prompts: list[list[int]], body: dict[str, Any], emit: Emit) -> list[_Request]:
        sampling = self._sampling(body)
        requests = []
        for index, prompt in enumerate(prompts):
            generator = None
            if sampling.seed is not None and sampling.temperature > 0:
                generator = torch.Generator(device=self._device).manual_seed(int(sampling.seed))
            detok = _Detokenizer(self._decode, sampling.stops)
            max_new = self._max_new(body, prompt)
            requests.append(_Request(index, prompt, max_new, sampling, detok, emit, generator))
        return requests

    async def _submit(self, body: dict[str, Any], chat: bool) -> tuple[list[_Request], asyncio.Queue[Any]]:
        """Check and queue the body's prompts; raises InvalidRequest before anything is queued."""
        if (body.get("n") or 1) != 1:
            raise InvalidRequest("n > 1 is not supported by the transformers engine; send n requests")
        if not chat and body.get("echo"):
            raise InvalidRequest("echo is not supported by the transformers engine")
        if not chat and body.get("suffix"):
            raise InvalidRequest("suffix (fill-in-the-middle) is not supported by the transformers engine")
        if body.get("logprobs") is not None and body["logprobs"] is not False:  # completions' 0 asks too
            raise InvalidRequest(
                "logprobs are not supported by the transformers engine (llama.cpp gives them)"
            )
        want = constraint(body)

        def prepare() -> tuple[list[list[int]], list[Matcher | None]]:  # tokenizing and compiling block
            prompts = [self._chat_prompt(body)] if chat else self._completion_prompts(body)
            return prompts, [None if want is None else self._grammars.matcher(want) for _ in prompts]

        prompts, grammars = await asyncio.to_thread(prepare)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, str, Any]] = asyncio.Queue()
        requests = self._requests(prompts, body, lambda e: loop.call_soon_threadsafe(queue.put_nowait, e))
        for request, grammar in zip(requests, grammars, strict=True):
            request.grammar = grammar
        with self._cond:
            if self._closed:
                raise ModelUnavailable("the model is shutting down")
            self._waiting.extend(requests)
            self._cond.notify()
        return requests, queue

    @staticmethod
    async def _events(
        requests: list[_Request], queue: asyncio.Queue[Any]
    ) -> AsyncIterator[tuple[int, str, Any]]:
        """Events (index, "text" | "done", payload) until every request is done; raises on "error"."""
        pending = len(requests)
        while pending:
            event = await queue.get()
            if event[1] == "error":
                raise event[2]
            if event[1] == "done":
                pending -= 1
            yield event

    # ---- OpenAI shapes ----

    def _head(self, prefix: str, kind: str) -> dict[str, Any]:
        return {
            "id": f"{prefix}-{secrets.token_hex(12)}",
            "object": kind,
            "created": int(time.time()),
            "model": self.config.model_uid,
        }

    @staticmethod
    def _usage(done: list[_Done]) -> dict[str, int]:
        prompt = sum(d.prompt_tokens for d in done)
        completion = sum(d.completion_tokens for d in done)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _collect(self, body: dict[str, Any], chat: bool) -> tuple[list[str], list[_Done]]:
        texts: dict[int, list[str]] = {}
        done: dict[int, _Done] = {}
        requests, queue = await self._submit(body, chat)
        try:
            async for index, kind, payload in self._events(requests, queue):
                if kind == "text":
                    texts.setdefault(index, []).append(payload)
                else:
                    done[index] = payload
        finally:  # also when this call is cancelled: the worker drops the rows at its next step
            _cancel(requests)
        return ["".join(texts.get(i, [])) for i in sorted(done)], [done[i] for i in sorted(done)]

    async def profile_run(self) -> None:
        """One prefill of a full batch (max_batch_size) of full-context prompts, keeping their KV
        cache: the most this engine's batches hold at once. Run before any request is taken."""

        def prefill() -> None:
            from transformers import DynamicCache

            shape = (self.max_batch_size, self.context)
            ids = torch.full(shape, self._pad, dtype=torch.long, device=self._device)
            mask = torch.ones(shape, dtype=torch.long, device=self._device)
            pos = mask.cumsum(-1) - 1
            with torch.inference_mode():  # as a batch's prefill does it (last logits only)
                self._forward(ids, mask, pos, DynamicCache(config=self._model.config))
            # the caching allocator keeps the blocks freed here: NVML's per-pid use shows the peak

        await asyncio.to_thread(prefill)
        await self.warm_up()

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        texts, done = await self._collect(body, chat=True)
        message = {"role": "assistant", "content": texts[0]}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": done[0].finish_reason}
        return {**self._head("chatcmpl", "chat.completion"), "choices": [choice], "usage": self._usage(done)}

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        texts, done = await self._collect(body, chat=False)
        choices = [
            {"index": i, "text": text, "logprobs": None, "finish_reason": d.finish_reason}
            for i, (text, d) in enumerate(zip(texts, done, strict=True))
        ]
        return {**self._head("cmpl", "text_completion"), "choices": choices, "usage": self._usage(done)}

    def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self._stream(body, chat=True)

    def complete_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self._stream(body, chat=False)

    async def _stream(self, body: dict[str, Any], chat: bool) -> AsyncIterator[dict[str, Any]]:
        head = (
            self._head("chatcmpl", "chat.completion.chunk") if chat else self._head("cmpl", "text_completion")
        )

        def chunk(index: int, text: str | None, finish: str | None) -> dict[str, Any]:
            if chat:
                delta = {} if text is None else {"content": text}
                return {**head, "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {**head, "choices": [choice]}

        requests, queue = await self._submit(body, chat)  # errors surface before any chunk
        done: list[_Done] = []
        try:
            if chat:
                role = {"role": "assistant", "content": ""}
                yield {**head, "choices": [{"index": 0, "delta": role, "finish_reason": None}]}
            async for index, kind, payload in self._events(requests, queue):
                if kind == "text":
                    yield chunk(index, payload, None)
                else:
                    done.append(payload)
                    yield chunk(index, None, payload.finish_reason)
            if (body.get("stream_options") or {}).get("include_usage"):
                yield {**head, "choices": [], "usage": self._usage(done)}
        finally:  # the client went away (aclose, GeneratorExit) or all is sent
            _cancel(requests)
