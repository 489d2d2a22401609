"""How long extraction takes on the real CACD metadata with a same-sized image folder.

Target (issue 2): under 3 s for 163,446 rows. The folder holds one empty file per
row; extraction only lists the folder, so file contents do not matter here.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from tasks.extract import list_images, validate
from tasks.sources import detect_format, read_source

DEFAULT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cacd" / "celebrity2000_meta.mat"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--meta", type=Path, default=DEFAULT)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    names = read_source(args.meta, "mat-v5")["path"].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "CACD2000"
        root.mkdir()
        for name in names:
            os.close(os.open(root / name, os.O_CREAT | os.O_WRONLY))
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            fmt = detect_format(args.meta)
            raw = read_source(args.meta, fmt)
            table, summary = validate(raw, list_images(root))
            table.to_parquet(Path(tmp) / "metadata.parquet", index=False)
            times.append(time.perf_counter() - start)
    best = min(times)
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"extract {summary['rows_out']:,} of {summary['rows_in']:,} rows "
          f"({len(names):,} files in the folder): best {best:.2f} s of {args.repeat}, "
          f"runs {', '.join(f'{t:.2f}' for t in times)} s")
    print(f"target 3.00 s: ratio target/best = {3.0 / best:.2f}x ({'met' if best < 3 else 'NOT met'})")


if __name__ == "__main__":
    main()
