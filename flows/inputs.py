"""Turn the user's data options into content-hashed handles for the cache keys."""

from __future__ import annotations

from pathlib import Path

from tasks.extract import list_images
from tasks.hashing import HashMemo, sha256_json
from tasks.sources import DataError, default_image_root, detect_format


def open_memo(out: str) -> HashMemo:
    """The file-hash memo kept under an output folder."""
    return HashMemo(Path(out) / ".cache" / "file-hashes.sqlite")


def data_handles(data: str, images: str | None, memo: HashMemo) -> tuple[dict, dict, str]:
    """(source handle, image-root handle, format); raises DataError naming what is wrong."""
    source = Path(data).expanduser().resolve()
    fmt = detect_format(source)
    root = Path(images).expanduser().resolve() if images else default_image_root(source, fmt)
    if not root.is_dir():
        hint = "" if images else " (pass --images DIR)"
        raise DataError(f"image folder not found: {root}{hint}")
    # The extract stage only needs which files exist, so the folder's key is its listing;
    # image contents are keyed later, by the stages that decode them.
    listing = {"path": str(root), "sha256": sha256_json(sorted(list_images(root)))}
    if fmt == "folders":
        return listing, listing, fmt
    try:
        digest = memo.file(source)
    except OSError as error:
        raise DataError(f"cannot read metadata {source}: {error.strerror}") from error
    return {"path": str(source), "sha256": digest}, listing, fmt


def images_handle(manifest_path: str, image_root: str, memo: HashMemo) -> dict:
    """Content hash of every image a manifest names (re-hashing only changed files)."""
    import pandas as pd

    paths = sorted(pd.read_parquet(manifest_path, columns=["path"])["path"])
    root = Path(image_root)
    digests = memo.files(root / p for p in paths)
    return {"path": str(root), "sha256": sha256_json(list(zip(paths, digests)))}


def weights_handle(choice: str, backbone: str, memo: HashMemo) -> dict:
    """'none', 'imagenet' (downloaded into torch's hub cache when missing) or a local file."""
    from tasks.models import ensure_pretrained

    if choice == "none":
        return {"kind": "none"}
    path = ensure_pretrained(backbone) if choice == "imagenet" else Path(choice).expanduser().resolve()
    if not path.is_file():
        raise DataError(f"weights file not found: {path}")
    return {"kind": choice if choice == "imagenet" else "file", "path": str(path), "sha256": memo.file(path)}
