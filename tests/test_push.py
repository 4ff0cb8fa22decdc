"""`attnconv push`: what goes up, the model card written from attnconv.json, one commit, refusals. The hub is
replaced by a recorder (no network here); the recorder keeps exactly what huggingface_hub would be asked to do."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from attnconv.push import api as push_api
from attnconv.push.settings import PushSettings
from attnconv.testing import assert_one_line_error


def _tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class FakeHub:
    """Records HfApi calls; `fail` makes create_commit raise like an HTTP error with that status."""

    calls: list = []
    fail: int | None = None

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kw):
        FakeHub.calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        FakeHub.calls.append(("create_branch", repo_id, kw))

    def create_commit(self, repo_id, operations, **kw):
        if FakeHub.fail:
            err = RuntimeError(f"{FakeHub.fail} Client Error\nmore detail")
            err.response = type("R", (), {"status_code": FakeHub.fail})()
            raise err
        files = {}
        for op in operations:
            src = op.path_or_fileobj
            files[op.path_in_repo] = Path(src).read_bytes() if isinstance(src, str) else bytes(src)
        FakeHub.calls.append(("create_commit", repo_id, files, kw))
        return type("Info", (), {"commit_url": f"https://hub.example/{repo_id}/commit/1"})()


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    FakeHub.calls, FakeHub.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return FakeHub


def test_card_states_the_conversion_from_provenance(converted):
    plan = push_api.plan_push(PushSettings(converted, "me/tiny-gqa"))
    card = ModelCard(plan.card)  # parses: YAML metadata + markdown
    assert card.data.library_name == "transformers" and {"attnconv", "gqa"} <= set(card.data.tags)
    cfg = json.loads((converted / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = {kv: cfg["num_hidden_layers"] * 2 * kv * head_dim * 4 for kv in (4, 2)}  # float32 K and V
    assert "**4 -> 2 key/value heads** (GQA)" in plan.card and "mean-pooling" in plan.card
    assert f"| KV cache per token | {per_token[4] / 1024:,.1f} KiB | {per_token[2] / 1024:,.1f} KiB (2x smaller) |" \
        in plan.card
    digest = hashlib.sha256((converted.parent / "src" / "model.safetensors").read_bytes()).hexdigest()
    assert f"`model.safetensors`: `{digest}`" in plan.card  # the source's weights, as attnconv.json records them
    assert 'from_pretrained("me/tiny-gqa")' in plan.card


def test_card_describes_an_uptraining_run(converted, tmp_path):
    folder = tmp_path / "up"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((converted / name).read_bytes())
    prov = json.loads((converted / "attnconv.json").read_text())
    prov["source"] = "some-org/llama-mha"  # converted from a hub id: the card names it as base_model
    prov["uptrain"] = {"data": "corpus.jsonl", "settings": {"seq_len": 256, "lr": 3e-4, "schedule": "cosine",
                                                            "dtype": "fp32", "teacher": "src"},
                       "results": {"steps": 40, "tokens": 81920, "final_loss": 3.21875, "eval_ppl": 25.5}}
    (folder / "attnconv.json").write_text(json.dumps(prov))
    card = push_api.plan_push(PushSettings(folder, "tiny-up")).card
    assert ModelCard(card).data.base_model == "some-org/llama-mha"
    # a local source: no base_model
    assert ModelCard(push_api.plan_push(PushSettings(converted, "x")).card).data.base_model is None
    assert "40 steps, 81,920 tokens of `corpus.jsonl`" in card and "Distilled from `src`" in card
    assert "Final training loss 3.2188; held-out perplexity 25.50." in card and "uptrained" in card


def test_push_uploads_one_commit_and_leaves_the_folder_alone(converted, hub, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for p in converted.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / ".DS_Store").write_bytes(b"x")
    (folder / "checkpoints" / "step-10").mkdir(parents=True)
    (folder / "checkpoints" / "step-10" / "optimizer.pt").write_bytes(b"state")
    (folder / "extra.bin").write_bytes(b"pickle")
    before = _tree_digest(folder)
    url = push_api.push(PushSettings(folder, "me/tiny-gqa", private=True, revision="v1", message="first"))
    assert url == "https://hub.example/me/tiny-gqa/commit/1"
    assert _tree_digest(folder) == before  # the card was uploaded from memory
    (kind, repo, kw), branch, commit = hub.calls
    assert (kind, repo, kw["private"], kw["exist_ok"]) == ("create_repo", "me/tiny-gqa", True, True)
    assert branch[0] == "create_branch" and branch[2]["branch"] == "v1"
    files, kw = commit[2], commit[3]
    assert set(files) == {p.name for p in converted.iterdir()} | {"README.md"}  # no hidden, checkpoint, pickle
    assert all(files[name] == (converted / name).read_bytes() for name in files if name != "README.md")
    assert files["README.md"].decode() == push_api.plan_push(PushSettings(folder, "me/tiny-gqa")).card
    assert kw["revision"] == "v1" and kw["commit_message"] == "first"
    hub.calls.clear()
    push_api.push(PushSettings(folder, "me/tiny-gqa", allow_pickle=True))
    assert "extra.bin" in hub.calls[-1][2] and "checkpoints/step-10/optimizer.pt" not in hub.calls[-1][2]


def test_own_readme_is_kept(converted, hub, tmp_path):
    folder = tmp_path / "own"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((converted / name).read_bytes())
    (folder / "README.md").write_text("# mine\n")
    plan = push_api.plan_push(PushSettings(folder, "me/own"))
    assert plan.card is None
    push_api.push(PushSettings(folder, "me/own"))
    assert hub.calls[-1][2]["README.md"] == b"# mine\n"


@pytest.mark.parametrize("case", ["missing", "no-config", "pickles-only", "repo-id", "no-token", "denied", "down"])
def test_bad_input_is_one_line(converted, hub, tmp_path, monkeypatch, cli, case):
    folder = converted
    repo = "me/tiny"
    if case == "missing":
        folder = tmp_path / "nope"
    elif case == "no-config":
        folder = tmp_path / "empty"
        folder.mkdir()
    elif case == "pickles-only":
        folder = tmp_path / "pk"
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "pytorch_model.bin").write_bytes(b"x")
    elif case == "repo-id":
        repo = "me/../x"
    elif case == "no-token":
        import huggingface_hub

        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # nor a token saved by `hf auth login`
    else:
        hub.fail = 403 if case == "denied" else 500
    needle = {"missing": "no such folder", "no-config": "no config.json", "pickles-only": "--allow-pickle",
              "repo-id": "not a hub repo id", "no-token": "hf auth login", "denied": "write access",
              "down": "check the network"}[case]
    code, out, err = cli("push", folder, repo)
    assert_one_line_error(code, err, needle)


def test_dry_run_prints_files_and_card(converted, cli):
    code, out, err = cli("push", converted, "me/tiny-gqa", "--dry-run")
    assert code == 0, err
    assert "would upload to me/tiny-gqa" in out and "model.safetensors" in out and "generated model card" in out
    assert "**4 -> 2 key/value heads**" in out
