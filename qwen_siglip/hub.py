"""The Hub side of a checkpoint: which names are Hub ids, how local names are shown, and the filtered upload.

Notable:
- `HUB_ID` is the one pattern for "owner/name" in this repo; `hub_ids` keeps only names that are Hub ids and not
  local folders, so a card links the model tree and never names a path of the training machine.
- `push_folder` uploads an output folder as it is on disk, less what stays local (`push_ignore_patterns`):
  checkpoints, TensorBoard runs (they log the output path), the pickled `training_args.bin` (absolute paths) and,
  unless asked, `eval/` (held-out references and predictions). Training, evaluation and the exports push through it.
- The token is passed to the Hub client only, never written: None means the login's (HF_TOKEN or `hf auth login`).
"""

import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def hub_ids(*names: str | None) -> list[str]:
    """Names that are Hub ids (owner/name) and not local folders ("./x", "../x" and existing paths are local)."""
    return [n for n in names if n and HUB_ID.match(n) and not n.startswith(".") and not Path(n).exists()]


def display_name(name: str | None) -> str:
    """A Hub id as it is; a local file or folder by its last component: no path of this machine goes on the Hub."""
    return "" if not name else name if hub_ids(name) else Path(name).name


def push_ignore_patterns(push_eval: bool = False) -> list[str]:
    """What stays local: checkpoints, TensorBoard runs, the pickled TrainingArguments and (unless asked) eval/."""
    patterns = ["checkpoint-*", "checkpoint-*/**", "runs/**", "training_args.bin"]
    return patterns if push_eval else patterns + ["eval/**"]


def push_folder(
    folder: Path, repo_id: str | None, private: bool | None = None, token: str | None = None, push_eval: bool = False
) -> str:
    """Upload the output folder as it is on disk, less what push_ignore_patterns() keeps local; returns the URL."""
    from huggingface_hub import HfApi

    if not repo_id:
        raise ValueError("--push_to_hub needs --hub_model_id user/name")
    api = HfApi(token=token)  # None: the login's token (HF_TOKEN or `hf auth login`)
    api.create_repo(repo_id, private=private, exist_ok=True)
    ignore = push_ignore_patterns(push_eval)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), ignore_patterns=ignore)
    logger.info(f"pushed {Path(folder).name} to {repo_id}")
    return os.fspath(getattr(commit, "commit_url", repo_id))
