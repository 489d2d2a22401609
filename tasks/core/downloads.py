"""Model files obtained on first use, as torchvision obtains its weights: downloaded from their
official source (or a mirror named by `$AGELENS_MODELS_URL`: a base URL or a folder) into the
user's cache (tasks/core/places.py), checked against their sha256, moved into place whole, with
progress. Written here rather than with torch.hub's downloader, which has no timeout and would
make a face detector need torch."""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from agelens.tasks.core.errors import DataError
from agelens.tasks.core.hashing import sha256_file
from agelens.tasks.core.places import cache_dir

MIRROR_ENV = "AGELENS_MODELS_URL"
TIMEOUT_S = 20.0
CHUNK = 1 << 16


@dataclass(frozen=True)
class ModelFile:
    name: str
    sha256: str
    url: str  # where its publisher serves it
    what: str  # for people: what it is, its licence
    local_env: str  # the variable naming a local copy instead

    @property
    def cached(self) -> Path:
        return cache_dir() / "models" / self.name


YUNET = ModelFile(
    name="face_detection_yunet_2026may.onnx",
    sha256="ebafce4e3c118d6554634be5c27ab333b4c047a9a8c3faf1d7cf93101c22f0f0",
    url="https://github.com/opencv/opencv_zoo/raw/main/models/face_detection_yunet/face_detection_yunet_2026may.onnx",
    what="the face detector YuNet (OpenCV Zoo, MIT licence)",
    local_env="AGELENS_FACE_MODEL",
)
MODEL_FILES = (YUNET,)  # what `agelens fetch-models` fetches


def source_url(model: ModelFile) -> str:
    """The publisher's URL, or the same file name under `$AGELENS_MODELS_URL` (a URL or a folder)."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if not mirror:
        return model.url
    if urllib.parse.urlsplit(mirror).scheme in ("http", "https", "file", "ftp"):
        return mirror.rstrip("/") + "/" + urllib.parse.quote(model.name)
    return (Path(mirror).expanduser().resolve() / model.name).as_uri()


def _unavailable(model: ModelFile, url: str, why: str) -> DataError:
    return DataError(f"{model.what} ({model.name}) is not in the cache {model.cached} and could not be obtained from "
                     f"{url} ({why}): put it there, set {MIRROR_ENV} to a mirror (a base URL or a folder holding "
                     f"{model.name}), or {model.local_env} to a local copy (`agelens fetch-models` fetches ahead of "
                     "time)")


def download(model: ModelFile, progress: bool = True) -> Path:
    """Fetch `model` into the cache now (replacing whatever is there only when it checks out)."""
    url = source_url(model)
    target = model.cached
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create the cache folder {target.parent}: {error.strerror}") from None
    partial = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    digest = hashlib.sha256()
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "agelens"})
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            bar = _bar(total, f"downloading {model.name}", progress)
            while block := response.read(CHUNK):
                out.write(block)
                digest.update(block)
                bar.update(len(block))
            bar.close()
        if digest.hexdigest() != model.sha256:
            raise DataError(f"refused {url}: its sha256 is {digest.hexdigest()[:16]}..., not {model.name}'s "
                            f"{model.sha256[:16]}... (a damaged or different file); nothing was cached")
        os.replace(partial, target)
    except DataError:
        raise
    except urllib.error.HTTPError as error:
        raise _unavailable(model, url, f"HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        reason = error.reason
        raise _unavailable(model, url, reason.strerror if isinstance(reason, OSError) and reason.strerror
                           else str(reason)) from None
    except OSError as error:  # timeouts, resets, a full disk
        raise _unavailable(model, url, error.strerror or type(error).__name__) from None
    finally:
        partial.unlink(missing_ok=True)
    return target


def _bar(total: int | None, label: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="B", unit_scale=True, file=sys.stderr,
                disable=None if enabled else True, leave=False)


def locate(model: ModelFile, given: str | None = None, fetch: bool = True, progress: bool = True) -> Path:
    """The file to use: `given` (an option), else `$<local_env>`, else the cached copy when it
    checks out, else a download (when `fetch`). One DataError naming every way otherwise."""
    for path, origin in ((given, "the option"), (os.environ.get(model.local_env), f"${model.local_env}")):
        if path:
            path = Path(path).expanduser()
            if not path.is_file():
                raise DataError(f"{model.what}: {path} (from {origin}) is not a file")
            return path
    if model.cached.is_file() and sha256_file(model.cached) == model.sha256:
        return model.cached
    if not fetch:
        raise _unavailable(model, source_url(model), "not fetched now")
    return download(model, progress)

