"""The settings of `attnconv push` (see attnconv/settings.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from attnconv.errors import AttnconvError
from attnconv.settings import Settings, option

_REPO_ID = re.compile(r"^([A-Za-z0-9][\w.\-]*/)?[A-Za-z0-9][\w.\-]*$")


@dataclass(frozen=True)
class PushSettings(Settings):
    command_name = "push"

    model: str = option(help="The model folder to upload (what convert or uptrain wrote).", argument=True,
                       io="folder")
    repo_id: str = option(help="Hub repo: name or namespace/name; created if it does not exist.", argument=True)
    private: bool = option(False, help="Create the repo as private.")
    revision: str | None = option(None, help="Branch to commit to (created if missing); default main.")
    message: str | None = option(None, help="Commit message.", short="-m")
    token: str | None = option(None, help="Hub token with write access; default: HF_TOKEN or the token saved by "
                               "`hf auth login`.", envvar="ATTNCONV_HUB_TOKEN", secret=True)
    allow_pickle: bool = option(False, help="Also upload pickle weights (*.bin, *.pt).")
    dry_run: bool = option(False, help="Print the files and the model card; upload nothing.", run=False)

    def check(self) -> None:
        repo = self.repo_id
        if not _REPO_ID.match(repo) or ".." in repo or repo.endswith((".git", ".")):
            raise AttnconvError(f"{repo!r} is not a hub repo id; use name or namespace/name (letters, digits, -_.)")
