"""Bad input always gets a 4xx JSON error in the OpenAI shape, never a 500 or a hang."""

from __future__ import annotations

import pytest

from conftest import CHAT_MODEL, EMBED_MODEL, ShoalServer

MSG = [{"role": "user", "content": "hi"}]


def assert_openai_error(response, status: int) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    return error


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/chat/completions", {"model": "ghost", "messages": MSG}, 404),
        ("/v1/chat/completions", {"model": CHAT_MODEL, "messages": []}, 400),
        ("/v1/chat/completions", {"model": CHAT_MODEL}, 400),
        ("/v1/chat/completions", {"model": CHAT_MODEL, "messages": "hi"}, 400),
        (
            "/v1/chat/completions",
            {"model": CHAT_MODEL, "messages": [{"role": "wizard", "content": "x"}]},
            400,
        ),
        ("/v1/chat/completions", {"model": CHAT_MODEL, "messages": MSG, "max_tokens": "many"}, 400),
        ("/v1/chat/completions", {"model": CHAT_MODEL, "messages": MSG, "max_tokens": -1}, 400),
        ("/v1/chat/completions", {"model": CHAT_MODEL, "messages": MSG, "temperature": 7}, 400),
        ("/v1/chat/completions", {"model": CHAT_MODEL, "messages": MSG, "n": 5}, 400),  # 4 slots
        ("/v1/chat/completions", {"model": CHAT_MODEL, "messages": MSG, "n": 129}, 400),
        ("/v1/chat/completions", {"model": CHAT_MODEL, "messages": MSG, "max_tokens": 10**9}, 400),
        ("/v1/chat/completions", {"model": 42, "messages": MSG}, 400),
        ("/v1/chat/completions", {"model": EMBED_MODEL, "messages": MSG}, 400),
        ("/v1/chat/completions", [1, 2, 3], 400),
        ("/v1/chat/completions", {"model": CHAT_MODEL, "messages": [{"role": "user"}]}, 400),
        ("/v1/chat/completions", {"model": CHAT_MODEL, "messages": [{"role": "user", "content": [{}]}]}, 400),
        (
            "/v1/chat/completions",
            {
                "model": CHAT_MODEL,
                "max_tokens": 4,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            },
            400,
        ),
        ("/v1/completions", {"model": CHAT_MODEL, "prompt": ""}, 400),
        ("/v1/completions", {"model": CHAT_MODEL, "prompt": 5}, 400),
        ("/v1/embeddings", {"model": EMBED_MODEL, "input": []}, 400),
        ("/v1/embeddings", {"model": EMBED_MODEL, "input": {"a": 1}}, 400),
        ("/v1/embeddings", {"model": EMBED_MODEL, "input": "x", "encoding_format": "hex"}, 400),
        ("/v1/embeddings", {"model": EMBED_MODEL, "input": "x", "dimensions": 4096}, 400),
        ("/v1/embeddings", {"model": CHAT_MODEL, "input": "x"}, 400),
    ],
)
def test_bad_bodies(
    chat_server: ShoalServer, embed_server: ShoalServer, path: str, body: object, status: int
) -> None:
    assert_openai_error(chat_server.http.post(path, json=body), status)


def test_non_json_body(chat_server: ShoalServer) -> None:
    for headers in ({"content-type": "application/json"}, {}):
        r = chat_server.http.post("/v1/chat/completions", content=b"{not json", headers=headers)
        assert_openai_error(r, 400)


def test_unknown_routes_and_methods(server: ShoalServer) -> None:
    assert_openai_error(server.http.get("/v1/nothing-here"), 404)
    assert_openai_error(server.http.put("/v1/chat/completions", json={}), 405)
    assert_openai_error(server.http.get("/v1/models/ghost"), 404)
    assert_openai_error(server.http.delete("/v1/models/ghost"), 404)


def test_model_still_answers_after_bad_input(chat_server: ShoalServer) -> None:
    r = chat_server.http.post(
        "/v1/chat/completions", json={"model": CHAT_MODEL, "messages": MSG, "max_tokens": 2}
    )
    assert r.status_code == 200
