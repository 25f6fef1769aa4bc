"""Stage split: check every source image once and fix the train/val/test split for all later stages.

Reads the ``data:`` section of params.yaml and writes data/split/ (see transferlab.data).
Data problems end the stage with one message naming all of them and exit status 1,
without writing anything.
"""

import sys
import time
from pathlib import Path

from transferlab import data
from transferlab.params import load_for_stage

SPLIT_DIR = Path("data/split")


def main() -> None:
    start = time.perf_counter()
    params = load_for_stage("split")
    try:
        split = data.make_split(params["data"])
    except data.DataError as error:
        sys.exit(f"split: {error}")
    data.write_split(split, SPLIT_DIR)
    sizes = ", ".join(f"{name} {split.summary['splits'][name]['total']}" for name in data.SPLITS)
    skipped = f"; {len(split.bad_files)} bad files left out (bad_files.csv)" if len(split.bad_files) else ""
    print(
        f"split: {len(split.manifest)} images, {len(split.classes)} classes ({sizes}){skipped} "
        f"-> {SPLIT_DIR} in {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
