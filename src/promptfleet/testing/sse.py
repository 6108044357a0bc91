"""Reading a completions SSE stream: its chunks, its [DONE] and what came after it."""
from __future__ import annotations

import json
from dataclasses import dataclass

import httpx


@dataclass
class StreamResult:
    status: int
    chunks: list[dict]
    done: int            # how many "data: [DONE]" events
    after_done: int      # events after the first [DONE] (must be 0)
    errors: list[dict]

    @property
    def text(self) -> str:
        return "".join(c["choices"][0]["text"] for c in self.chunks if c.get("choices"))

    @property
    def finish_reasons(self) -> list[str]:
        return [c["choices"][0]["finish_reason"] for c in self.chunks
                if c.get("choices") and c["choices"][0].get("finish_reason") is not None]

    @property
    def ids(self) -> set[str]:
        return {c["id"] for c in self.chunks}


def parse_sse(status: int, lines: list[str]) -> StreamResult:
    chunks, errors, done, after = [], [], 0, 0
    for line in lines:
        if not line.startswith("data: "):
            continue
        payload = line[6:]
        if done:
            after += 1
        if payload == "[DONE]":
            done += 1
            continue
        obj = json.loads(payload)
        (errors if "error" in obj else chunks).append(obj)
    return StreamResult(status, chunks, done, after, errors)


def stream_completion(client: httpx.Client, key: str, body: dict) -> StreamResult:
    with client.stream("POST", "/v1/completions", json={**body, "stream": True},
                       headers={"Authorization": f"Bearer {key}"}) as r:
        if r.status_code != 200:
            r.read()
            return StreamResult(r.status_code, [], 0, 0, [r.json()])
        return parse_sse(r.status_code, list(r.iter_lines()))
