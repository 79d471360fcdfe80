"""Every file trust_fast writes goes through this module.

Two layers:

* :func:`claim_output`, the one output-safety rule. A command (or ``TrustUnlearner.save``) claims
  its output path before any expensive work; the claim refuses what the user did not hand over,
  locks the path against a concurrent run, and makes the write all-or-nothing.
* ``atomic_path`` and the ``*_atomic`` writers: one file at a time through a temp file and a
  rename, used inside a claimed output (and by the benchmark scripts for their own result files).

The rules of a claim (README, "Where results go"):

* a directory output is written only if it does not exist, is empty, or is a previous output of
  trust_fast (it holds the marker file ``.trust_fast_output.json``, written last) and ``overwrite``
  is given; an overwritten output must hold only the files its marker lists;
* a file output is replaced only with ``overwrite`` and when it is recognisably trust_fast's;
* an output never contains, nor lies inside, an input (model, checkpoint, patch) or another output;
* a staged directory is written beside the target (``.NAME.trust-fast-tmp-*``) and swapped in with
  renames; the previous output waits in ``.NAME.trust-fast-old`` until the new one is in place;
  an interrupted run's leftovers are cleaned, or the previous output restored, by the next claim
  of the same path, which says so.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

log = logging.getLogger("trust_fast.io")

MARKER = ".trust_fast_output.json"
STAGING = ".trust-fast-staging"  # in a staged directory until it is swapped in: the next claim may remove it
TMP_TAG = ".trust-fast-tmp-"
OLD_TAG = ".trust-fast-old"
LOCK_TAG = ".trust-fast-lock"

# Locks this process holds, by lock-file path: a claim nested in another claim of the same path
# (the engine's checkpoint writer inside the CLI's claim of the checkpoint directory) reuses it.
# flock locks belong to open files, so a second flock from this process would refuse itself.
_HELD: set[str] = set()


class OutputError(ValueError):
    """trust_fast refuses to write an output path; the message is one line naming path and rule."""


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


def _names(final: str) -> tuple[str, str]:
    return os.path.dirname(final), os.path.basename(final)


def read_marker(directory: str) -> dict | None:
    """The marker of a previous trust_fast output in `directory`, or None."""
    try:
        with open(os.path.join(directory, MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    return marker if isinstance(marker, dict) and marker.get("written_by") == "trust_fast" else None


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


def _stats(directory: str) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of each entry of `directory`: an atomic write changes the entry's inode."""
    out = {}
    for entry in os.scandir(directory):
        st = entry.stat(follow_symlinks=False)
        out[entry.name] = (st.st_ino, st.st_mtime_ns)
    return out


def _write_marker(directory: str, what: str, in_place: bool) -> None:
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


def _foreign(final: str, marker: dict | None, recognize) -> list[str]:
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
    foreign = _foreign(final, marker, recognize)
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


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _recover(final: str, what: str, in_place: bool) -> None:
    """Clean what an interrupted claim of `final` left (this process holds its lock, so no live
    run owns these names) and restore a previous output that was moved aside but not replaced.
    Inside an in-place directory of ours, temp files of interrupted atomic writes go too."""
    parent, name = _names(final)
    for entry in sorted(os.listdir(parent)):
        if _temp_name(entry, name) and _our_leftover(os.path.join(parent, entry)):
            _remove(os.path.join(parent, entry))
            log.warning(f"removed {os.path.join(parent, entry)!r}, a partial output of an interrupted run")
    old = os.path.join(parent, f".{name}{OLD_TAG}")
    if os.path.lexists(old):
        if os.path.islink(old) or not os.path.isdir(old) or read_marker(old) is None:
            raise OutputError(f"{what} {final!r}: {old!r} exists and was not written by trust_fast (trust_fast keeps "
                              "an output it replaces there); move it away")
        if os.path.lexists(final):
            _remove(old)  # the swap had finished: this is the output the user chose to replace
        else:
            os.replace(old, final)
            log.warning(f"restored {what} {final!r} from {old!r}: an earlier run was interrupted while replacing it")
    if in_place and os.path.isdir(final) and read_marker(final) is not None:
        for entry in os.listdir(final):  # temp files of in-place writes (checkpoints)
            if _temp_name(entry) and os.path.isfile(os.path.join(final, entry)) \
                    and not os.path.islink(os.path.join(final, entry)):
                _remove(os.path.join(final, entry))
                log.warning(f"removed {os.path.join(final, entry)!r}, a partial file of an interrupted run")


@contextlib.contextmanager
def _lock(final: str, what: str) -> Iterator[None]:
    """An advisory, non-blocking lock on `final` (a lock file beside it), held for the claim."""
    parent, name = _names(final)
    path = os.path.join(parent, f".{name}{LOCK_TAG}")
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
            raise _not_writable(what, final, parent, e) from None
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


def _not_writable(what: str, final: str, directory: str, e: OSError) -> OutputError:
    """The refusal of an output whose `directory` takes no new entry. ENOENT from an existing
    directory (a pseudo-filesystem such as /proc) would read as if that directory were missing."""
    why = "it takes no new files" if e.errno == errno.ENOENT and os.path.isdir(directory) else e.strerror
    return OutputError(f"{what} {final!r} is not writable (cannot create entries in {directory!r}: {why})")


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
            raise _not_writable(what, final, os.path.dirname(d), e) from None
    return made


def _swap_in(stage: str, final: str) -> None:
    parent, name = _names(final)
    if os.path.lexists(final):
        old = os.path.join(parent, f".{name}{OLD_TAG}")
        os.replace(final, old)
        os.replace(stage, final)  # a kill between these two renames is undone by the next claim
        _remove(old)
    else:
        os.replace(stage, final)


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
    parent, name = _names(final)
    if not name or name in (".", ".."):
        raise OutputError(f"{what} {path!r} names no directory entry; give a path")
    _check_inputs(final, what, inputs)
    # nested in this process's own claim of the same path, or following another process's claim
    trusted = not lock or os.path.join(parent, f".{name}{LOCK_TAG}") in _HELD
    if os.path.lexists(final) and not trusted:  # refuse the obvious before creating anything
        _check_rules(final, what, kind, overwrite, recognize)
    made = _make_parents(parent, what, final)
    try:
        with contextlib.nullcontext() if trusted else _lock(final, what):
            if not trusted:
                _recover(final, what, in_place=kind == "dir" and not staged)
                _check_rules(final, what, kind, overwrite, recognize)
            if kind == "file":
                with atomic_path(final, os.path.splitext(name)[1]) as tmp:
                    yield Output(tmp, final)
            elif not staged:
                created = not os.path.isdir(final)
                os.makedirs(final, exist_ok=True)
                marked = not trusted and read_marker(final) is None
                found = _stats(final)
                if marked:
                    try:
                        _write_marker(final, what, in_place=True)
                    except OSError as e:
                        if created:
                            _remove(final)
                        raise OutputError(f"{what} {final!r} is not writable ({e.strerror})") from None
                try:
                    yield Output(final, final)
                except BaseException:
                    # a run that failed before writing a file leaves no trace: not the directory it
                    # made, nor the marker it put into a directory it found
                    if marked and {k: v for k, v in _stats(final).items() if k != MARKER} == found:
                        with contextlib.suppress(OSError):
                            os.unlink(os.path.join(final, MARKER))
                    if created and not os.listdir(final):
                        _remove(final)
                    raise
            else:
                try:
                    stage = tempfile.mkdtemp(dir=parent, prefix=f".{name}{TMP_TAG}")
                    open(os.path.join(stage, STAGING), "w").close()
                except OSError as e:
                    raise _not_writable(what, final, parent, e) from None
                try:
                    yield Output(stage, final)
                    _write_marker(stage, what, in_place=False)
                    os.unlink(os.path.join(stage, STAGING))
                    os.chmod(stage, 0o755)
                    _swap_in(stage, final)
                except BaseException:
                    with contextlib.suppress(OSError):
                        _remove(stage)
                    raise
    except BaseException:
        for d in made:  # deepest first; only directories this claim created and left empty
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise


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


def register_files(directory: str, names: list[str]) -> None:
    """Add `names` to the file list of the in-place output `directory` (claimed, so no other run
    writes its marker now); a name listed already costs no write."""
    marker = read_marker(directory)
    if marker is None:
        raise OutputError(f"{directory!r} is not a claimed trust_fast output; claim it first")
    listed = marker.get("files")
    if isinstance(listed, list) and not set(names) <= set(listed):
        _dump_marker(directory, {**marker, "files": sorted({*listed, *names})})


@contextlib.contextmanager
def in_place_file(directory: str, name: str) -> Iterator[str]:
    """A file `name` written atomically (:func:`atomic_path`) into `directory`, an in-place output
    claimed with ``claim_output(..., staged=False)`` (checkpoint directories). The name is added to
    the directory's marker before the file appears, so a later overwrite knows the file is
    trust_fast's and everything else in the directory is the user's."""
    register_files(directory, [name])
    with atomic_path(os.path.join(directory, name), os.path.splitext(name)[1]) as tmp:
        yield tmp


def write_csv_atomic(rows: list[dict], path: str, append: bool = False) -> None:
    """Write dict rows (columns: the first row's keys) as CSV through a temp file.

    With ``append`` the rows already in ``path`` are kept ahead of the new ones;
    a file with other columns is refused (ValueError naming both) and left as it was."""
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    fields = list(rows[0])
    old: list[dict] = []
    if append and os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is not None and list(reader.fieldnames) != fields:
                raise ValueError(f"{path} has columns {reader.fieldnames}, the new rows {fields}: write to another file")
            old = list(reader)
    with atomic_path(str(path), ".csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(old)
        w.writerows(rows)


def write_json_atomic(obj, path: str) -> None:
    """`obj` as strict JSON: every non-finite float (an undefined metric) is written as null, since
    JSON has no NaN or Infinity and strict parsers refuse the bare words Python writes for them."""
    with atomic_path(path, ".json") as tmp, open(tmp, "w") as f:
        json.dump(_finite_or_none(obj), f, indent=2, allow_nan=False)


def _finite_or_none(obj):
    """`obj` with non-finite floats replaced by None, through dicts, lists and tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def save_file_atomic(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """safetensors save_file through a temp file in the same directory. Refuses (ValueError, one
    line, nothing written) a floating tensor holding NaN or Inf: no weight file trust_fast writes
    (patches, the world's classifier) carries one."""
    from safetensors.torch import save_file

    import torch

    for name, t in tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t if t.element_size() > 1 else t.float()).all()):
            raise ValueError(f"refusing to write {path!r}: tensor {name!r} holds NaN or Inf")

    with atomic_path(path, ".safetensors") as tmp:
        save_file(tensors, tmp, metadata=metadata)


def is_json_report(path: str) -> bool:
    """True for a JSON report trust_fast wrote (it carries ``"written_by": "trust_fast"``)."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and obj.get("written_by") == "trust_fast"


def save_pipeline(pipe, path: str, *, what: str = "output directory", overwrite: bool = False,
                  inputs: Iterable[tuple[str, str | None]] = ()) -> None:
    """``pipe.save_pretrained`` into a claimed directory (see :func:`claim_output`)."""
    with claim_output(path, what, overwrite=overwrite, inputs=inputs) as out:
        write_pretrained(pipe, out.path)


def write_pretrained(pipe, directory: str) -> None:
    """``pipe.save_pretrained(directory)`` in the weights variant the pipeline was loaded with
    (``pipe.trust_fast_variant``, set by trust_fast's loader), so a pipeline saved as fp16 comes
    back as fp16 files; every component keeps its dtype. Every pipeline trust_fast writes passes
    here, so none holds a NaN or Inf weight (trust_fast.guard.NonFiniteWeights, one line, before
    anything is written)."""
    from .guard import check_finite

    check_finite(pipe, "refusing to save", collective=False)
    pipe.save_pretrained(directory, variant=getattr(pipe, "trust_fast_variant", None))
