"""Claiming an output: the one output-safety rule of trust_fast (README, "Where results go").

A command (or ``TrustUnlearner.save``) claims its output path before any expensive work
(:func:`claim_output`); the claim refuses what the user did not hand over, locks the path against
a concurrent run, and makes the write all-or-nothing:

* a directory output is written only if it does not exist, is empty, or is a previous output of
  trust_fast (it holds the marker file ``.trust_fast_output.json``, written last) and ``overwrite``
  is given; an overwritten output must hold only the files its marker lists;
* a file output is replaced only with ``overwrite`` and when it is recognisably trust_fast's;
* an output never contains, nor lies inside, an input (model, checkpoint, patch) or another output;
* a staged directory is written beside the target (``.NAME.trust-fast-tmp-*``) and swapped in with
  renames; the previous output waits in ``.NAME.trust-fast-old`` until the new one is in place;
  an interrupted run's leftovers are cleaned, or the previous output restored, by the next claim
  of the same path, which says so (:mod:`trust_fast.output_files`).
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from .output_files import (LOCK_TAG, MARKER, OLD_TAG, STAGING, TMP_TAG, OutputError, atomic_path, entry_stats,
                           foreign_entries, not_writable, parent_and_name, read_marker, recover_leftovers,
                           remove_path, write_marker)

# Locks this process holds, by lock-file path: a claim nested in another claim of the same path
# (the engine's checkpoint writer inside the CLI's claim of the checkpoint directory) reuses it.
# flock locks belong to open files, so a second flock from this process would refuse itself.
_HELD: set[str] = set()


@dataclass(frozen=True)
class Output:
    """A claimed output. Write to ``path``: a staging directory or temp file that becomes
    ``final`` when the claim ends without an error, or ``final`` itself for in-place directories."""
    path: str
    final: str


def _under(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


@contextlib.contextmanager
def claim_output(path: str, what: str = "output directory", *, kind: str = "dir", overwrite: bool = False,
                 inputs: Iterable[tuple[str, str | None]] = (), staged: bool = True,
                 recognize: Callable[[str], bool] | None = None, lock: bool = True) -> Iterator[Output]:
    """Claim `path` as an output; yield an :class:`Output` to write into.

    kind "dir" with `staged` (pipelines, images, reports): write into ``Output.path``, a fresh
    directory beside the target; when the block ends without an error the marker is written last
    and the directory swapped into place, otherwise it is removed and the target left as it was.
    kind "dir" without `staged` (checkpoint directories): ``Output.path`` is the target itself,
    created with a marker; files in it must be written atomically (``atomic_path``).
    kind "file": ``Output.path`` is a temp file renamed onto the target at the end.

    `inputs`: (label, path) pairs the output may neither be, contain nor lie inside.
    `recognize(path)`: True when an existing target is trust_fast's without a marker (a patch file,
    a checkpoint directory of an earlier version). `lock=False` makes this process a follower of
    another that holds the claim (ranks > 0 of a distributed run): no lock, recovery or rule check.
    Raises OutputError (one line) before anything is written when the rules refuse."""
    final = _checked_target(path, what, kind, overwrite, inputs)
    parent, name = parent_and_name(final)
    # nested in this process's own claim of the same path, or following another process's claim
    trusted = not lock or _lock_path(final) in _HELD
    if os.path.lexists(final) and not trusted:  # refuse the obvious before creating anything
        _check_rules(final, what, kind, overwrite, recognize)
    made = _make_parents(parent, what, final)
    try:
        with contextlib.nullcontext() if trusted else _lock(final, what):
            if not trusted:
                recover_leftovers(final, what, in_place=kind == "dir" and not staged)
                _check_rules(final, what, kind, overwrite, recognize)
            if kind == "file":
                with atomic_path(final, os.path.splitext(name)[1]) as tmp:
                    yield Output(tmp, final)
            elif not staged:
                with _in_place_directory(final, what, trusted) as out:
                    yield out
            else:
                with _staged_directory(final, what) as out:
                    yield out
    except BaseException:
        for d in made:  # deepest first; only directories this claim created and left empty
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise


def _checked_target(path, what: str, kind: str, overwrite: bool, inputs: Iterable[tuple[str, str | None]]) -> str:
    """The absolute path a claim of `path` writes, once the claim's arguments are checked and the path
    is none of the `inputs`, inside none and contains none."""
    if kind not in ("dir", "file"):
        raise ValueError(f"kind must be 'dir' or 'file', got {kind!r}")
    if not isinstance(overwrite, bool):  # a string 'no' would read as yes
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    if not isinstance(path, (str, os.PathLike)) or isinstance(os.fspath(path), bytes):
        raise TypeError(f"{what} must be a path (str or os.PathLike), got {type(path).__name__}")
    if not str(path).strip():
        raise OutputError(f"{what} is empty; give a path")
    inputs = list(inputs)
    if not all(isinstance(i, tuple) and len(i) == 2 for i in inputs):
        raise TypeError(f"inputs must be (label, path) pairs, got {inputs!r}"[:200])
    final = os.path.abspath(os.fspath(path))
    _, name = parent_and_name(final)
    if not name or name in (".", ".."):
        raise OutputError(f"{what} {path!r} names no directory entry; give a path")
    _check_inputs(final, what, inputs)
    return final


@contextlib.contextmanager
def _in_place_directory(final: str, what: str, trusted: bool) -> Iterator[Output]:
    """kind "dir" without staging: `final` itself, created if missing and marked first when it has no
    marker yet (unless `trusted`: then the claim that holds the lock marks it)."""
    created = not os.path.isdir(final)
    os.makedirs(final, exist_ok=True)
    marked = not trusted and read_marker(final) is None
    found = entry_stats(final)
    if marked:
        try:
            write_marker(final, what, in_place=True)
        except OSError as e:
            if created:
                remove_path(final)
            raise OutputError(f"{what} {final!r} is not writable ({e.strerror})") from None
    try:
        yield Output(final, final)
    except BaseException:
        # a run that failed before writing a file leaves no trace: not the directory it
        # made, nor the marker it put into a directory it found
        if marked and {k: v for k, v in entry_stats(final).items() if k != MARKER} == found:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(final, MARKER))
        if created and not os.listdir(final):
            remove_path(final)
        raise


@contextlib.contextmanager
def _staged_directory(final: str, what: str) -> Iterator[Output]:
    """kind "dir", staged: a fresh directory beside `final`, marked last and swapped in when the
    block ends without an error, removed otherwise."""
    parent, name = parent_and_name(final)
    try:
        stage = tempfile.mkdtemp(dir=parent, prefix=f".{name}{TMP_TAG}")
        open(os.path.join(stage, STAGING), "w").close()
    except OSError as e:
        raise not_writable(what, final, parent, e) from None
    try:
        yield Output(stage, final)
        write_marker(stage, what, in_place=False)
        os.unlink(os.path.join(stage, STAGING))
        os.chmod(stage, 0o755)
        _swap_in(stage, final)
    except BaseException:
        with contextlib.suppress(OSError):
            remove_path(stage)
        raise


def _check_rules(final: str, what: str, kind: str, overwrite: bool, recognize) -> None:
    if kind == "file":
        if os.path.isdir(final):
            raise OutputError(f"{what} {final!r} is a directory; give a file name")
        if os.path.lexists(final):
            if not overwrite:
                raise OutputError(f"{what} {final!r} exists; pass --overwrite to replace it")
            if recognize is None or not recognize(final):
                raise OutputError(f"{what} {final!r} exists and was not written by trust_fast; refusing to replace it")
        return
    if os.path.lexists(final) and not os.path.isdir(final):
        raise OutputError(f"{what} {final!r} exists and is not a directory")
    if not os.path.isdir(final) or not os.listdir(final):
        return
    marker = read_marker(final)
    ours = marker is not None or (recognize is not None and recognize(final))
    if not ours:
        raise OutputError(f"{what} {final!r} is not empty and was not written by trust_fast; "
                          "choose a new or empty directory")
    if not overwrite:
        raise OutputError(f"{what} {final!r} holds an earlier trust_fast output; pass --overwrite to replace it")
    foreign = foreign_entries(final, marker, recognize)
    if foreign:
        raise OutputError(f"{what} {final!r} holds files trust_fast did not write ({', '.join(foreign[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}); move them away first")


def _check_inputs(final: str, what: str, inputs: Iterable[tuple[str, str | None]]) -> None:
    real = _real(final)
    for label, path in inputs:
        if not path:
            continue
        other = _real(path)
        if real == other:
            raise OutputError(f"{what} {final!r} is the {label} itself; choose another output")
        if _under(real, other):
            raise OutputError(f"{what} {final!r} lies inside the {label} {path!r}; choose another output")
        if _under(other, real):
            raise OutputError(f"{what} {final!r} contains the {label} {path!r}; choose another output")


def _lock_path(final: str) -> str:
    """The lock file of the output `final`, beside it."""
    parent, name = parent_and_name(final)
    return os.path.join(parent, f".{name}{LOCK_TAG}")


@contextlib.contextmanager
def _lock(final: str, what: str) -> Iterator[None]:
    """An advisory, non-blocking lock on `final` (a lock file beside it), held for the claim."""
    parent, _ = parent_and_name(final)
    path = _lock_path(final)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): claims still check the rules, without a lock
        yield
        return
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OutputError(f"{what} {final!r}: {path!r} is a symlink, not a trust_fast lock; move it away") from None
            raise not_writable(what, final, parent, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutputError(f"{what} {final!r} is being written by another trust-fast run; wait for it to "
                              "finish or choose another output") from None
        # the holder before us unlinks the lock file before it unlocks: retry on a fresh file then
        st = os.fstat(fd)
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        if now is not None and (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev):
            if not _lock_content(fd, st):  # a user's file of the lock's name: neither truncated nor removed
                os.close(fd)
                raise OutputError(f"{what} {final!r}: {path!r} exists and is not a trust_fast lock; move it away")
            break
        os.close(fd)
    _HELD.add(path)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        _HELD.discard(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _lock_content(fd: int, st: os.stat_result) -> bool:
    """Whether the locked file is a lock of ours: a regular file, empty or holding a process id."""
    import stat

    if not stat.S_ISREG(st.st_mode) or st.st_size > 32:
        return False
    data = os.pread(fd, 32, 0)
    return re.fullmatch(rb"(\d+\n)?", data) is not None


def _make_parents(parent: str, what: str, final: str) -> list[str]:
    """Create the missing directories above the output; return them, deepest first."""
    made = []
    p = parent
    while not os.path.exists(p):
        made.append(p)
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise OutputError(f"{what} {final!r} is not writable ({p!r} is a file, not a directory)")
    for d in reversed(made):
        try:
            os.mkdir(d)
        except OSError as e:
            for done in made[made.index(d) + 1:]:
                with contextlib.suppress(OSError):
                    os.rmdir(done)
            raise not_writable(what, final, os.path.dirname(d), e) from None
    return made


def _swap_in(stage: str, final: str) -> None:
    parent, name = parent_and_name(final)
    if os.path.lexists(final):
        old = os.path.join(parent, f".{name}{OLD_TAG}")
        os.replace(final, old)
        os.replace(stage, final)  # a kill between these two renames is undone by the next claim
        remove_path(old)
    else:
        os.replace(stage, final)
