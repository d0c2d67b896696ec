"""A Hugging Face Hub faked at the HTTP boundary: ``huggingface_hub``'s own client with a mock transport."""

import base64
import json

import httpx2
from huggingface_hub.utils import set_client_factory
from huggingface_hub.utils._http import default_client_factory


class FakeHub:
    """Answers create-repo, validate-yaml, preupload (every file inline) and commit; records what was sent."""

    def __init__(self):
        self.requests: list[tuple[str, str]] = []
        self.created: list[dict] = []
        self.commits: list[dict] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.requests.append((request.method, path))
        if path == "/api/repos/create":
            self.created.append({**json.loads(request.content), "authorization": request.headers.get("authorization")})
            return httpx2.Response(200, json={"url": "https://huggingface.co/me/tiny"})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            return httpx2.Response(
                200, json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if "/commit/" in path:
            lines = [json.loads(line) for line in request.content.decode().splitlines() if line.strip()]
            files = {e["value"]["path"]: base64.b64decode(e["value"]["content"]) for e in lines if e["key"] == "file"}
            self.commits.append({"path": path, "files": files})
            return httpx2.Response(200, json={"commitUrl": "https://huggingface.co/me/tiny/commit/1", "commitOid": "1" * 40})
        return httpx2.Response(404, json={"error": f"{path} is not faked"})


def fake_hub(monkeypatch):
    """Generator for a fixture: a token in the environment and every Hub request answered by a :class:`FakeHub`."""
    hub = FakeHub()
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
    yield hub
    set_client_factory(default_client_factory)
