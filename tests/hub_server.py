"""A Hub-compatible HTTP server on 127.0.0.1 for the requests of huggingface_hub's upload.

It implements the routes that `HfApi.create_repo`, `create_branch`, `create_commit` and
`model_info` call (read from huggingface_hub 2.4's `hf_api.py`, `_commit_api.py` and `lfs.py`):

- `POST /api/repos/create`, `GET /api/models/{repo_id}`, `POST /api/models/{repo_id}/branch/{branch}`;
- `POST /api/validate-yaml`: the metadata check of a committed README.md;
- `POST /api/models/{repo_id}/preupload/{revision}`: binary files and `.safetensors` files get
  the upload mode "lfs", text files "regular" (sent inline, base64, in the commit);
- `POST /{repo_id}.git/info/lfs/objects/batch`, then `PUT` of the bytes and `POST` to verify:
  the basic transfer of the Git LFS batch API;
- `POST /api/models/{repo_id}/commit/{revision}`: the NDJSON commit, with `create_pr=1` for a
  pull request.

NOTE: the Xet transfer is not implemented. With the `hf_xet` package installed, huggingface_hub
uploads LFS files through Xet, so the tests set `HF_HUB_DISABLE_XET=1` and the client falls back
to the LFS basic transfer.

Every API request must carry `Authorization: Bearer <token>`; the LFS upload URLs stand for
pre-signed storage URLs and need none. `fail(route, status)` makes one route return an error.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

_REPO = r"(?P<repo>[^/]+/[^/]+?)"
ROUTES = [
    ("create", "POST", re.compile(r"/api/repos/create")),
    ("validate-yaml", "POST", re.compile(r"/api/validate-yaml")),
    ("branch", "POST", re.compile(rf"/api/models/{_REPO}/branch/(?P<revision>[^/]+)")),
    ("preupload", "POST", re.compile(rf"/api/models/{_REPO}/preupload/(?P<revision>[^/]+)")),
    ("commit", "POST", re.compile(rf"/api/models/{_REPO}/commit/(?P<revision>[^/]+)")),
    ("model-info", "GET", re.compile(rf"/api/models/{_REPO}(/revision/(?P<revision>[^/]+))?")),
    ("lfs-batch", "POST", re.compile(rf"/{_REPO}\.git/info/lfs/objects/batch")),
    ("lfs-upload", "PUT", re.compile(r"/lfs-upload/(?P<oid>[0-9a-f]{64})")),
    ("lfs-verify", "POST", re.compile(rf"/lfs-verify/{_REPO}")),
]
# Routes that stand for pre-signed storage URLs, which carry no Authorization header.
_UNAUTHENTICATED = {"lfs-upload"}
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")


@dataclasses.dataclass
class RecordedRequest:
    route: str
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes


@dataclasses.dataclass
class Commit:
    oid: str
    revision: str
    summary: str
    description: str
    files: dict[str, bytes]
    pull_request: int | None = None


@dataclasses.dataclass
class Repository:
    private: bool
    branches: dict[str, dict[str, bytes]] = dataclasses.field(default_factory=lambda: {"main": {}})
    commits: list[Commit] = dataclasses.field(default_factory=list)
    pull_requests: int = 0


class HubServer:
    """The server and the state it keeps: repositories, LFS objects and every request received."""

    def __init__(self, token: str, user: str = "tester") -> None:
        self.token = token
        self.user = user
        self.requests: list[RecordedRequest] = []
        self.repositories: dict[str, Repository] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.failures: dict[str, tuple[int, str]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def fail(self, route: str, status: int, message: str = "failure injected by the test") -> None:
        """Make `route` return `status` with `message` as the JSON `error`."""
        self.failures[route] = (status, message)

    def routes(self) -> list[str]:
        return [request.route for request in self.requests]

    # Route handlers: each returns (status, JSON body, extra headers).

    def create(self, request: RecordedRequest, match: re.Match, query: dict) -> tuple[int, dict, dict]:
        payload = json.loads(request.body)
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        if repo_id in self.repositories:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, {}
        self.repositories[repo_id] = Repository(private=payload.get("visibility") == "private")
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}, {}

    def validate_yaml(self, request: RecordedRequest, match: re.Match, query: dict) -> tuple[int, dict, dict]:
        content = json.loads(request.body)["content"]
        metadata = content.split("---\n")[1] if content.startswith("---\n") else ""
        try:
            yaml.safe_load(metadata)
        except yaml.YAMLError as error:
            return 400, {"errors": [{"message": f"invalid YAML: {error}"}]}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def model_info(self, request: RecordedRequest, match: re.Match, query: dict) -> tuple[int, dict, dict]:
        repository = self.repositories.get(match["repo"])
        if repository is None:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        files = repository.branches.get(match["revision"] or "main", {})
        sha = repository.commits[-1].oid if repository.commits else "0" * 40
        return 200, {"id": match["repo"], "sha": sha, "private": repository.private, "siblings": [{"rfilename": name} for name in files]}, {}

    def branch(self, request: RecordedRequest, match: re.Match, query: dict) -> tuple[int, dict, dict]:
        repository = self.repositories.get(match["repo"])
        if repository is None:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        revision = unquote(match["revision"])
        if revision in repository.branches:
            return 409, {"error": "Reference already exists"}, {}
        repository.branches[revision] = dict(repository.branches["main"])
        return 200, {}, {}

    def preupload(self, request: RecordedRequest, match: re.Match, query: dict) -> tuple[int, dict, dict]:
        if match["repo"] not in self.repositories:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        files = []
        for file in json.loads(request.body)["files"]:
            sample = base64.b64decode(file["sample"])
            binary = file["path"].endswith(LFS_SUFFIXES) or b"\x00" in sample
            files.append({"path": file["path"], "uploadMode": "lfs" if binary else "regular", "shouldIgnore": False, "oid": None})
        return 200, {"files": files}, {}

    def lfs_batch(self, request: RecordedRequest, match: re.Match, query: dict) -> tuple[int, dict, dict]:
        objects = []
        for item in json.loads(request.body)["objects"]:
            entry = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if item["oid"] not in self.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-upload/{item['oid']}"},
                    "verify": {"href": f"{self.url}/lfs-verify/{match['repo']}"},
                }
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, {}

    def lfs_upload(self, request: RecordedRequest, match: re.Match, query: dict) -> tuple[int, dict, dict]:
        if hashlib.sha256(request.body).hexdigest() != match["oid"]:
            return 400, {"error": "content does not match the oid"}, {}
        self.lfs_objects[match["oid"]] = request.body
        return 200, {}, {}

    def lfs_verify(self, request: RecordedRequest, match: re.Match, query: dict) -> tuple[int, dict, dict]:
        item = json.loads(request.body)
        stored = self.lfs_objects.get(item["oid"])
        if stored is None or len(stored) != item["size"]:
            return 404, {"error": "object not uploaded"}, {}
        return 200, {}, {}

    def commit(self, request: RecordedRequest, match: re.Match, query: dict) -> tuple[int, dict, dict]:
        repository = self.repositories.get(match["repo"])
        if repository is None:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        revision = unquote(match["revision"])
        if revision not in repository.branches:
            return 404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"}

        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files: dict[str, bytes] = {}
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    return 422, {"error": f"LFS object {value['oid']} was not uploaded"}, {}
                files[value["path"]] = self.lfs_objects[value["oid"]]

        oid = hashlib.sha1(request.body).hexdigest()
        commit = Commit(oid, revision, header["summary"], header.get("description", ""), files)
        response = {"commitUrl": f"{self.url}/{match['repo']}/commit/{oid}", "commitOid": oid}
        if query.get("create_pr") == ["1"]:
            repository.pull_requests += 1
            commit.pull_request = repository.pull_requests
            response["pullRequestUrl"] = f"{self.url}/{match['repo']}/discussions/{commit.pull_request}"
        else:
            repository.branches[revision].update(files)
        repository.commits.append(commit)
        return 200, response, {}


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                handler.rfile.readline()
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))


def _handler_class(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args) -> None:
            """Keep the test output quiet; the requests are recorded in `hub.requests`."""

        def _respond(self, status: int, body: dict, headers: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _dispatch(self) -> None:
            url = urlsplit(self.path)
            body = _read_body(self)
            for route, method, pattern in ROUTES:
                match = pattern.fullmatch(url.path)
                if method == self.command and match:
                    break
            else:
                self._respond(404, {"error": f"no route for {self.command} {url.path}"}, {})
                return

            request = RecordedRequest(route, self.command, self.path, {name.lower(): value for name, value in self.headers.items()}, body)
            with hub._lock:
                hub.requests.append(request)
                if route not in _UNAUTHENTICATED and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    result = (401, {"error": "Invalid credentials in Authorization header"}, {})
                elif route in hub.failures:
                    status, message = hub.failures[route]
                    result = (status, {"error": message}, {})
                else:
                    result = getattr(hub, route.replace("-", "_"))(request, match, parse_qs(url.query))
            self._respond(*result)

        do_GET = do_POST = do_PUT = _dispatch

    return Handler
