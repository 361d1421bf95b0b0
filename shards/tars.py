"""Tar shards: deterministic writing (sorted keys, fixed mtime) and complete reading.

`read_tar_samples` reads a whole tar and raises `TruncatedTarError` on a cut-off file, so a tar
that a killed downloader left half-written is never accepted. `tar_keys` reads only the member
headers (a marker's sample count and keys digest, shards/verify.py).
"""

from __future__ import annotations

import io
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator

from shards.atomic import commit_tmp, tmp_path_for
from shards.identity import remember_sha256, sha256_of

Sample = dict[str, bytes]  # extension -> bytes, plus "__key__" -> key (str encoded)


class TruncatedTarError(ValueError):
    """A tar that ends early or is otherwise unreadable."""


def split_member_name(name: str) -> tuple[str, str]:
    """`dir/000001.jpg -> ("dir/000001", "jpg")`: key is everything before the first dot of the basename."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


def file_members(archive: tarfile.TarFile, path: Path) -> Iterator[tarfile.TarInfo]:
    """The tar's regular files in order, for a tar opened "r:". Raises TruncatedTarError for a
    header with a negative size, or one that points back to an earlier offset (tarfile would go
    round in circles on it), and when the members end without an end-of-archive block: a tar cut
    off between members, or with a header overwritten, where tarfile stops without a word."""
    last = -1
    for member in archive:
        if member.size < 0 or member.offset <= last:
            raise TruncatedTarError(
                f"{path}: member {member.name!r} has a bad header (size {member.size}, at {member.offset})"
            )
        last = member.offset
        if member.isfile():
            yield member
    end = archive.fileobj.seek(archive.offset)
    if archive.fileobj.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
        raise TruncatedTarError(
            f"{path}: no tar header or end-of-archive block at byte {end} (cut off or overwritten)"
        )


def read_tar_samples(path: Path) -> "OrderedDict[str, dict[str, bytes]]":
    """All samples of a tar, grouped by key in file order; raises TruncatedTarError if cut off."""
    samples: OrderedDict[str, dict[str, bytes]] = OrderedDict()
    try:
        with tarfile.open(path, "r:") as archive:
            for member in file_members(archive, path):
                key, ext = split_member_name(member.name)
                data = archive.extractfile(member).read()
                if len(data) != member.size:
                    raise TruncatedTarError(f"{path}: member {member.name} is cut off")
                samples.setdefault(key, {})[ext] = data
    except (tarfile.TarError, EOFError, OSError) as err:
        raise TruncatedTarError(f"{path}: unreadable tar ({err})") from err
    return samples


def tar_keys(path: Path) -> list[str]:
    """The sample keys of a tar in file order, from its member headers alone (the data is skipped);
    raises TruncatedTarError if the tar is cut off or unreadable."""
    keys: dict[str, None] = {}
    try:
        if Path(path).stat().st_size % tarfile.BLOCKSIZE:  # tarfile reads a cut header as the end
            raise tarfile.ReadError(f"size is not a multiple of {tarfile.BLOCKSIZE} bytes: cut off")
        with tarfile.open(path, "r:") as archive:
            for member in file_members(archive, path):
                keys.setdefault(split_member_name(member.name)[0])
    except (tarfile.TarError, EOFError, OSError) as err:
        raise TruncatedTarError(f"{path}: unreadable tar ({err})") from err
    return list(keys)


def write_tar_atomic(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> dict:
    """Write samples (key, {ext: bytes}) in the given order; return size, sha256 and count.

    Members get mtime 0 and root ownership, so equal samples give byte-identical tars.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    count = 0
    try:
        with (
            open(tmp, "wb") as raw,
            tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as archive,
        ):
            for key, fields in samples:
                for ext in sorted(fields):
                    _add_member(archive, f"{key}.{ext}", fields[ext])
                count += 1
        digest = sha256_of(tmp)
        size = tmp.stat().st_size
        commit_tmp(tmp, path)
        remember_sha256(path, digest)  # the marker's record then needs no second read
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"samples": count, "tar_bytes": size, "tar_sha256": digest}


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uname = info.gname = "root"
    archive.addfile(info, io.BytesIO(data))
