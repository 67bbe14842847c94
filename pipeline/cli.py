"""The argument parser of the pipeline's commands and benchmarks: a bad argument is one line, exit 2.

argparse prints its usage block and then the error; here the error comes first and the usage follows on
the same line, so the line names what was wrong and what the command accepts.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        usage = " ".join(self.format_usage().split()).removeprefix("usage: ")
        self.exit(2, f"error: {message}; usage: {usage}\n")
