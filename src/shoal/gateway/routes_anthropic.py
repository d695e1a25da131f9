"""Anthropic Messages API routes: POST /v1/messages and /v1/messages/count_tokens.

A request is checked as the OpenAI routes check theirs (the model exists and can chat, the prompt is
not far past its context), translated to the runner's OpenAI chat body and sent through the same
`forward`; the runner's stream comes back as Anthropic's events, or folded into one message.
Errors on these routes leave in Anthropic's shape, `{"type": "error", "error": {"type", "message"}}`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.background import BackgroundTask

from shoal.errors import InvalidRequest, ModelUnavailable, ShoalError
from shoal.gateway import anthropic_translate as translate
from shoal.gateway.errors import _describe_validation
from shoal.gateway.routes_openai import (
    STREAM_HEADERS,
    body_schema,
    check_model,
    check_size,
    parse_body,
    record_tokens,
)
from shoal.gateway.upstream import runner_error
from shoal.protocol.anthropic import CountTokensRequest, MessagesRequest
from shoal.protocol.openai import ChatCompletionRequest
from shoal.services.models import ModelService
from shoal.services.proxy import Forwarded, forward

log = logging.getLogger("shoal.gateway")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(translate.error_body(status, message), status_code=status, headers=headers)


class AnthropicRoute(APIRoute):
    """Errors raised by these routes are answered in Anthropic's shape, not OpenAI's."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except ShoalError as exc:
                retry = {"Retry-After": str(exc.retry_after)} if isinstance(exc, ModelUnavailable) else {}
                if exc.replica is not None:
                    retry["x-shoal-replica"] = str(exc.replica)
                return error_response(exc.status, exc.message, retry)
            except RequestValidationError as exc:
                return error_response(400, _describe_validation(exc))

        return guarded


router = APIRouter(prefix="/v1", tags=["anthropic"], route_class=AnthropicRoute)


def _check_chat_size(service: ModelService, chat: dict[str, Any]) -> None:
    """The OpenAI route's prompt-size check, on the translated body (read as that route reads it)."""
    try:
        openai_view = ChatCompletionRequest.model_validate(chat)
    except ValidationError as exc:  # a translation the OpenAI model refuses: still the client's input
        raise InvalidRequest(f"invalid request: {exc.errors(include_url=False)[0]['msg']}") from exc
    check_size(service, chat["model"], openai_view)


async def _prepare(request: Request, model: type[CountTokensRequest]) -> tuple[Any, ModelService, bool]:
    """The parsed body, the model service (the model exists and can chat), and whether it sees images."""
    body, _ = await parse_body(request, model)
    service = await check_model(request, body.model, "chat")
    vision = "vision" in service.get(body.model).abilities
    return body, service, vision


async def _prompt_tokens(service: ModelService, body: CountTokensRequest, vision: bool) -> int:
    """The prompt's length in the model's own tokens, chat template included: a one-token generation."""
    chat = translate.count_body(body, vision)
    _check_chat_size(service, chat)
    result = await forward(service, body.model, "/v1/chat/completions", _encode(chat), False)
    if result.status != 200:
        raise runner_error(result)
    return int(orjson.loads(result.body or b"{}")["usage"]["prompt_tokens"])


async def _events(
    result: Forwarded, body: MessagesRequest, service: ModelService, vision: bool
) -> AsyncIterator[dict[str, Any]]:
    """Anthropic's events for the runner's stream."""
    assert result.stream is not None
    outcome = translate.Outcome()
    yield translate.message_start(translate.new_message_id(), body.model)
    yield translate.PING
    chunks = translate.parse_sse(result.stream)
    text_open = False
    async for text in translate.texts(chunks, body.stop_sequences or (), outcome):
        if not text_open:
            yield translate.TEXT_START
            text_open = True
        yield translate.text_delta(text)
    if outcome.stop_sequence is not None:  # the runner's stream was cut here: its usage never came
        if result.close is not None:
            await result.close()
        try:
            outcome.input_tokens = await _prompt_tokens(service, body, vision)
        except ShoalError as exc:
            log.warning("could not count the prompt's tokens after a stop sequence: %s", exc.message)
    for event in translate.closing_events(outcome, text_open):
        yield event


async def _sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            yield translate.encode_sse(event)
    except ShoalError as exc:  # headers are gone: report in-band, as Anthropic does
        yield translate.encode_sse(translate.error_body(exc.status, exc.message))


async def _prompt_only(
    body: MessagesRequest, service: ModelService, vision: bool
) -> AsyncIterator[dict[str, Any]]:
    """max_tokens 0: no text; the prompt is read once (which warms llama.cpp's prompt cache)."""
    outcome = translate.Outcome(stop_reason="max_tokens")
    outcome.input_tokens = await _prompt_tokens(service, body, vision)
    yield translate.message_start(translate.new_message_id(), body.model)
    for event in [translate.PING, *translate.closing_events(outcome, text_open=False)]:
        yield event


def _encode(chat: dict[str, Any]) -> bytes:
    """The runner's body. json, not orjson: a client's values (a schema, say) may hold integers
    past 64 bits, which orjson refuses."""
    return json.dumps(chat, ensure_ascii=False).encode()


@router.post("/messages", openapi_extra=body_schema(MessagesRequest))
async def messages(request: Request) -> Response:
    """Anthropic's Messages API: text in, text out; streamed with `stream: true`."""
    body, service, vision = await _prepare(request, MessagesRequest)
    chat = translate.chat_body(body, vision)
    result: Forwarded | None = None
    if body.max_tokens == 0:
        events = _prompt_only(body, service, vision)
    else:
        _check_chat_size(service, chat)
        result = await forward(service, body.model, "/v1/chat/completions", _encode(chat), True)
        if result.stream is None:
            raise runner_error(result)
        record_tokens(body.model, result)
        events = _events(result, body, service, vision)
    close = result.close if result is not None else None
    headers = {"x-shoal-replica": str(result.replica)} if result is not None else {}
    if body.stream:
        return StreamingResponse(
            _sse(events),
            media_type="text/event-stream",
            headers={**STREAM_HEADERS, **headers},
            background=BackgroundTask(close) if close else None,
        )
    try:
        message = await translate.collect(events)
    finally:
        if close is not None:
            await close()
    return JSONResponse(message, headers=headers)


@router.post("/messages/count_tokens", openapi_extra=body_schema(CountTokensRequest))
async def count_tokens(request: Request) -> Response:
    """The prompt's length in the model's own tokens (its tokenizer and chat template), measured by a
    one-token generation on the model: exact, at the cost of reading the prompt once."""
    body, service, vision = await _prepare(request, CountTokensRequest)
    return JSONResponse({"input_tokens": await _prompt_tokens(service, body, vision)})
