"""How long extraction takes on the real CACD metadata with a same-sized image folder.

Target: under 3 s for 163,446 rows. The folder holds one empty file per row;
extraction only lists the folder, so file contents do not matter here.

    .venv/bin/python bench/extract_speed.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.measure import machine, spread  # noqa: E402
from agelens.tasks.data.validation import validate  # noqa: E402
from agelens.tasks.data.sources import detect_format, list_images, read_source  # noqa: E402

DEFAULT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cacd" / "celebrity2000_meta.mat"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meta", type=Path, default=DEFAULT)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a smoke run: one repeat")
    args = parser.parse_args()
    names = read_source(args.meta, "mat-v5")["path"].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "CACD2000"
        root.mkdir()
        for name in names:
            os.close(os.open(root / name, os.O_CREAT | os.O_WRONLY))
        times = []
        for _ in range(1 if args.quick else max(3, args.repeat)):
            start = time.perf_counter()
            fmt = detect_format(args.meta)
            raw = read_source(args.meta, fmt)
            table, summary = validate(raw, list_images(root))
            table.to_parquet(Path(tmp) / "metadata.parquet", index=False)
            times.append(time.perf_counter() - start)
    print(f"machine:  {machine()}")
    print(f"compared: extraction of {summary['rows_out']:,} of {summary['rows_in']:,} rows ({len(names):,} files in "
          f"the folder) against the 3 s target")
    print(f"extract:  {spread(times, ' s')}; target 3.00 s / median = {3.0 / statistics.median(times):.2f}x "
          f"({'met' if statistics.median(times) < 3 else 'NOT met'})")


if __name__ == "__main__":
    main()
