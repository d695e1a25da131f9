"""Cohere's rerank route, POST /v2/rerank: the body is turned into the /v1/rerank one, sent down the
same path to the model, and the answer rendered in Cohere's shape
({id, results: [{index, relevance_score, document?}], meta: {api_version, billed_units}})."""

from __future__ import annotations

import math
import uuid
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from shoal.gateway.routes_openai import body_schema, check_model, check_size, parse_body, render
from shoal.protocol.cohere import CohereRerankRequest
from shoal.protocol.openai import RerankRequest
from shoal.services.proxy import forward

router = APIRouter(prefix="/v2", tags=["cohere"])
DOCUMENTS_PER_SEARCH_UNIT = 100  # Cohere bills one search unit per query and up to 100 documents


def as_openai(body: CohereRerankRequest) -> RerankRequest:
    texts = [d if isinstance(d, str) else d.text for d in body.documents]
    return RerankRequest(
        model=body.model,
        query=body.query,
        documents=texts,
        top_n=body.top_n,
        return_documents=body.return_documents,
    )


def as_cohere(answer: dict[str, Any], documents: int) -> dict[str, Any]:
    results = [
        {k: v for k, v in r.items() if k in ("index", "relevance_score", "document")}
        for r in answer.get("results", [])
    ]
    billed: dict[str, int] = {"search_units": math.ceil(documents / DOCUMENTS_PER_SEARCH_UNIT)}
    tokens = (answer.get("usage") or {}).get("prompt_tokens")
    if isinstance(tokens, int):
        billed["input_tokens"] = tokens
    return {
        "id": str(uuid.uuid4()),
        "results": results,
        "meta": {"api_version": {"version": "2"}, "billed_units": billed},
    }


@router.post("/rerank", openapi_extra=body_schema(CohereRerankRequest))
async def rerank(request: Request) -> Response:
    """Cohere's rerank (v2 request and answer); documents may also be v1's {"text"} objects."""
    cohere, _ = await parse_body(request, CohereRerankRequest)
    body = as_openai(cohere)
    service = await check_model(request, body.model, "rerank")
    check_size(service, body.model, body)
    raw = body.model_dump_json(exclude_none=True).encode()
    result = await forward(service, body.model, "/v1/rerank", raw, False)
    if result.status != 200 or result.body is None:
        return render(result)  # the engine's error, in the OpenAI error shape every route uses
    answer = as_cohere(orjson.loads(result.body), len(body.documents))
    return Response(
        orjson.dumps(answer), media_type="application/json", headers={"x-shoal-replica": str(result.replica)}
    )
