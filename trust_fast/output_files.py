"""What trust_fast leaves on disk, and how a later run recognises it.

* the marker ``.trust_fast_output.json`` in every directory output, listing the files trust_fast wrote;
* temp names ``.NAME.trust-fast-tmp-*``: files being written atomically (:func:`atomic_path`) and
  staged directories (holding ``.trust-fast-staging`` until they are swapped in);
* ``.NAME.trust-fast-old``: the previous output while a staged one replaces it;
* ``.NAME.trust-fast-lock``: the lock of a claimed output (:mod:`trust_fast.output_claim`).

:func:`recover_leftovers` cleans what an interrupted run left and restores a previous output it
had moved aside. The rules and the claim itself are :mod:`trust_fast.output_claim`'s.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator

# the name of trust_fast.io's logger: the CLI prints its notes (cleaned leftovers, restored outputs)
log = logging.getLogger("trust_fast.io")

MARKER = ".trust_fast_output.json"
STAGING = ".trust-fast-staging"  # in a staged directory until it is swapped in: the next claim may remove it
TMP_TAG = ".trust-fast-tmp-"
OLD_TAG = ".trust-fast-old"
LOCK_TAG = ".trust-fast-lock"


class OutputError(ValueError):
    """trust_fast refuses to write an output path; the message is one line naming path and rule."""


def parent_and_name(final: str) -> tuple[str, str]:
    """(the directory that holds `final`, its entry name there)."""
    return os.path.dirname(final), os.path.basename(final)


def not_writable(what: str, final: str, directory: str, e: OSError) -> OutputError:
    """The refusal of an output whose `directory` takes no new entry. ENOENT from an existing
    directory (a pseudo-filesystem such as /proc) would read as if that directory were missing."""
    why = "it takes no new files" if e.errno == errno.ENOENT and os.path.isdir(directory) else e.strerror
    return OutputError(f"{what} {final!r} is not writable (cannot create entries in {directory!r}: {why})")


# ----------------------------------------------------------------------------
# markers: what a directory output holds


def read_marker(directory: str) -> dict | None:
    """The marker of a previous trust_fast output in `directory`, or None."""
    try:
        with open(os.path.join(directory, MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    return marker if isinstance(marker, dict) and marker.get("written_by") == "trust_fast" else None


def write_marker(directory: str, what: str, in_place: bool) -> None:
    """The marker, written last (staged outputs) or first (in-place ones, whose files are added to
    it by :func:`in_place_file` before each is written)."""
    from . import __version__

    marker = {"written_by": "trust_fast", "version": __version__, "what": what,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "in_place": in_place,
              "files": [] if in_place else _files(directory)}
    _dump_marker(directory, marker)


def _dump_marker(directory: str, marker: dict) -> None:
    path = os.path.join(directory, MARKER)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f"{MARKER}{TMP_TAG}")
    os.close(fd)
    try:
        with open(tmp, "w") as f:
            json.dump(marker, f, indent=1)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def register_files(directory: str, names: list[str]) -> None:
    """Add `names` to the file list of the in-place output `directory` (claimed, so no other run
    writes its marker now); a name listed already costs no write."""
    marker = read_marker(directory)
    if marker is None:
        raise OutputError(f"{directory!r} is not a claimed trust_fast output; claim it first")
    listed = marker.get("files")
    if isinstance(listed, list) and not set(names) <= set(listed):
        _dump_marker(directory, {**marker, "files": sorted({*listed, *names})})


def _files(directory: str) -> list[str]:
    """Every entry under `directory` a user could lose, by relative path: files, symlinks (to files
    or directories, never followed) and empty directories (``"name/"``). The marker lists these, so
    an overwrite can tell what trust_fast wrote from what a user put in later."""
    out = []
    for root, dirs, files in os.walk(directory):
        rel = lambda name: os.path.relpath(os.path.join(root, name), directory)  # noqa: E731
        out += [rel(f) for f in files]
        out += [rel(d) for d in dirs if os.path.islink(os.path.join(root, d))]
        if not dirs and not files and root != directory:
            out.append(os.path.relpath(root, directory) + "/")
    return sorted(f for f in out if f not in (MARKER, STAGING))


def foreign_entries(final: str, marker: dict | None, recognize) -> list[str]:
    """Entries of the earlier output `final` that trust_fast did not write. A marker without a file
    list (in-place directories of versions before 0.1.1) vouches for nothing: its directory counts
    as ours only if `recognize` knows all of it."""
    listed = (marker or {}).get("files")
    if marker is not None and listed is None:
        return [] if recognize is not None and recognize(final) else _files(final)
    if listed is None:  # no marker: recognize() vouched for the whole directory
        return []
    if not isinstance(listed, list) or not all(isinstance(f, str) for f in listed):
        return _files(final)
    return sorted(set(_files(final)) - set(listed))


def entry_stats(directory: str) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of each entry of `directory`: an atomic write changes the entry's inode."""
    out = {}
    for entry in os.scandir(directory):
        st = entry.stat(follow_symlinks=False)
        out[entry.name] = (st.st_ino, st.st_mtime_ns)
    return out


# ----------------------------------------------------------------------------
# leftovers of an interrupted run


def _temp_name(entry: str, name: str | None = None) -> bool:
    """Whether `entry` is a temp name trust_fast makes (``.NAME.trust-fast-tmp-`` + tempfile's 8
    random characters + an optional suffix), for NAME `name` (any NAME when None)."""
    stem = re.escape(f".{name}{TMP_TAG}") if name is not None else rf"\..+{re.escape(TMP_TAG)}"
    return re.fullmatch(rf"{stem}[a-z0-9_]{{8}}(\.[A-Za-z0-9]+)?", entry) is not None


def _our_leftover(path: str) -> bool:
    """A temp file, or a staging directory (it holds the staging sentinel or a marker, or nothing),
    of an interrupted run; never a symlink, never a directory a user filled."""
    if os.path.islink(path):
        return False
    if os.path.isdir(path):
        entries = os.listdir(path)
        return not entries or STAGING in entries or read_marker(path) is not None
    return os.path.isfile(path)


def remove_path(path: str) -> None:
    """Remove a file, a link (never what it points to) or a directory tree; a missing file is no error."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def recover_leftovers(final: str, what: str, in_place: bool) -> None:
    """Clean what an interrupted claim of `final` left (this process holds its lock, so no live
    run owns these names) and restore a previous output that was moved aside but not replaced.
    Inside an in-place directory of ours, temp files of interrupted atomic writes go too."""
    parent, name = parent_and_name(final)
    for entry in sorted(os.listdir(parent)):
        if _temp_name(entry, name) and _our_leftover(os.path.join(parent, entry)):
            remove_path(os.path.join(parent, entry))
            log.warning(f"removed {os.path.join(parent, entry)!r}, a partial output of an interrupted run")
    old = os.path.join(parent, f".{name}{OLD_TAG}")
    if os.path.lexists(old):
        if os.path.islink(old) or not os.path.isdir(old) or read_marker(old) is None:
            raise OutputError(f"{what} {final!r}: {old!r} exists and was not written by trust_fast (trust_fast keeps "
                              "an output it replaces there); move it away")
        if os.path.lexists(final):
            remove_path(old)  # the swap had finished: this is the output the user chose to replace
        else:
            os.replace(old, final)
            log.warning(f"restored {what} {final!r} from {old!r}: an earlier run was interrupted while replacing it")
    if in_place and os.path.isdir(final) and read_marker(final) is not None:
        for entry in os.listdir(final):  # temp files of in-place writes (checkpoints)
            if _temp_name(entry) and os.path.isfile(os.path.join(final, entry)) \
                    and not os.path.islink(os.path.join(final, entry)):
                remove_path(os.path.join(final, entry))
                log.warning(f"removed {os.path.join(final, entry)!r}, a partial file of an interrupted run")


# ----------------------------------------------------------------------------
# atomic writes: one file through a temp file and a rename


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """Yield a temp file path beside `path`; on success it is made world-readable and renamed
    onto `path`, on failure removed. `suffix` lets writers that infer a format from the name work.
    The temp name (``.NAME.trust-fast-tmp-*``) lets the next claim of the directory clean it after a kill."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{os.path.basename(path)}{TMP_TAG}", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def in_place_file(directory: str, name: str) -> Iterator[str]:
    """A file `name` written atomically (:func:`atomic_path`) into `directory`, an in-place output
    claimed with ``claim_output(..., staged=False)`` (checkpoint directories). The name is added to
    the directory's marker before the file appears, so a later overwrite knows the file is
    trust_fast's and everything else in the directory is the user's."""
    register_files(directory, [name])
    with atomic_path(os.path.join(directory, name), os.path.splitext(name)[1]) as tmp:
        yield tmp
