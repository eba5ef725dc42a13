"""Atomic writes: a folder or a text file is built under a temporary sibling name and renamed into place
only when complete, so a crash never leaves a half-written one under the real name. And what reading
an .npz that a copy cut short raises, for the readers that name such a file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import zipfile

UNREADABLE_NPZ = (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile)  # from np.load and its reads


@contextlib.contextmanager
def atomic_folder(directory: str):
    """Yields a fresh temporary folder; on success it replaces `directory` (the old one, if any, is
    moved aside first and deleted after), on failure it is deleted and `directory` is untouched."""
    directory = os.path.abspath(directory)
    tmp = f"{directory}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = f"{directory}.old-{os.getpid()}"
    if os.path.exists(directory):
        os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def write_text(path: str, text: str) -> None:
    """A text file (UTF-8), written atomically: readers see the old file or the whole new one."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    """A JSON file, written atomically."""
    write_text(path, json.dumps(obj, indent=2))
