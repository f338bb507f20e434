"""How every command ends on an error: a user's mistake prints its message alone, a bug prints its traceback.

Each top-level command ends with `if __name__ == "__main__": run(main)`, e.g.

    $ python train_sft.py --dataset_name data.json ...
    train_sft.py: error: no usable records in data.json: 1 skipped (missing_image=1); first offenders: ...

User errors (the message alone on stderr, exit status 1), and why each counts as one:
- `ValueError`: every check of ours raises it or a subclass (`ImageRefused`, `NoUsableRecords`), with a message
  that names the file, record, field or flag and what was expected; transformers and TRL raise it for arguments
  that cannot work together (bf16 on a machine without one), and Python's JSON and UTF-8 errors are ValueErrors.
- `OSError`: a missing or unreadable file or folder, an export folder that is not empty, a full disk, and every
  refusal of the Hub: huggingface_hub's errors are OSErrors (no such repository, gated, no such revision, offline),
  and transformers turns a checkpoint it cannot find into an OSError that says so.
- `yaml.YAMLError`: a recipe (`--config`) that is not YAML; its message gives the file, line and column.
- argparse's and TrlParser's own errors (an unknown flag, a value of the wrong type) print the usage and the message
  and exit 2 by themselves: that `SystemExit` passes through untouched.
- Ctrl-C prints "interrupted" and exits 130, the shell's convention.

Everything else (TypeError, KeyError, AttributeError, IndexError, torch's RuntimeError, AssertionError, ...) is a
bug, ours or a library's: it propagates and Python prints its traceback, which is what a fix needs.

Pitfall: a bug deep in a library can raise a ValueError or an OSError too, and then its message is all one sees.
`QWEN_SIGLIP_DEBUG=1` shows the traceback of every error. It is an environment variable, not a flag: TrainingArguments
already owns `--debug`, and torchrun and `accelerate launch` pass the environment on to every process.
"""

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

DEBUG_VARIABLE = "QWEN_SIGLIP_DEBUG"
USER_ERRORS = (ValueError, OSError, yaml.YAMLError)


def debugging() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "").lower() not in ("", "0", "false", "no")


def run(main: Callable[..., Any], *args: Any) -> None:
    """`main(*args)`; a user error ends the process with its message alone and exit status 1 (see the module doc)."""
    prog = Path(sys.argv[0]).name
    try:
        main(*args)
    except KeyboardInterrupt:
        if debugging():
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except USER_ERRORS as err:
        if debugging():
            raise
        message = str(err) or type(err).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(1) from None
