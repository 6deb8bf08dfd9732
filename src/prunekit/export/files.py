"""Writing outputs so that nothing the user owns is lost: every file and directory is written
under a temporary name next to its destination and renamed into place when complete."""
from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prunekit.errors import PrunekitError


# Test-only seam: a process whose environment names an output path here SIGKILLs itself while it
# writes that output (a file: half of it written and flushed; a folder: complete under its temporary
# name, not yet renamed), so the interruption tests can kill a stage at its most fragile moment.
# Read only by the two writers below; unset in normal use.
KILL_WHILE_WRITING_ENV = "PRUNEKIT_TEST_KILL_WHILE_WRITING"
# What the writers below (and the other temporary-then-rename writers: plots, GGUF export) leave
# behind when killed: `.NAME.RANDOM.tmp` files, `.NAME.tmp-RANDOM` and `.NAME.old-RANDOM` folders.
_TEMPORARY_NAME = re.compile(r"\..+(\.tmp|\.tmp-\w+|\.old-\w+)")


def _kill_if_asked_while_writing(path: Path) -> None:
    asked = os.environ.get(KILL_WHILE_WRITING_ENV)
    if asked and Path(asked).resolve() == Path(path).resolve():
        os.kill(os.getpid(), signal.SIGKILL)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete what a killed writer left in `folder` (not below it): the temporary files and
    folders of writes that never reached their rename. Only for a folder one process writes at a
    time (a run directory); returns what it removed."""
    removed = []
    for path in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else ():
        if _TEMPORARY_NAME.fullmatch(path.name):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class OutputExistsError(PrunekitError, FileExistsError):
    """The output path exists and replacing it was not asked for."""


class DiskFullError(PrunekitError, OSError):
    """The disk filled up while an output was written; nothing was left under the final name."""


def disk_full(error: BaseException, path: Path) -> BaseException:
    """A disk-full OSError as a DiskFullError that says what to do; any other error as it is."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
        return DiskFullError(errno.ENOSPC, f"the disk filled up while writing {path} ({free / 2**30:.1f} GiB free "
                                           "now); nothing was left under that name: free some space or write to "
                                           "another disk")
    return error


def default_mode(directory: bool) -> int:
    """Permissions an ordinary open()/mkdir() would give (mkstemp/mkdtemp make private ones)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def give_default_modes(root: Path) -> None:
    """Give every file and folder under `root` the permissions an ordinary open()/mkdir() would: the
    writers that transformers and safetensors use make private (0600) temporary files and rename them."""
    file_mode, directory_mode = default_mode(directory=False), default_mode(directory=True)
    for path in Path(root).rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            os.chmod(path, directory_mode)
        else:
            mode = file_mode
            if path.stat().st_mode & 0o111:
                mode |= (file_mode & 0o444) >> 2  # an executable stays one for whoever may read it
            os.chmod(path, mode)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            if os.environ.get(KILL_WHILE_WRITING_ENV):
                handle.write(text[: len(text) // 2])
                handle.flush()
                _kill_if_asked_while_writing(path)
                handle.write(text[len(text) // 2:])
            else:
                handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, default_mode(directory=False))
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        translated = disk_full(error, path)
        if translated is error:
            raise
        raise translated from None


def overlapped_input(out: Path, protected: tuple[Path, ...]) -> Path | None:
    """The protected input that `out` is, lies inside or contains; None when it is clear of all."""
    resolved = out.resolve()
    for path in protected:
        path = path.resolve()
        if resolved == path or path in resolved.parents or resolved in path.parents:
            return path
    return None


def check_output_dir(out: Path, *, force: bool, protected: tuple[Path, ...] = ()) -> None:
    """Refuse an output that exists (unless `force`) or that overlaps a protected input."""
    if (overlapped := overlapped_input(out, protected)) is not None:
        raise OutputExistsError(
            f"output {out} overlaps the input model at {overlapped}; choose an output directory outside it"
        )
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists; choose another path or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a directory; remove it or choose another path")


@contextmanager
def atomic_directory(out: Path, *, force: bool, protected: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it replaces `out` in one rename.

    On failure (or Ctrl-C) the temporary directory is removed and `out` is untouched.
    """
    check_output_dir(out, force=force, protected=protected)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    os.chmod(tmp, default_mode(directory=True))
    try:
        yield tmp
        _kill_if_asked_while_writing(out)
        give_default_modes(tmp)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        translated = disk_full(error, out)
        if translated is error:
            raise
        raise translated from None
    if out.exists():
        trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, trash / out.name)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)
