"""Python client for Shoal's REST API (httpx). The OpenAI SDK also works against `<endpoint>/v1`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from shoal import settings


class ShoalAPIError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def _check(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        response.read()
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise ShoalAPIError(response.status_code, message)
    return response


def _sse_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            raise ShoalAPIError(503, event["error"].get("message", "stream failed"))
        yield event


class ModelHandle:
    """Inference on one running model."""

    def __init__(self, client: Client, uid: str) -> None:
        self._client = client
        self.uid = uid

    def chat(self, messages: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
        return self._client._post("/v1/chat/completions", {"model": self.uid, "messages": messages, **params})

    def chat_stream(self, messages: list[dict[str, Any]], **params: Any) -> Iterator[dict[str, Any]]:
        body = {"model": self.uid, "messages": messages, **params, "stream": True}
        with self._client.http.stream("POST", "/v1/chat/completions", json=body) as response:
            _check(response)
            yield from _sse_events(response)

    def complete(self, prompt: str, **params: Any) -> dict[str, Any]:
        return self._client._post("/v1/completions", {"model": self.uid, "prompt": prompt, **params})

    def embed(self, input: str | list[str], **params: Any) -> dict[str, Any]:
        return self._client._post("/v1/embeddings", {"model": self.uid, "input": input, **params})


class Client:
    def __init__(
        self, endpoint: str | None = None, timeout: float = 600.0, api_key: str | None = None
    ) -> None:
        self.endpoint = (endpoint or settings.ENDPOINT.get()).rstrip("/")
        key = api_key or settings.API_KEY.get()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.endpoint, timeout=timeout, headers=headers)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _get(self, path: str, **params: Any) -> Any:
        return _check(self.http.get(path, params=params)).json()

    def _post(self, path: str, body: dict[str, Any], **params: Any) -> Any:
        return _check(self.http.post(path, json=body, params=params)).json()

    # ---- admin ---------------------------------------------------------------------------
    def launch(
        self,
        model_name: str,
        *,
        model_uid: str | None = None,
        model_engine: str | None = None,
        replica: int = 1,
        n_gpu: int | str | None = "auto",
        gpu_idx: int | list[int] | None = None,
        wait_ready: bool = True,
        **engine_options: Any,
    ) -> str:
        body = {
            "model_name": model_name,
            "model_uid": model_uid,
            "model_engine": model_engine,
            "replica": replica,
            "n_gpu": n_gpu,
            "gpu_idx": gpu_idx,
            **engine_options,
        }
        return str(self._post("/v1/models", body, wait_ready=wait_ready)["model_uid"])

    def list_models(self) -> list[dict[str, Any]]:
        return list(self._get("/v1/models")["data"])

    def describe(self, uid: str) -> dict[str, Any]:
        return dict(self._get(f"/v1/models/{uid}"))

    def terminate(self, uid: str) -> None:
        _check(self.http.delete(f"/v1/models/{uid}"))

    def registrations(
        self, model_type: str = "LLM", detailed: bool = False, search: str | None = None
    ) -> list[dict[str, Any]]:
        query: dict[str, Any] = {"detailed": detailed, **({"search": search} if search else {})}
        return list(self._get(f"/v1/model_registrations/{model_type}", **query))

    def register(self, model_type: str, model: dict[str, Any] | str, persist: bool = True) -> str:
        result = self._post(f"/v1/model_registrations/{model_type}", {"model": model, "persist": persist})
        return str(result["model_name"])

    def devices(self) -> list[dict[str, Any]]:
        return list(self._get("/v1/cluster/devices"))

    def workers(self) -> list[dict[str, Any]]:
        return list(self._get("/v1/workers"))

    def estimate(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self._post("/v1/models/estimate", body))

    def pull(self, model_name: str, **fields: Any) -> Iterator[dict[str, Any]]:
        """Download a model into the server's cache: its progress objects as they come (status
        downloading, completed_bytes, total_bytes, rate_bytes_per_s, eta_s), the last one success."""
        body = {"model_name": model_name, **fields, "stream": True}
        with self.http.stream("POST", "/v1/cache/models", json=body) as response:
            _check(response)
            for line in response.iter_lines():
                if line.strip():
                    event = json.loads(line)
                    if event.get("status") == "failed":
                        raise ShoalAPIError(502, event.get("error") or "the download failed")
                    yield event

    def cached(self) -> list[dict[str, Any]]:
        return list(self._get("/v1/cache/models")["data"])

    def remove_cached(self, name: str) -> dict[str, Any]:
        return dict(_check(self.http.delete(f"/v1/cache/models/{name}")).json())

    def model(self, uid: str) -> ModelHandle:
        return ModelHandle(self, uid)
