"""A local stand-in for the part of the Hub API that `huggingface_hub`'s uploads use, for offline tests.

It serves `create_repo` (`POST /api/repos/create`), the README metadata check (`POST /api/validate-yaml`), the preupload call (`POST /api/models/{repo}/preupload/{rev}`,
answered "regular" for every file so that no LFS or Xet transfer is needed), the commit (`POST
/api/models/{repo}/commit/{rev}`, an NDJSON body with base64 file contents) and repo info
(`GET /api/models/{repo}[/revision/{rev}]`). Committed files land in `root/<owner>/<name>/`; every commit and every
request's headers are recorded for the tests to inspect.
"""

import base64
import hashlib
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_PREUPLOAD = re.compile(rf"^/api/models/{_REPO}/preupload/(?P<revision>[^/?]+)")
_COMMIT = re.compile(rf"^/api/models/{_REPO}/commit/(?P<revision>[^/?]+)")
_INFO = re.compile(rf"^/api/models/{_REPO}(/revision/(?P<revision>[^/?]+))?/?(\?.*)?$")


class LocalHub:
    """Start with `LocalHub(root).start()`; `endpoint` is its base URL; `stop()` shuts it down."""

    def __init__(self, root: str):
        self.root = root
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "sha": str}
        self.commits: list[dict] = []  # {"repo", "revision", "summary", "files": {path: bytes}, "deleted": [...]}
        self.requests: list[dict] = []  # {"method", "path", "headers", "body"}
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _reply(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def do_POST(self):
                body = self._body()
                hub._record("POST", self.path, self.headers, body)
                if self.path.startswith("/api/validate-yaml"):
                    return self._reply(*hub._validate_yaml(json.loads(body)))
                if self.path.startswith("/api/repos/create"):
                    return self._reply(*hub._create_repo(json.loads(body)))
                if match := _PREUPLOAD.match(self.path):
                    return self._reply(*hub._preupload(match["repo"], json.loads(body)))
                if match := _COMMIT.match(self.path):
                    return self._reply(*hub._commit(match["repo"], match["revision"], body))
                return self._reply(404, {"error": f"not served by the local hub: POST {self.path}"})

            def do_GET(self):
                hub._record("GET", self.path, self.headers, b"")
                if match := _INFO.match(self.path):
                    return self._reply(*hub._repo_info(match["repo"]))
                return self._reply(404, {"error": f"not served by the local hub: GET {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "LocalHub":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def repo_dir(self, repo_id: str) -> str:
        return os.path.join(self.root, *repo_id.split("/"))

    def files(self, repo_id: str) -> dict[str, bytes]:
        """The current content of a repo: {path in repo: bytes}."""
        base, found = self.repo_dir(repo_id), {}
        for folder, _, names in os.walk(base):
            for name in names:
                path = os.path.join(folder, name)
                with open(path, "rb") as handle:
                    found[os.path.relpath(path, base).replace(os.sep, "/")] = handle.read()
        return found

    # -- handlers -------------------------------------------------------------------------------------------------
    def _record(self, method, path, headers, body) -> None:
        with self.lock:
            self.requests.append({"method": method, "path": path, "headers": dict(headers), "body": body})

    def _create_repo(self, payload: dict) -> tuple[int, dict]:
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if "/" not in repo_id:
            repo_id = f"user/{repo_id}"  # the namespace of the token's owner
        with self.lock:
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo_id}"}
            self.repos[repo_id] = {"private": payload.get("visibility") == "private", "sha": "0" * 40}
        os.makedirs(self.repo_dir(repo_id), exist_ok=True)
        return 200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id}

    def _validate_yaml(self, payload: dict) -> tuple[int, dict]:
        """The README's metadata block must be a YAML mapping (the Hub checks more)."""
        import yaml

        content = payload["content"]
        if not content.startswith("---\n"):
            return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
        try:
            metadata = yaml.safe_load(content.split("---\n")[1])
        except yaml.YAMLError as error:
            return 400, {"errors": [{"message": f"invalid YAML: {error}"}]}
        if not isinstance(metadata, dict):
            return 400, {"errors": [{"message": "the metadata block is not a mapping"}]}
        return 200, {"errors": [], "warnings": []}

    def _preupload(self, repo_id: str, payload: dict) -> tuple[int, dict]:
        if repo_id not in self.repos:
            return 404, {"error": f"Repository {repo_id} not found"}
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in payload["files"]]
        return 200, {"files": files, "commitOid": self.repos[repo_id]["sha"]}

    def _commit(self, repo_id: str, revision: str, body: bytes) -> tuple[int, dict]:
        if repo_id not in self.repos:
            return 404, {"error": f"Repository {repo_id} not found"}
        commit = {"repo": repo_id, "revision": revision, "summary": None, "files": {}, "deleted": []}
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                commit["summary"] = value["summary"]
            elif item["key"] == "file":
                if value.get("encoding") != "base64":
                    return 400, {"error": f"unexpected encoding {value.get('encoding')!r}"}
                commit["files"][value["path"]] = base64.b64decode(value["content"])
            elif item["key"] in ("deletedFile", "deletedFolder"):
                commit["deleted"].append(value["path"])
            else:  # lfsFile: the preupload answer never asks for LFS
                return 400, {"error": f"the local hub does not serve {item['key']!r} operations"}
        base = self.repo_dir(repo_id)
        with self.lock:
            for path, content in commit["files"].items():
                target = os.path.join(base, *path.split("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "wb") as handle:
                    handle.write(content)
            sha = hashlib.sha1(f"{len(self.commits)}{sorted(commit['files'])}".encode()).hexdigest()
            self.repos[repo_id]["sha"] = sha
            self.commits.append(commit)
        return 200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha}

    def _repo_info(self, repo_id: str) -> tuple[int, dict]:
        if repo_id not in self.repos:
            return 404, {"error": f"Repository {repo_id} not found"}
        siblings = [{"rfilename": path} for path in sorted(self.files(repo_id))]
        return 200, {"id": repo_id, "modelId": repo_id, "sha": self.repos[repo_id]["sha"], "siblings": siblings}
