"""Do faces found by `agelens predict` look to the model as its training faces did?

On real face crops (a labels CSV such as FairFace's) scored with a champion model:
  * detect vs whole: the decade with detection (the face found, cropped to the model's framing)
    against `--no-detect` (the crop taken whole, as training decoded it), per face;
  * alone vs group: the decade of a face pasted alone into a photo against the same face, at the
    same place, with others beside it (a group photo);
each for the framing the model recorded and for the earlier fixed margin (the face box plus 40%
of its side around it), with a 95% interval. Target: >= 90% agreement for both.

    .venv/bin/python bench/framing.py --models OUT --data ../shared/data/fairface/labels.csv [--faces 300]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.measure import machine  # noqa: E402
from agelens.flows.predict.scoring import load_scorer, score  # noqa: E402
from agelens.tasks.model.faces import Framing  # noqa: E402

# The fixed margin predict used before framings were measured: a square of the box's larger side
# plus 40% of it on every side, centred on the box.
FIXED_MARGIN = Framing(cx=0.5, cy=0.5, width=1 / 1.8, height=1 / 1.8)
GROUP = 3  # faces per group photo
GAP = 0.125  # between faces, in face widths: heads close together, as in a group photo


def agreement(a: list[str], b: list[str], seed: int = 0) -> str:
    same = np.array(a) == np.array(b)
    draws = np.random.default_rng(seed).integers(0, len(same), (1000, len(same)))
    low, high = np.percentile(same[draws].mean(1), [2.5, 97.5])
    return f"{same.mean():.3f} [{low:.3f}, {high:.3f}] of {len(same)} faces"


def group_photos(files: list[Path], folder: Path) -> list[tuple[Path, list[Path]]]:
    """(group photo, [photo of each face alone]): GROUP faces side by side on a grey background, GAP
    apart, and each face alone at the same place of the same canvas."""
    made = []
    for start in range(0, len(files) - GROUP + 1, GROUP):
        faces = [np.asarray(Image.open(f).convert("RGB")) for f in files[start:start + GROUP]]
        side = max(max(f.shape[:2]) for f in faces)
        gap = int(GAP * side)
        blank = np.full((2 * side, GROUP * side + (GROUP - 1) * gap + side, 3), 128, np.uint8)
        group, alone = blank.copy(), []
        for k, face in enumerate(faces):
            x = side // 2 + k * (side + gap)
            place = (slice(side // 2, side // 2 + face.shape[0]), slice(x, x + face.shape[1]))
            group[place] = face
            single = blank.copy()
            single[place] = face
            alone.append(folder / f"alone_{start + k:05d}.png")
            Image.fromarray(single).save(alone[-1])
        made.append((folder / f"group_{start:05d}.png", alone))
        Image.fromarray(group).save(made[-1][0])
    return made


def decades(rows: list[dict]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for row in rows:  # faces in a file, left to right
        found.setdefault(row["file"], []).append(row["decade"])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", required=True, help="the pipeline's --out holding the champion")
    parser.add_argument("--config", help="whose champion, where there are several")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/fairface/labels.csv"))
    parser.add_argument("--faces", type=int, default=300)
    args = parser.parse_args()
    labels = pd.read_csv(args.data).sample(frac=1.0, random_state=0).head(args.faces)
    files = [Path(args.data).parent / p for p in labels["path"]]
    scorer = load_scorer(args.models, args.config)
    measured = Framing.of(scorer.facts.get("framing"))
    print(f"machine: {machine()}\nmodel: {scorer.source}, {scorer.facts['backbone']} at {scorer.facts['image_size']} px; "
          f"faces: {len(files)} from {args.data}")
    whole, _ = score([str(f) for f in files], scorer, detect=False, progress=False)
    whole = decades(whole)
    with tempfile.TemporaryDirectory() as tmp:
        groups = group_photos(files, Path(tmp))
        for name, framing in (("recorded framing", measured), ("fixed 40% margin", FIXED_MARGIN)):
            scorer.facts["framing"] = dataclasses.asdict(framing)
            rows, _ = score([str(f) for f in files], scorer, progress=False)
            taken_whole = sum(r["crop"] == "whole" for r in rows)
            found = decades(rows)
            single = [f for f in files if len(found.get(str(f), [])) == 1]
            alone, _ = score([str(a) for _, members in groups for a in members], scorer, progress=False)
            alone = decades(alone)
            together, _ = score([str(g) for g, _ in groups], scorer, progress=False)
            together = decades(together)
            pairs = [(alone[str(a)][0], faces[k]) for g, members in groups
                     if len(faces := together.get(str(g), [])) == GROUP
                     for k, a in enumerate(members) if len(alone.get(str(a), [])) == 1]
            print(f"{name} {dataclasses.astuple(framing)[:4]}: one face found in {len(single)} of {len(files)} crops, "
                  f"{taken_whole} of them taken whole (framed as the training images)")
            print(f"  detect vs whole: {agreement([found[str(f)][0] for f in single], [whole[str(f)][0] for f in single])}")
            print(f"  alone vs group:  {agreement([a for a, _ in pairs], [b for _, b in pairs])} "
                  f"(groups with all {GROUP} faces found: {sum(len(together.get(str(g), [])) == GROUP for g, _ in groups)} "
                  f"of {len(groups)})")


if __name__ == "__main__":
    main()
