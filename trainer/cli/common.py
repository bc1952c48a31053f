"""What every `elit-train` subcommand shares: the command line as recorded in artifacts."""
from __future__ import annotations

import shlex
import sys


def command_line(argv: list[str] | None) -> str:
    """`elit-train …` as typed (shell-quoted), for `producer.command` and run folders."""
    return "elit-train " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
