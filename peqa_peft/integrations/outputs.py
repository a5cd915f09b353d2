"""Output directories: checked before any work, written atomically, nothing stale or half-written left behind.

Used by ``export`` / ``export_adapter``, the ``save_pretrained`` of merged PEQA models and ``peqa-peft train``.

- :func:`check_output_path` runs before any model is loaded: the path must not be a file, no ancestor may be a file,
  and the directory that will receive it must be writable (tried for real: a temporary directory is made and
  removed, because ``os.access`` says yes to root on a read-only mount). Each problem is one ``OutputPathError``
  (a ``ValueError``; the CLI reports it and exits 2) naming the path and the problem.
- :func:`atomic_output_dir` yields a fresh temporary directory ``.<name>.tmp-<pid>-<random>`` beside the target and
  renames it onto the target only when the block completes: the result holds exactly what was written (no file of
  an earlier save survives) and a failed or killed run leaves the previous target as it was. Temporary directories
  of killed runs (their process is gone) are removed by the next run to the same target.
- :func:`remove_created_dirs_on_failure` removes the (still empty) directories a failed run created.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "OutputExistsError",
    "OutputPathError",
    "atomic_output_dir",
    "check_output_path",
    "clean_stale_temporaries",
    "remove_created_dirs_on_failure",
]


class OutputPathError(ValueError):
    """An output path that cannot be written (a file, under a file, not writable)."""


class OutputExistsError(FileExistsError, ValueError):
    """The output directory exists and holds files that would be replaced (and overwriting was not asked for)."""


def _nearest_existing(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())


def _writable(directory: Path) -> bool:
    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    try:  # os.access trusts permission bits only: root passes it on read-only mounts and sysfs
        os.rmdir(tempfile.mkdtemp(prefix=".peqa-write-test-", dir=directory))
    except OSError:
        return False
    return True


def check_output_path(output: str | os.PathLike, must_be_empty: bool = False, overwrite: bool = False) -> Path:
    """Check ``output`` (a directory to create or replace) before any work; return it as an absolute path.

    ``must_be_empty``: an existing non-empty directory is refused (``OutputExistsError``) unless ``overwrite``.
    The directory *containing* ``output`` must be writable (or creatable): atomic writes make their temporary
    directory there.
    """
    path = Path(output).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"output path '{output}' exists and is not a directory (it is a file)")
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise OutputPathError(f"output path '{output}' cannot be created: '{ancestor}' is a file, not a directory")
    if not _writable(ancestor):
        raise OutputPathError(f"output path '{output}' cannot be written: '{ancestor}' is not writable")
    if must_be_empty and not overwrite and path.is_dir() and any(path.iterdir()):
        raise OutputExistsError(
            f"output directory '{output}' exists and is not empty; pass overwrite=True (--overwrite) to replace it"
        )
    return path


def _temp_pattern(name: str) -> re.Pattern:
    # `.<name>.tmp-<pid>-<random>` (this module) and `.<name>.tmp-<random>` (earlier versions, no pid), same for .old
    return re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-(?:(\d+)-)?[^/]*$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # this process: maybe another thread's write in progress
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def clean_stale_temporaries(output: str | os.PathLike) -> list[Path]:
    """Remove the temporary directories that killed runs left beside ``output``; returns what was removed.

    A temporary directory whose name carries a process id is left alone while that process runs (a concurrent
    write to the same target); one without a process id is from an earlier peqa_peft version and always stale.
    If a run was killed between moving the previous output aside and renaming the new one into place, the target
    is missing: the previous output is then moved back rather than removed.
    """
    path = Path(output).expanduser().absolute()
    removed = []
    pattern = _temp_pattern(path.name)
    if not path.parent.is_dir():
        return removed
    for entry in path.parent.iterdir():
        match = pattern.match(entry.name)
        if not match or not entry.is_dir() or entry.is_symlink():
            continue
        if match.group(2) is not None and _alive(int(match.group(2))):
            continue
        previous = entry / "previous"
        if match.group(1) == "old" and previous.is_dir() and not (path.exists() or path.is_symlink()):
            os.rename(previous, path)
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``output_dir``; on success it replaces ``output_dir`` by a rename.

    An existing non-empty ``output_dir`` is refused unless ``overwrite``. Any exception removes the temporary
    directory, so a failed write leaves no (half-written) output and an existing ``output_dir`` untouched; a killed
    process leaves its temporary directory, which the next call for the same target removes.
    """
    path = check_output_path(output_dir, must_be_empty=True, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any directory the user makes
    try:
        yield tmp
        old = None
        if path.exists() or path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{os.getpid()}-", dir=path.parent))
            os.rename(path, old / "previous")  # a rename onto a non-empty directory fails, so move it aside first
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def remove_created_dirs_on_failure(output: str | os.PathLike) -> Iterator[None]:
    """If the block raises, remove ``output`` and its ancestors that did not exist before and hold no file.

    For ``peqa-peft train``: a run refused after the Trainer created its output directory leaves nothing behind.
    A directory that holds any file (a checkpoint, a log) is kept.
    """
    path = Path(output).expanduser().absolute()
    created = [p for p in (path, *path.parents) if not (p.exists() or p.is_symlink())]
    try:
        yield
    except BaseException:
        for directory in created:  # deepest first
            if directory.is_dir() and not directory.is_symlink() and _only_empty_dirs(directory):
                shutil.rmtree(directory, ignore_errors=True)
        raise


def _only_empty_dirs(directory: Path) -> bool:
    return all(p.is_dir() and not p.is_symlink() for p in directory.rglob("*"))
