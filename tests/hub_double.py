"""A local stand-in for the Hugging Face hub: the HTTP calls `huggingface_hub`'s upload path makes, answered on
127.0.0.1 from an in-memory store, so `attnconv push` can be tested end to end with the real client.

Covered (huggingface_hub 1.x/2.x wire format): repo creation, repo info (asked when creation is refused),
branch creation, README metadata validation, pre-upload (the server decides regular vs LFS per file, as the hub
does, and returns the stored oids the client uses to skip unchanged files), the git-LFS batch API with basic (one
PUT) or multipart transfers plus verify, the NDJSON commit, and the agent-harness registry the client fetches once
per process for its user agent. Unserved calls are recorded in `unhandled`. Not covered: the Xet storage protocol —
tests turn it off (`HF_HUB_DISABLE_XET`), so large files take the LFS path; the commit payload is the same.

State: `repos[repo_id].branches[name] -> commit id`, `commits[id] = Commit(parent, message, files)`; LFS objects
live in `lfs` until a commit references them, as on the hub. `fail[endpoint] = status` makes that endpoint answer
with an error instead (the handler names in ROUTES: create, branch, preupload, batch, upload, commit ...).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import math
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

USER = "me"
# What a new hub repo's .gitattributes sends to LFS (abridged); plus any binary or large file, as the hub decides.
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt", "*.h5", "*.onnx", "*.msgpack",
                "*.model", "*.npy", "*.npz", "*.gguf", "*.zip", "*.tar.*", "*.gz", "*.zst", "*tfevents*")
REGULAR_MAX_BYTES = 10 * 2**20


@dataclass
class Commit:
    parent: str | None
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    private: bool
    branches: dict[str, str]  # branch -> commit id


@dataclass
class HubState:
    token: str
    multipart_chunk: int | None = None  # LFS files above this size go up in parts of this size
    repos: dict[str, Repo] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content, once uploaded
    parts: dict[str, dict[int, bytes]] = field(default_factory=dict)  # multipart uploads in progress
    fail: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path) in arrival order
    unhandled: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The tree at the head of branch REVISION."""
        return dict(self.commits[self.repos[repo_id].branches[revision]].files)

    def snapshot(self) -> dict:
        """Everything a commit could change, to compare before and after."""
        return {rid: (r.private, dict(r.branches)) for rid, r in self.repos.items()} | {"#commits": len(self.commits)}


def upload_mode(path: str, size: int, sample: bytes) -> str:
    if any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) for p in LFS_PATTERNS):
        return "lfs"
    return "lfs" if size > REGULAR_MAX_BYTES or b"\0" in sample else "regular"


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects
    state: HubState  # set on the subclass made per server
    base: str

    def log_message(self, *args) -> None:  # quiet: the test reads `state.requests` instead
        pass

    # -- plumbing --------------------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload: dict | None = None, headers: dict | None = None) -> None:
        body = json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": message})

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.state.token}"

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        body = self._body()
        st = self.state
        with st.lock:
            st.requests.append((method, path))
        for pattern, verb, name, needs_auth in ROUTES:
            m = re.fullmatch(pattern, path)
            if m and verb == method:
                if needs_auth and not self._authorized():
                    return self._error(401, "Invalid credentials in Authorization header")
                if name in st.fail:
                    return self._error(st.fail[name], f"injected failure of {name}")
                with st.lock:
                    args = {k: None if v is None else unquote(v) for k, v in m.groupdict().items()}
                    return getattr(self, f"_{name}")(body, **args)
        with st.lock:
            st.unhandled.append((method, path))
        self._error(404, f"the hub double does not serve {method} {path}")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # -- hub API ---------------------------------------------------------------------------------------------------
    def _agent_harnesses(self, body: bytes) -> None:
        self._send(200, {"standardEnvVars": [], "harnesses": {}})

    def _create(self, body: bytes) -> None:
        req = json.loads(body)
        repo_id = f"{req.get('organization') or USER}/{req['name']}"
        if req.get("type", "model") != "model":
            return self._error(400, "the hub double only hosts model repos")
        if repo_id in self.state.repos:
            return self._send(409, {"error": "You already created this model repo", "url": f"{self.base}/{repo_id}"})
        # Like the hub, a new repo starts with one commit holding the .gitattributes that routes weights to LFS.
        first = f"{len(self.state.commits):040x}"
        attrs = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
        self.state.commits[first] = Commit(None, "initial commit", {".gitattributes": attrs})
        self.state.repos[repo_id] = Repo(private=req.get("visibility") == "private", branches={"main": first})
        self._send(200, {"url": f"{self.base}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, body: bytes) -> None:
        content = json.loads(body)["content"]
        m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            meta = yaml.safe_load(m.group(1)) if m else {}
        except yaml.YAMLError as e:
            return self._send(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
        ok = isinstance(meta, dict) or meta is None
        self._send(200 if ok else 400, {"errors": [] if ok else [{"message": "metadata must be a mapping"}],
                                        "warnings": []})

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        return repo

    def _repo_info(self, body: bytes, repo_id: str, revision: str | None) -> None:
        if (repo := self._repo(repo_id)) is None:
            return
        sha = repo.branches.get(revision or "main")
        if sha is None:
            return self._send(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
        self._send(200, {"id": repo_id, "sha": sha, "private": repo.private,
                         "siblings": [{"rfilename": name} for name in sorted(self.state.commits[sha].files)]})

    def _branch(self, body: bytes, repo_id: str, branch: str) -> None:
        if (repo := self._repo(repo_id)) is None:
            return
        if branch in repo.branches:
            return self._error(409, "Reference already exists")
        start = (json.loads(body or b"{}") or {}).get("startingPoint", "main")
        if start not in repo.branches:
            return self._send(404, {"error": f"Invalid rev id: {start}"}, {"X-Error-Code": "RevisionNotFound"})
        repo.branches[branch] = repo.branches[start]
        self._send(200, {})

    def _preupload(self, body: bytes, repo_id: str, revision: str) -> None:
        if self._repo(repo_id) is None:
            return
        tree = self.state.files(repo_id, revision) if revision in self.state.repos[repo_id].branches else {}
        out = []
        for f in json.loads(body)["files"]:
            mode = upload_mode(f["path"], f["size"], base64.b64decode(f["sample"]))
            old = tree.get(f["path"])
            oid = None if old is None else hashlib.sha256(old).hexdigest() if mode == "lfs" else git_blob_oid(old)
            out.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": out})

    def _batch(self, body: bytes, repo_id: str) -> None:
        if self._repo(repo_id) is None:
            return
        req, chunk = json.loads(body), self.state.multipart_chunk
        objects = []
        for obj in req["objects"]:
            oid, size = obj["oid"], obj["size"]
            entry = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.state.lfs:  # already stored: no actions, the client skips the upload
                upload = {"href": f"{self.base}/lfs-upload/{oid}"}
                if chunk and "multipart" in req["transfers"] and size > chunk:
                    parts = math.ceil(size / chunk)
                    upload["header"] = {"chunk_size": str(chunk)} | {
                        str(i): f"{self.base}/lfs-upload/{oid}/part/{i}" for i in range(1, parts + 1)}
                entry["actions"] = {"upload": upload, "verify": {"href": f"{self.base}/lfs-verify"}}
            objects.append(entry)
        self._send(200, {"transfer": "multipart" if chunk else "basic", "objects": objects})

    def _store_lfs(self, oid: str, content: bytes) -> None:
        if hashlib.sha256(content).hexdigest() != oid:
            return self._error(400, "content does not match its sha256")
        self.state.lfs[oid] = content
        self._send(200, {})

    def _upload(self, body: bytes, oid: str) -> None:  # basic transfer: the whole object in one PUT
        self._store_lfs(oid, body)

    def _upload_part(self, body: bytes, oid: str, part: str) -> None:
        self.state.parts.setdefault(oid, {})[int(part)] = body
        self._send(200, {}, {"ETag": hashlib.md5(body).hexdigest()})

    def _complete(self, body: bytes, oid: str) -> None:  # multipart: the client lists the parts' etags
        parts, got = json.loads(body)["parts"], self.state.parts.pop(oid, {})
        if sorted(p["partNumber"] for p in parts) != sorted(got):
            return self._error(400, "parts missing")
        if any(hashlib.md5(got[p["partNumber"]]).hexdigest() != p["etag"] for p in parts):
            return self._error(400, "etag mismatch")
        self._store_lfs(oid, b"".join(got[i] for i in sorted(got)))

    def _verify(self, body: bytes) -> None:
        req = json.loads(body)
        ok = len(self.state.lfs.get(req["oid"], b"")) == req["size"] and req["oid"] in self.state.lfs
        self._send(200 if ok else 404, {} if ok else {"error": "object not found"})

    def _commit(self, body: bytes, repo_id: str, revision: str) -> None:
        if (repo := self._repo(repo_id)) is None:
            return
        if revision not in repo.branches:
            return self._send(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
        parent = repo.branches[revision]
        files = self.state.files(repo_id, revision)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]
        if header.get("key") != "header":
            return self._error(400, "the first NDJSON line must be the commit header")
        for op in lines[1:]:
            key, value = op["key"], op["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.state.lfs:
                    return self._error(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = self.state.lfs[value["oid"]]
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:
                return self._error(400, f"the hub double does not handle {key}")
        oid = hashlib.sha1(body + str(len(self.state.commits)).encode()).hexdigest()
        self.state.commits[oid] = Commit(parent, header["value"]["summary"], files)
        repo.branches[revision] = oid
        self._send(200, {"commitUrl": f"{self.base}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True})


_REPO = r"(?P<repo_id>[^/]+/[^/]+)"
# (path regex, method, handler name without the underscore, needs the token)
ROUTES = [
    (r"/api/agent-harnesses", "GET", "agent_harnesses", False),  # the client's user-agent telemetry registry
    (r"/api/repos/create", "POST", "create", True),
    (r"/api/validate-yaml", "POST", "validate_yaml", True),
    (rf"/api/models/{_REPO}(?:/revision/(?P<revision>[^/]+))?", "GET", "repo_info", True),
    (rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", "POST", "branch", True),
    (rf"/api/models/{_REPO}/preupload/(?P<revision>[^/]+)", "POST", "preupload", True),
    (rf"/{_REPO}\.git/info/lfs/objects/batch", "POST", "batch", True),
    (r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "PUT", "upload", False),  # presigned storage URLs carry no token
    (r"/lfs-upload/(?P<oid>[0-9a-f]{64})/part/(?P<part>\d+)", "PUT", "upload_part", False),
    (r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "POST", "complete", False),
    (r"/lfs-verify", "POST", "verify", True),
    (rf"/api/models/{_REPO}/commit/(?P<revision>[^/]+)", "POST", "commit", True),
]


TOKEN = "hf_double_token"  # the token the double accepts in the tests' `hub` fixture (conftest.py)


class HubDouble:
    """`with HubDouble(token) as hub:` serves on 127.0.0.1 at `hub.url` from a daemon thread until the block ends."""

    def __init__(self, token: str, multipart_chunk: int | None = None):
        self.state = HubState(token=token, multipart_chunk=multipart_chunk)
        self._server: ThreadingHTTPServer | None = None

    def __enter__(self) -> HubDouble:
        handler = type("Handler", (HubHandler,), {"state": self.state})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: a free port
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        handler.base = self.url
        threading.Thread(target=self._server.serve_forever, name="hub-double", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
