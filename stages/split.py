"""Stage split: check every source image once and fix the train/val/test split for all later stages.

Reads the ``data:`` section of params.yaml and writes data/split/ (see transferlab.data).
Data problems end the stage with one message naming all of them and exit status 1,
without writing anything.
"""

import time

from transferlab import cli, data, layout


def main(params: dict) -> None:
    start = time.perf_counter()
    split = data.make_split(params["data"])
    data.write_split(split, layout.SPLIT)
    sizes = ", ".join(f"{name} {split.summary['splits'][name]['total']}" for name in data.SPLITS)
    skipped = f"; {len(split.bad_files)} bad files left out (bad_files.csv)" if len(split.bad_files) else ""
    print(
        f"split: {len(split.manifest)} images, {len(split.classes)} classes ({sizes}){skipped} "
        f"-> {layout.SPLIT} in {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    cli.run("split", main, __doc__, errors=(data.DataError,))
