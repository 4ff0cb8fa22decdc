"""`push`: upload a model folder to the Hugging Face hub in one commit, with a model card from its provenance.

What goes up: every file of the folder except hidden ones, attnconv's temporary and checkpoint folders, and
pickle weights (`*.bin`, `*.pt`, `*.pth`, `*.pkl`) unless `allow_pickle`. A README.md already in the folder is the
user's and goes up as it is; otherwise the card is generated (attnconv/push/card.py) and uploaded from memory:
the folder itself is never modified. All files land in a single commit, so the repo never shows half a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from attnconv.errors import AttnconvError, first_line
from attnconv.loading import ModelFolder
from attnconv.push.settings import PushSettings

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")
SKIP_DIRS = ("checkpoints",)  # uptrain's run state, when kept


@dataclass
class PushPlan:
    folder: Path
    repo_id: str
    files: list[tuple[str, Path]]  # (path in repo, local file)
    card: str | None  # generated README.md, or None when the folder has its own
    skipped: list[str] = field(default_factory=list)  # files left out, and why

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for _, p in self.files) + len((self.card or "").encode())


def _skip_reason(rel: Path, allow_pickle: bool) -> str | None:
    if any(part.startswith(".") for part in rel.parts):
        return "hidden"
    if rel.parts[0] in SKIP_DIRS:
        return "training checkpoints"
    if rel.suffix in PICKLE_SUFFIXES and not allow_pickle:
        return "pickle (pass --allow-pickle to upload it)"
    return None


def plan_push(settings: PushSettings) -> PushPlan:
    """Which files go up and the card, checked before anything touches the network."""
    from attnconv.push.card import model_card

    folder, repo_id, allow_pickle = settings.model, settings.repo_id, settings.allow_pickle
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise AttnconvError(f"{folder}: no such folder; pass the model folder that convert or uptrain wrote")
    if not (path / "config.json").is_file():
        raise AttnconvError(f"{folder} is not a model folder: it has no config.json")
    model = ModelFolder(folder, path, path.resolve())
    files, skipped = [], []
    for p in sorted(path.rglob("*")):
        if not (p.is_file() or p.is_symlink()):
            continue
        rel = p.relative_to(path)
        reason = _skip_reason(rel, allow_pickle)
        if reason:
            skipped.append(f"{rel.as_posix()} ({reason})")
        else:
            model.inside(p)  # a link out of the folder is refused, never uploaded
            files.append((rel.as_posix(), p))
    names = [name for name, _ in files]
    if not any(n.endswith(".safetensors") or n.endswith(PICKLE_SUFFIXES) for n in names):
        hint = "; its weights are pickles: pass --allow-pickle" if any("pickle" in s for s in skipped) else ""
        raise AttnconvError(f"{folder} has no weights to upload (*.safetensors){hint}")
    card = None if "README.md" in names else model_card(path, repo_id)
    return PushPlan(path, repo_id, files, card, skipped)


def _hub_error(action: str, e: Exception) -> AttnconvError:
    first = first_line(e)
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status in (401, 403):
        return AttnconvError(f"the hub refused to {action} ({first}); log in with `hf auth login` or pass a token "
                             "with write access (--token or HF_TOKEN)")
    return AttnconvError(f"could not {action} ({first}); check the network and the repo id")


def push(settings: PushSettings) -> PushPlan | str:
    """Upload settings.model to settings.repo_id (created if missing). Returns the plan when dry_run, else the
    commit's URL."""
    plan = plan_push(settings)
    if settings.dry_run:
        return plan
    repo_id, revision, token, private = settings.repo_id, settings.revision, settings.token, settings.private
    commit_message = settings.message
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    if not (token or get_token()):
        raise AttnconvError("not logged in to the hub: run `hf auth login`, set HF_TOKEN, or pass --token")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
    except Exception as e:  # auth, network, a name taken by someone else: all one line to the user
        raise _hub_error(f"create {repo_id}", e) from None
    ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(p)) for name, p in plan.files]
    if plan.card is not None:
        ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=plan.card.encode()))
    try:
        info = api.create_commit(repo_id, operations=ops, revision=revision,
                                 commit_message=commit_message or f"Upload {plan.folder.name} with attnconv")
    except Exception as e:
        raise _hub_error(f"upload to {repo_id}", e) from None
    return str(getattr(info, "commit_url", info))
