"""Resuming: find the newest *complete* `checkpoint-N` of an output folder, or refuse a bad one up front.

Notable:
- The Trainer writes `trainer_state.json` last (after weights, optimizer, RNG), so a readable one means a whole
  save; a checkpoint killed mid-save (weights but no state) is skipped with a warning under `true`, and refused
  when named explicitly, with the newest complete one in the message.
- Checked before the model and data load, so a bad path costs seconds, not a model load.
"""

import json
import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def is_complete(checkpoint: Path) -> bool:
    """Whether `checkpoint` holds a readable trainer_state.json, which the Trainer writes last."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):  # missing, or cut short by a kill during the write
        return False


def newest_complete_checkpoint(output_dir: str) -> Path | None:
    """The complete `checkpoint-N` with the highest N in output_dir; warns about newer incomplete ones it skips."""
    folder = Path(output_dir)
    found = [p for p in folder.iterdir() if CHECKPOINT.match(p.name) and p.is_dir()] if folder.is_dir() else []
    for path in sorted(found, key=lambda p: int(CHECKPOINT.match(p.name)[1]), reverse=True):
        if is_complete(path):
            return path
        logger.warning(f"skipping {path.name}: incomplete (no readable trainer_state.json; killed during its save?)")
    return None


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """`--resume_from_checkpoint`: "true" = the newest complete checkpoint (none: start afresh), or a path."""
    if not value or value.lower() == "false":
        return None
    if value.lower() == "true":
        newest = newest_complete_checkpoint(output_dir)
        if newest is None:
            logger.warning(f"--resume_from_checkpoint true: no complete checkpoint in {output_dir}; starting afresh")
        else:
            logger.info(f"resuming from {newest}")
        return None if newest is None else str(newest)
    if is_complete(Path(value)):
        return value
    newest = newest_complete_checkpoint(output_dir)
    hint = (f"the newest complete one is {newest} (`true` picks it)" if newest
            else f"there is no complete checkpoint in {output_dir}")  # fmt: skip
    problem = "does not exist" if not Path(value).exists() else "is incomplete (no readable trainer_state.json)"
    raise ValueError(f"--resume_from_checkpoint {value} {problem}; {hint}")
