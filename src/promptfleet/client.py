"""A small typed HTTP client for PromptFleet's own endpoints (the CLI and the demo use
it; completions go through the official ``openai`` client or plain HTTP)."""
from __future__ import annotations

import io
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


class ClientError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def zip_directory(path: Path) -> bytes:
    """Zip a PEFT ``save_pretrained`` directory (its regular files, flat)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(path.iterdir()):
            if f.is_file() and not f.is_symlink():
                zf.write(f, arcname=f.name)
    return buf.getvalue()


@dataclass
class PromptFleetClient:
    base_url: str
    api_key: str | None = None
    timeout: float = 120.0

    def _client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.base_url.rstrip("/"), headers=headers, timeout=self.timeout)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            with self._client() as c:
                resp = c.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(0, f"cannot reach {self.base_url}: {exc}") from exc
        if resp.status_code >= 400:
            try:
                message = resp.json()["error"]["message"]
            except Exception:
                message = resp.text[:500]
            raise ClientError(resp.status_code, message)
        return resp

    def list_all(self, path: str, *, page_size: int = 100, **params: Any) -> list[dict]:
        """Every item of a paginated list endpoint: asks for pages of ``page_size`` with
        ``after=<last_id>`` while the server says ``has_more``."""
        items: list[dict] = []
        after: str | None = None
        while True:
            query = {**params, "limit": page_size, **({"after": after} if after else {})}
            page = self.request("GET", path, params=query).json()
            items += page["data"]
            last = page.get("last_id")
            if not page.get("has_more") or not last or last == after:
                return items
            after = last

    # -- admin
    def create_tenant(self, name: str) -> dict:
        return self.request("POST", "/admin/tenants", json={"name": name}).json()

    def list_tenants(self) -> list[dict]:
        return self.list_all("/admin/tenants")

    def rotate_key(self, tenant_id: str) -> dict:
        return self.request("POST", f"/admin/tenants/{tenant_id}/rotate-key").json()

    # -- adapters
    def push_adapter(self, name: str, directory: Path) -> dict:
        files = {"file": ("adapter.zip", zip_directory(directory), "application/zip")}
        return self.request("POST", "/v1/adapters", data={"name": name}, files=files).json()

    def list_adapters(self) -> list[dict]:
        return self.list_all("/v1/adapters")

    def pull_adapter(self, ref: str, out_dir: Path) -> Path:
        data = self.request("GET", f"/v1/adapters/{ref}/download").content
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in zf.infolist():
                name = Path(info.filename).name  # flat: never trust member paths
                if name:
                    (out_dir / name).write_bytes(zf.read(info))
        return out_dir

    def delete_adapter(self, ref: str) -> None:
        self.request("DELETE", f"/v1/adapters/{ref}")

    # -- datasets and jobs
    def push_dataset(self, path: Path) -> dict:
        files = {"file": (Path(path).name, Path(path).read_bytes(), "application/jsonl")}
        return self.request("POST", "/v1/datasets", files=files).json()

    def list_datasets(self) -> list[dict]:
        return self.list_all("/v1/datasets")

    def list_jobs(self, status: str | None = None) -> list[dict]:
        return self.list_all("/v1/jobs", **({"status": status} if status else {}))

    def submit_job(self, body: dict) -> dict:
        return self.request("POST", "/v1/jobs", json=body).json()

    def get_job(self, job_id: str) -> dict:
        return self.request("GET", f"/v1/jobs/{job_id}").json()

    def cancel_job(self, job_id: str) -> dict:
        return self.request("POST", f"/v1/jobs/{job_id}/cancel").json()

    # -- completions (plain HTTP; the openai client works too)
    def complete(self, model: str, prompt: str | list[str], **params: Any) -> dict:
        return self.request("POST", "/v1/completions", json={"model": model, "prompt": prompt, **params}).json()

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with self._client() as c:
                    if c.get("/readyz").status_code == 200:
                        return
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.5)
        raise ClientError(0, f"server at {self.base_url} not ready after {timeout:.0f}s ({last})")
