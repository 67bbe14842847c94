"""How the pipeline's small commands and benchmarks end: a bad argument is one line, exit 2 (argparse prints
its usage block and then the error; here the error comes first and the usage follows on the same line, so the
line names what was wrong and what the command accepts; `whole_number` for counts); in the report commands
(`run_command`), a Ctrl-C is one line, exit 130.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        usage = " ".join(self.format_usage().split()).removeprefix("usage: ")
        self.exit(2, f"error: {message}; usage: {usage}\n")


def whole_number(least: int) -> Callable[[str], int]:
    """An argparse `type`: a whole number >= `least`, refused as "'abc' is not accepted: expected a whole number
    >= 1" (argparse's own "invalid int value" does not say what is accepted, nor that 0 is out of range)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            raise argparse.ArgumentTypeError(f"{text!r} is not accepted: expected a whole number >= {least}")
        return value

    return parse


def run_command(main: Callable[[], int], left_as: str) -> NoReturn:
    """Exits with `main()`'s code; a Ctrl-C, SIGTERM or hang-up stops the command at once instead, in one line saying
    what it `left_as`, exit 130: not Python's traceback, and not lost where it lands in a finalizer."""
    from pipeline.interrupt import caused_by_stop, install_immediate_stop

    install_immediate_stop()
    try:
        code = main()
    except (KeyboardInterrupt, Exception) as error:
        if not caused_by_stop(error):
            raise
        print(f"\ninterrupted: {left_as}", file=sys.stderr, flush=True)
        code = 130
    sys.exit(code)
