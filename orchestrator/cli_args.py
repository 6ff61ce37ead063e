"""Command-line helpers shared by `palp-sweep`, `palp-sweep models` and `palp-sweep generate`: one-line usage
errors and the output-folder check. No torch, MLflow or Ray here (`--help` stays fast)."""

import argparse
import os
from pathlib import Path


class UsageError(ValueError):
    """A command line that cannot work; printed as one `palp-sweep: error:` line, exit 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line raises UsageError (one line, exit 2) instead of printing usage."""

    def error(self, message):
        raise UsageError(message)


def output_folder(path: str | Path, flag: str, force: bool = False) -> Path:
    """A folder the command may write into: it exists (empty, unless `force`), or its nearest existing parent
    is a writable folder.

    Checked before any work (model loading, downloads); the caller creates it when it writes. With `force`, files
    of the names it writes are overwritten and the folder's other files are left as they are."""
    path = Path(path)
    if path.is_dir() and not force and any(path.iterdir()):
        raise UsageError(f"{flag} {path}: the folder is not empty; pass --force to write over the files in it")
    for parent in (path, *path.parents):
        if not parent.exists():
            continue
        if not parent.is_dir():
            where = "is a file" if parent == path else f"cannot be made: {parent} is a file"
            raise UsageError(f"{flag} {path}: {where}; give a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {path}: {parent} is not writable")
        break
    return path
