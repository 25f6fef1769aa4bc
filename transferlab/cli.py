"""The command line every stage script shares, so they all behave alike.

``python stages/<stage>.py --help`` prints the stage's docstring and its positional arguments;
params.yaml is loaded and validated once, here, and handed to the stage's ``main``; the errors a
user can cause (bad params, a stale input, a bad weights file, a diverging run...) end the stage
with one line ``<stage>: <what is wrong>`` and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from transferlab.params import load_for_stage


def run(
    stage: str,
    main: Callable[..., int | None],
    doc: str,
    arguments: dict[str, Sequence[str]] | None = None,
    errors: tuple[type[BaseException], ...] = (),
    argv: list[str] | None = None,
) -> None:
    """Parse ``arguments`` (positional name -> allowed values), then exit with ``main(params, *values)``.

    ``errors``: the exception types that are the user's to fix; their message becomes the one line."""
    parser = argparse.ArgumentParser(
        prog=f"stages/{stage}.py", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, choices in (arguments or {}).items():
        parser.add_argument(name, choices=list(choices), metavar=name.upper(), help=", ".join(choices))
    values = list(vars(parser.parse_args(argv)).values())
    params = load_for_stage(stage)
    try:
        status = main(params, *values)
    except errors as error:
        raise SystemExit(f"{stage}: {error}") from None
    sys.exit(status or 0)
