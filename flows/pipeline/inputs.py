"""This run's external inputs: where they are now, and a content hash of each.

Locations always come from the run's own options, never from a cached result, so a moved
dataset with identical bytes is served from the cache and read from its new place.
"""

from __future__ import annotations

import functools
import os
from importlib.metadata import version
from pathlib import Path

from agelens.flows.pipeline.demo import DEMO_FILE, DEMO_ROOT
from agelens.tasks.core.errors import AgelensError, DataError
from agelens.tasks.core.hashing import HashMemo, sha256_json
from agelens.tasks.core.stage import output_path
from agelens.tasks.data.sources import default_image_root, detect_format, list_images


def open_memo(out: str | Path) -> HashMemo:
    """The file-hash memo kept under an output folder (in memory where it cannot be written)."""
    return HashMemo(Path(out) / ".cache" / "file-hashes.sqlite")


class Inputs:
    """Content handles of the data a run reads, computed on first use and remembered."""

    def __init__(self, data: str, images: str | None, weights: str, backbone: str, memo: HashMemo,
                 out: str | Path | None = None, settings=None, fetch: bool = True):
        self.data, self.images_option, self.weights_choice, self.backbone = data, images, weights, backbone
        self.memo, self.out, self.settings, self.fetch = memo, out, settings, fetch

    @classmethod
    def of(cls, settings, memo: HashMemo, make_demo: bool = True) -> "Inputs":
        """The inputs of a run with these settings; the demo's data is generated first, and model
        files are downloaded, when `make_demo` (otherwise only their expected places are named)."""
        if settings.data is not None:
            data = settings.data
        elif make_demo:
            from agelens.flows.pipeline.demo import demo_data

            data = demo_data()
        else:
            data = str(DEMO_ROOT / DEMO_FILE)
        return cls(data, settings.images, settings.weights_choice, settings.backbone, memo, settings.out, settings,
                   fetch=make_demo)

    def get(self, name: str, upstream: dict[str, dict], out: str) -> dict:
        """The handle of input `name` ("images" needs the split's result)."""
        if name == "images":
            return self.sampled_images(output_path(out, upstream["split"], "manifest"))
        if name == "champion":
            return self.champion(upstream["train"]["outputs"]["model"]["sha256"])
        return getattr(self, name)

    @functools.cached_property
    def located(self) -> tuple[Path, str, Path]:
        """(metadata file or label-folder root, its format, image root)."""
        given = Path(self.data).expanduser()
        if given.is_fifo():  # `--data <(cat labels.csv)`
            raise DataError(f"--data {given} is a pipe: agelens reads the metadata more than once (to key the run, "
                            "then to extract it); save it to a file first")
        source = given.resolve()
        fmt = detect_format(source)
        root = Path(self.images_option).expanduser().resolve() if self.images_option else default_image_root(source, fmt)
        if not root.is_dir():
            hint = "" if self.images_option else " (pass --images DIR)"
            raise DataError(f"image folder not found: {root}{hint}")
        return source, fmt, root

    @functools.cached_property
    def source(self) -> dict:
        source, fmt, root = self.located
        if fmt == "folders":  # the labels are the folder names: the listing is the metadata
            return {"path": str(source), "format": fmt, "sha256": sha256_json([fmt, self.listing["sha256"]])}
        try:
            digest = self.memo.file(source)
        except OSError as error:
            raise DataError(f"cannot read metadata {source}: {error.strerror}") from error
        return {"path": str(source), "format": fmt, "sha256": sha256_json([fmt, digest])}

    @functools.cached_property
    def listing(self) -> dict:
        """Which image files exist: extract only needs names (contents are keyed by decode).
        The output folder is left out, so outputs written inside the image root never count."""
        _, _, root = self.located
        exclude = [str(Path(self.out).expanduser().resolve())] if self.out else []
        found = list_images(root, exclude)
        return {"path": str(root), "exclude": exclude,
                "sha256": sha256_json([sorted(found.files), sorted(found.outside_root), sorted(found.special)])}

    @functools.cache
    def sampled_images(self, manifest: Path) -> dict:
        """Content hash of every image the split drew (re-hashing only changed files)."""
        import pyarrow.parquet as pq

        _, _, root = self.located
        paths = sorted(pq.ParquetFile(manifest).read(columns=["path"]).column("path").to_pylist())
        try:
            digests = self.memo.files(root / p for p in paths)
        except OSError as error:
            raise DataError(f"cannot read image {error.filename}: {error.strerror}") from error
        return {"path": str(root), "sha256": sha256_json(list(zip(paths, digests)))}

    @functools.cache
    def champion(self, model_digest: str) -> dict:
        """The champion that the model `model_digest` is compared with (flows/registry/models.py)."""
        from agelens.flows.registry.models import handle

        return handle(Path(self.out).expanduser().resolve(), self.settings, self.memo.file, model_digest)

    @functools.cached_property
    def face_detector(self) -> dict:
        """The face detector the framing stage measures with (tasks/core/downloads.py), or "none" and
        why, where it cannot be had: the framing is then the default, until the detector comes."""
        from agelens.tasks.core.downloads import YUNET, locate

        try:
            path = locate(YUNET, fetch=self.fetch, progress=False)
            return {"path": str(path), "sha256": self.memo.file(path)}
        except (AgelensError, OSError) as error:
            return {"sha256": "none", "why": str(error)}

    @functools.cached_property
    def weights(self) -> dict:
        """'none', 'imagenet' (torch's hub cache) or a local file; content-hashed."""
        if self.weights_choice == "none":
            return {"kind": "none", "sha256": "none"}
        if self.weights_choice == "imagenet":
            path = self.pretrained_file()
            if not path.is_file():
                from agelens.tasks.model.backbones import ensure_pretrained

                path = ensure_pretrained(self.backbone)
        else:
            path = Path(self.weights_choice).expanduser().resolve()
        if not path.is_file():
            raise DataError(f"weights file not found: {path}")
        return {"kind": "imagenet" if self.weights_choice == "imagenet" else "file", "path": str(path),
                "sha256": self.memo.file(path)}

    def pretrained_file(self) -> Path:
        """Where torch keeps the ImageNet weights of the backbone (remembered per torchvision
        version, so a cached run need not import torchvision to know)."""
        def compute() -> str:
            from agelens.tasks.model.backbones import pretrained_file

            return pretrained_file(self.backbone).name

        name = self.memo.remember(f"pretrained/{self.backbone}/{version('torchvision')}", compute)
        torch_home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
        return Path(torch_home).expanduser() / "hub" / "checkpoints" / name
