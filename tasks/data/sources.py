"""Readers for the three ways labelled faces arrive, each returning one raw table.

Formats are told apart by content, not by file extension:
  * CACD metadata, MATLAB v5 (`scipy.io`) or v7.3 (HDF5, `h5py`);
  * a CSV with columns `path`, `age` and optionally `identity`;
  * a folder with one sub-folder per label (`20s`-style names are decades).
"""

from __future__ import annotations

# numpy, pandas, scipy and h5py are imported where used: a cached run only lists folders.

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from agelens.tasks.core.errors import DataError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
CACD_FILE = re.compile(r"^(\d+)_(.+)_(\d+)\.[A-Za-z]+$")
HEADER_BYTES = 65536  # enough for any CSV header line


class Listing(NamedTuple):
    files: set[str]  # '/'-separated paths relative to the image root, regular files only
    outside_root: set[str]  # symlinks (files or folders) that lead outside the root: not followed
    special: set[str] = set()  # FIFOs, sockets, devices: never read (reading a FIFO would hang)
    bad_names: tuple[str, ...] = ()  # names that are not UTF-8, shown escaped: skipped


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # os.scandir hands undecodable bytes over as lone surrogates
        return False


def is_output_folder(path: Path) -> bool:
    """A folder agelens writes into (it holds `.agelens/`): never part of a data set."""
    return (path / ".agelens").is_dir()


def list_images(root: Path, exclude=()) -> Listing:
    """Every regular file below `root`, in one scan (no stat per plain file). A symlink is
    followed only when its target stays inside the root; the others are reported, not read.
    Folders in `exclude` and output folders of agelens are skipped, so an `--out` inside the
    image root never changes the listing."""
    root = Path(root).resolve()
    skip = {Path(p).resolve() for p in exclude}
    files, outside, special, bad, visited = set(), set(), set(), [], {root}
    todo = [(root, "")]
    while todo:
        folder, prefix = todo.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if not _utf8(entry.name):
                    bad.append((prefix + entry.name).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))
                    continue
                relative = prefix + entry.name
                if entry.is_symlink():
                    target = Path(entry.path).resolve()
                    if not target.exists():
                        continue  # a broken link is simply a missing image
                    if not target.is_relative_to(root):
                        outside.add(relative)
                    elif target.is_dir():
                        if target not in visited and target not in skip and not is_output_folder(target):
                            visited.add(target)
                            todo.append((target, relative + "/"))
                    elif target.is_file():
                        files.add(relative)
                    else:
                        special.add(relative)
                elif entry.is_dir(follow_symlinks=False):
                    path = Path(entry.path)
                    if path not in skip and not is_output_folder(path):
                        todo.append((path, relative + "/"))
                elif entry.is_file(follow_symlinks=False):
                    files.add(relative)
                else:
                    special.add(relative)
    return Listing(files, outside, special, tuple(sorted(bad)))


def detect_format(path: Path) -> str:
    """'mat-v5', 'mat-v73', 'csv' or 'folders', from the content of `path`."""
    if path.is_dir():
        return "folders"
    if not path.exists():
        raise DataError(f"metadata not found: {path}")
    if not path.is_file():
        raise DataError(f"metadata {path} is not a regular file (a FIFO, socket or device is never read)")
    try:
        with open(path, "rb") as handle:
            head = handle.read(HEADER_BYTES)
    except OSError as error:
        raise DataError(f"cannot read metadata {path}: {error.strerror}") from error
    import h5py

    if head.startswith(b"MATLAB 7.3") or h5py.is_hdf5(path):
        return "mat-v73"
    if head.startswith(b"MATLAB 5.0"):
        return "mat-v5"
    # Only the header line matters; a character cut by the read limit must not reject the file.
    first_line = head.split(b"\n", 1)[0].decode("utf-8-sig", errors="replace").rstrip("\r")
    columns = {c.strip().strip('"').lower() for c in first_line.split(",")}
    if {"path", "age"} <= columns:
        return "csv"
    raise DataError(
        f"unrecognised metadata {path}: not a MATLAB .mat file, not a CSV with columns "
        "'path' and 'age', and not a folder of label folders"
    )


def default_image_root(source: Path, fmt: str) -> Path:
    if fmt == "folders":
        return source
    if fmt.startswith("mat"):
        return source.parent / "CACD2000"
    return source.parent


def read_source(path: Path, fmt: str, listing: Listing | None = None) -> "pd.DataFrame":
    """Raw rows: `path` (relative to the image root) and whichever of age, identity,
    year, birth, rank, lfw, name and label the source has."""
    if fmt == "folders":
        return read_label_folders(path, listing)
    readers = {"mat-v5": read_mat_v5, "mat-v73": read_mat_v73, "csv": read_csv}
    return readers[fmt](path)


def _identity_names(identity: "np.ndarray", files: list[str], people: dict[int, str]) -> list[str]:
    if people:
        return [people.get(int(i), "") for i in identity]
    return [m.group(2) if (m := CACD_FILE.match(f)) else "" for f in files]


def _cacd_table(fields: dict, files: list[str], people: dict[int, str]) -> "pd.DataFrame":
    import numpy as np
    import pandas as pd

    n = len(files)
    table = {"path": files}
    for name in ("age", "identity", "year", "birth", "rank", "lfw"):
        values = fields.get(name)
        if values is not None and values.size == n:
            table[name] = values.astype(np.int64)
    if "identity" in table:
        table["name"] = _identity_names(table["identity"], files, people)
    return pd.DataFrame(table)


def read_mat_v5(path: Path) -> "pd.DataFrame":
    import numpy as np
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, variable_names=("celebrityImageData", "celebrityData"))
    except Exception as error:  # scipy raises several types for a damaged file
        raise DataError(f"cannot read MATLAB file {path}: {error}") from error
    if "celebrityImageData" not in mat:
        found = [name for name, _, _ in scipy.io.whosmat(path)]
        raise DataError(f"{path} has no struct 'celebrityImageData' (found: {found or 'nothing'})")
    record = mat["celebrityImageData"][0, 0]
    names = record.dtype.names or ()
    if "name" not in names or "age" not in names:
        raise DataError(f"{path}: struct 'celebrityImageData' lacks fields 'name'/'age' (has {list(names)})")
    fields = {f: np.asarray(record[f]).ravel() for f in names if f not in ("name", "feature")}
    files = [str(cell[0]) if cell.size else "" for cell in record["name"].ravel()]
    people = {}
    if "celebrityData" in mat:
        celeb = mat["celebrityData"][0, 0]
        if {"name", "identity"} <= set(celeb.dtype.names or ()):
            ids = np.asarray(celeb["identity"]).ravel()
            people = {int(i): (str(c[0]) if c.size else "") for i, c in zip(ids, celeb["name"].ravel())}
    return _cacd_table(fields, files, people)


def _h5_strings(h5file, refs) -> list[str]:
    # MATLAB v7.3 keeps each string as a uint16 (UTF-16) array behind an object reference.
    return [h5file[ref][()].ravel().astype("<u2").tobytes().decode("utf-16-le") for ref in refs.ravel()]


def read_mat_v73(path: Path) -> "pd.DataFrame":
    import h5py
    import numpy as np

    try:
        h5 = h5py.File(path, "r")
    except OSError as error:
        raise DataError(f"cannot read MATLAB v7.3 (HDF5) file {path}: {error}") from error
    with h5:
        if "celebrityImageData" not in h5:
            found = [k for k in h5 if not k.startswith("#")]
            raise DataError(f"{path} has no struct 'celebrityImageData' (found: {found or 'nothing'})")
        group = h5["celebrityImageData"]
        if "name" not in group or "age" not in group:
            raise DataError(f"{path}: struct 'celebrityImageData' lacks fields 'name'/'age' (has {list(group)})")
        fields = {f: np.asarray(group[f]).ravel() for f in group if f not in ("name", "feature")}
        files = _h5_strings(h5, np.asarray(group["name"]))
        people = {}
        celeb = h5.get("celebrityData")
        if celeb is not None and "name" in celeb and "identity" in celeb:
            ids = np.asarray(celeb["identity"]).ravel()
            people = dict(zip((int(i) for i in ids), _h5_strings(h5, np.asarray(celeb["name"]))))
    return _cacd_table(fields, files, people)


def read_csv(path: Path) -> "pd.DataFrame":
    import pandas as pd

    try:
        table = pd.read_csv(path, dtype={"path": str}, skipinitialspace=True)
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as error:
        raise DataError(f"cannot parse CSV {path}: {error}") from error
    table.columns = [c.strip().lower() for c in table.columns]
    keep = [c for c in ("path", "age", "identity", "year", "birth", "name") if c in table.columns]
    table = table[keep].copy()
    table["age"] = pd.to_numeric(table["age"], errors="coerce")
    table["path"] = table["path"].fillna("").astype(str)
    if "identity" in table.columns:
        table["identity"] = table["identity"].astype(str)
    return table


def read_label_folders(root: Path, listing: Listing | None = None) -> "pd.DataFrame":
    """One row per image file in a label folder (`<root>/<label>/<image>`). Links leading outside
    the root and entries that are not regular files are listed too (validation drops and counts
    them, never reads them); output folders of agelens and names that are not UTF-8 are left out."""
    import pandas as pd

    skip = set(listing.bad_names) if listing else set()
    rows = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.is_dir() or entry.name.startswith(".") or not _utf8(entry.name) or is_output_folder(Path(entry.path)):
            continue
        for image in sorted(os.scandir(entry.path), key=lambda e: e.name):
            if _utf8(image.name) and Path(image.name).suffix.lower() in IMAGE_SUFFIXES and \
                    not image.is_dir(follow_symlinks=False) and f"{entry.name}/{image.name}" not in skip:
                rows.append((f"{entry.name}/{image.name}", entry.name))
    if not rows:
        raise DataError(f"{root} holds no label folders with images (expected e.g. {root}/20s/*.jpg)")
    return pd.DataFrame(rows, columns=["path", "label"])
