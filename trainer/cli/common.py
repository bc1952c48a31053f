"""What every `elit-train` subcommand shares: the command line as recorded in artifacts, and
the choice of where members train (`--executor`, `--address`)."""
from __future__ import annotations

import argparse
import shlex
import sys


def command_line(argv: list[str] | None) -> str:
    """`elit-train …` as typed (shell-quoted), for `producer.command` and run folders."""
    return "elit-train " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))


def executor_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where members train (docs/cluster.md)")
    g.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: one member after another in this process (default); ray: every "
                   "member is a Ray task (pip install 'elit-stream[cluster]')")
    g.add_argument("--address", metavar="ADDR",
                   help="Ray cluster to use (auto, ray://HEAD:10001); default: start a local Ray")


def executor_spec(args):
    """--executor/--address -> ExecutorSpec; a Ray task reserves --threads CPUs (default 1)."""
    from trainer.model.executor import ExecutorSpec

    return ExecutorSpec(kind=args.executor, address=args.address,
                        cpus_per_member=max(1, args.threads))
