"""File output that is never partial: write beside the target, then rename over it."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd


def portable_file_name(name: str, keep: int = 120) -> str:
    """`name` in letters, digits, dot, dash and underscore, without a leading dot, at most `keep` characters (its
    end kept, where the suffix is): safe in any folder, and in a web address."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")[-keep:]


def check_output(out: str | Path, inputs: Iterable[str | Path] = (), others: Iterable[str | Path] = (), option: str = "--out") -> Path:
    """Refuse, before any work, an output that cannot be written or would destroy a file the command reads
    (`inputs`) or writes besides (`others`): an existing folder, a path below a file or in a folder that
    cannot be written, an input (the atomic rename would replace it), another output."""
    from spotmatch.errors import SpotmatchError

    out = Path(out)
    if out.is_dir():
        raise SpotmatchError(f"{option} {out}: is a folder; name a file in it")
    if writes_through(out):  # /dev/stdout, a named pipe: written through (atomic_path)
        if not os.access(out, os.W_OK):
            raise SpotmatchError(f"{option} {out}: cannot be written by this user; write somewhere else")
        return out
    _refuse_unwritable(out, out.resolve().parent, option)
    if out.exists():  # a file that does not exist yet cannot be one the command reads
        target = out.stat()
        for source in inputs:
            try:
                same = os.path.samestat(target, os.stat(source))
            except OSError:
                continue
            if same:
                raise SpotmatchError(f"{option} {out}: is also read by this command ({source}); write to another file, or it is lost")
    for other in others:
        if Path(other).resolve() == out.resolve():
            raise SpotmatchError(f"{option} {out}: another output of this command goes there too; give each its own file")
    return out


def check_output_dir(folder: str | Path, option: str = "--out-dir") -> Path:
    """Refuse, before any work, a folder to write in (an output or cache folder) that is a file, lies below
    a file, or cannot be made or written in."""
    from spotmatch.errors import SpotmatchError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SpotmatchError(f"{option} {folder}: is a file, not a folder; name a folder")
    _refuse_unwritable(folder, folder.absolute(), option)
    return folder


def _refuse_unwritable(target: Path, folder: Path, option: str) -> None:
    """`folder` (where `target` goes) or its nearest existing ancestor must be a folder this user can write in."""
    from spotmatch.errors import SpotmatchError

    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir():
        raise SpotmatchError(f"{option} {target}: {existing} is a file, not a folder; write somewhere else")
    if not os.access(existing, os.W_OK):
        raise SpotmatchError(f"{option} {target}: cannot write in {existing}; write somewhere else")


def new_file_mode() -> int:
    """The mode a plain open() gives a new file: 0o666 less the process's umask (a team's private `umask 077`
    keeps its exports private)."""
    return 0o666 & ~process_umask()


def process_umask() -> int:
    """Read from /proc where Linux has it; elsewhere set and put back at once, the only other way to read it (a
    file another thread makes in between gets 0o022 instead)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def is_special_file(path: str | Path) -> bool:
    """A device, pipe or socket (followed through links): no file to rename onto."""
    path = Path(path)
    return path.exists() and not path.is_file() and not path.is_dir()


def writes_through(path: str | Path) -> bool:
    """Whether an output named `path` is written into as it stands rather than replaced: a device or pipe, and the
    process's own streams (/dev/stdout, /proc/self/fd/1), which lead to whatever the shell redirected them to."""
    return is_special_file(path) or str(Path(path).absolute()).startswith(("/dev/", "/proc/"))


@contextlib.contextmanager
def atomic_path(target: str | Path, durable: bool = True, follow: bool = False) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `target` only on success. `durable`:
    its bytes reach the disk before the rename, else a power cut can leave `target` renamed but empty;
    a cache that reads a damaged entry as a miss can skip that cost.

    `follow`, for an output the user named (`--out`): a link is followed, so that its file gets the output rather
    than the link being replaced; a device, pipe or stream (`--out /dev/stdout`, `>> rounds.csv` behind it) gets
    the finished bytes appended, never a rename (which would replace the device, for root /dev/null itself, or the
    file the shell appends to). Elsewhere (caches, uploads, drawings) whatever stands at `target` is replaced: a
    link or pipe planted in a shared folder must not lead a write elsewhere, or hang it."""
    target = Path(target)
    if follow and writes_through(target):
        fd, tmp_name = tempfile.mkstemp(prefix="spotmatch-out.", suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            yield tmp
            with open(tmp, "rb") as written, open(target, "ab") as stream:
                shutil.copyfileobj(written, stream)
        finally:
            tmp.unlink(missing_ok=True)
        return
    if follow and target.is_symlink():
        target = Path(os.path.realpath(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as written:
                os.fsync(written.fileno())
        # mkstemp makes the file private (0600); give it what a plain open() would have given.
        os.chmod(tmp, target.stat().st_mode & 0o777 if target.exists() else new_file_mode())
        os.replace(tmp, target)
    except OSError as error:
        if error.filename in (None, str(tmp), tmp):  # a write's error names no file, or the hidden temporary one
            raise OSError(error.errno, error.strerror, str(target)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


# Why a file cannot be written where the machine, not the program, is at fault: a full disk, a quota or file-size
# limit, a read-only file system; for a cache folder also no permission, or a file in a folder's place.
DISK_WRITE_FAILURES = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
CACHE_WRITE_FAILURES = DISK_WRITE_FAILURES | {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST}


def write_cache_entry(target: str | Path, write: Callable[[Path], None]) -> bool:
    """`write(tmp)` renamed onto `target`, for a cache entry: it need not reach the disk before the rename (a damaged
    entry reads as a miss), and need not be written at all: where the disk is full or the cache folder cannot be
    written (CACHE_WRITE_FAILURES), the entry is skipped (False) and computed again next time, and the command
    that computed it goes on."""
    try:
        with atomic_path(target, durable=False) as tmp:
            write(tmp)
        return True
    except OSError as error:
        if error.errno in CACHE_WRITE_FAILURES:
            return False
        raise


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's content, read in chunks (checkpoints and weights run to hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_text_atomic(text: str, target: str | Path, follow: bool = False) -> Path:
    """`follow`: an output the user named (atomic_path)."""
    with atomic_path(target, follow=follow) as tmp:
        tmp.write_text(text, encoding="utf-8")  # reports hold − and ×, whatever the locale
    return Path(target)


def write_csv_atomic(frame: pd.DataFrame, target: str | Path, follow: bool = False) -> Path:
    """`follow`: an output the user named (atomic_path)."""
    with atomic_path(target, follow=follow) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(target)


def save_npy(array: np.ndarray, tmp: Path) -> None:
    with open(tmp, "wb") as handle:
        np.save(handle, array)


def read_torch_payload(path: str | Path, fmt: str, kind: str, producer: str, hint: str = "") -> dict:
    """A spotmatch `torch.save` file whose dict says `format: fmt`; one-line errors naming the file and
    the command (`producer`) that writes a good one. Only tensors and plain Python values are unpickled
    (`weights_only`): a checkpoint is shared like data, and a full unpickling would run any code a
    hostile file carries."""
    import torch

    from spotmatch.errors import SpotmatchError

    path = Path(path)
    if path.is_dir():
        raise SpotmatchError(f"{path}: a folder, not a {kind} checkpoint; pass the file in it written by `{producer}`")
    if not path.is_file():
        raise SpotmatchError(f"{path}: {kind} checkpoint not found; pass a file written by `{producer}`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise SpotmatchError(f"{path}: cannot read the {kind} checkpoint ({type(exc).__name__}); the file is damaged"
                             f" or not a checkpoint, write it again with `{producer}`") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise SpotmatchError(f"{path}: not a spotmatch {kind} checkpoint; pass a file written by `{producer}`{hint}")
    return payload
