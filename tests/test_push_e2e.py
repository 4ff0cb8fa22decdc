"""`attnconv push` end to end: the real `huggingface_hub` client talks HTTP to a hub double on 127.0.0.1
(tests/hub_double.py), which keeps the repo in memory; what lands there is compared byte for byte with the folder."""

from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

import pytest

from attnconv.push import api as push_api
from attnconv.push.settings import PushSettings
from attnconv.testing import assert_one_line_error

REPO = "me/tiny-gqa"


@pytest.fixture
def folder(converted, tmp_path) -> Path:
    """A copy the test may change."""
    return Path(shutil.copytree(converted, tmp_path / "gqa"))




def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _expected(folder: Path, repo_id: str) -> dict[str, str]:
    """sha256 of every file that should arrive: the folder's own and the generated card."""
    digests = {p.relative_to(folder).as_posix(): _sha(p.read_bytes()) for p in folder.rglob("*") if p.is_file()}
    card = push_api.plan_push(PushSettings(folder, repo_id)).card
    return digests | ({"README.md": _sha(card.encode())} if card is not None else {})


def _arrived(hub, repo_id: str, revision: str = "main") -> dict[str, str]:
    files = hub.state.files(repo_id, revision)
    files.pop(".gitattributes")  # the hub's own first commit
    return {name: _sha(data) for name, data in files.items()}


@pytest.mark.parametrize("transfer", ["basic", "multipart"])
def test_every_file_and_the_card_arrive_byte_for_byte(folder, hub, transfer):
    weights = (folder / "model.safetensors").read_bytes()
    if transfer == "multipart":
        hub.state.multipart_chunk = 128 * 1024  # the double asks for parts, as the hub does for big files
    url = push_api.push(PushSettings(folder, REPO, private=True))

    repo = hub.state.repos[REPO]
    head = repo.branches["main"]
    assert url == f"{hub.url}/{REPO}/commit/{head}" and repo.private
    assert _arrived(hub, REPO) == _expected(folder, REPO)
    commit = hub.state.commits[head]
    assert commit.message == "Upload gqa with attnconv" and hub.state.commits[commit.parent].files.keys() == {
        ".gitattributes"}  # one commit on top of the repo's first: never half a model
    # The weights went through LFS, the small JSON files inline in the commit.
    assert set(hub.state.lfs) == {_sha(weights)}
    puts = [path for method, path in hub.state.requests if method == "PUT"]
    if transfer == "basic":
        assert puts == [f"/lfs-upload/{_sha(weights)}"]
    else:
        n_parts = math.ceil(len(weights) / hub.state.multipart_chunk)
        assert n_parts >= 3 and puts == [f"/lfs-upload/{_sha(weights)}/part/{i}" for i in range(1, n_parts + 1)]


def test_push_to_a_branch_leaves_main_alone(folder, hub):
    push_api.push(PushSettings(folder, REPO, revision="v1", message="first"))
    repo = hub.state.repos[REPO]
    assert hub.state.files(REPO).keys() == {".gitattributes"}  # main: only the repo's first commit
    assert _arrived(hub, REPO, "v1") == _expected(folder, REPO)
    first_id = repo.branches["v1"]
    assert hub.state.commits[first_id].message == "first" and hub.state.commits[first_id].parent == repo.branches[
        "main"]

    # Again with the user's own README: only it changes; the client skips the unchanged files (their remote oids
    # match) and the weights already stored are not uploaded twice.
    (folder / "README.md").write_text("# mine\n")
    n_puts = sum(method == "PUT" for method, _ in hub.state.requests)
    push_api.push(PushSettings(folder, REPO, revision="v1"))
    second = hub.state.commits[repo.branches["v1"]]
    assert second.parent == first_id
    assert second.files["README.md"] == b"# mine\n" and _arrived(hub, REPO, "v1") == _expected(folder, REPO)
    assert sum(method == "PUT" for method, _ in hub.state.requests) == n_puts


@pytest.mark.parametrize("failure", ["commit-500", "commit-403", "wrong-token"])
def test_a_failed_push_changes_nothing_and_says_one_line(folder, hub, cli, monkeypatch, failure):
    push_api.push(PushSettings(folder, REPO))
    before, files_before = hub.state.snapshot(), hub.state.files(REPO)
    (folder / "notes.txt").write_text("changed\n")
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[::-1])
    if failure == "wrong-token":
        monkeypatch.setenv("HF_TOKEN", "hf_not_this_one")
    else:
        hub.state.fail["commit"] = int(failure.split("-")[1])

    code, out, err = cli("push", folder, REPO)
    needle = "check the network" if failure == "commit-500" else "write access"
    # huggingface_hub's upload progress bar (tqdm, each update starting with a carriage return) comes before the
    # failed commit; the rest of stderr is attnconv's one error line.
    assert_one_line_error(code, "\n".join(line for line in err.split("\n") if "\r" not in line), needle, REPO)
    assert hub.state.snapshot() == before and hub.state.files(REPO) == files_before
    commit_posts = [p for m, p in hub.state.requests if m == "POST" and p.endswith("/commit/main")]
    assert len(commit_posts) == (1 if failure == "wrong-token" else 2)  # the failed commit was really attempted
