"""``fileserver dev``: its parser. The stack itself (:mod:`fileserver.devstack.dev`) is
imported only when the command runs: the wheel has no dev dependencies."""

from __future__ import annotations

import argparse

from fileserver.settings import Settings


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fileserver dev``."""
    dev = sub.add_parser(
        "dev",
        help="run the embedded dev stack (Tansu, SeaweedFS, Postgres) with sample events",
        description="Start Tansu (Kafka protocol), SeaweedFS (S3) and Postgres on free loopback "
        "ports (no JVM, no Docker), publish sample Janus events, run the worker, print what "
        "landed, and keep running until Ctrl-C.",
    )
    dev.add_argument(
        "--workdir", default=None, help="where servers keep data (default: a temp dir)"
    )
    dev.add_argument(
        "--samples", type=int, default=5, help="sample talk events to publish (default 5)"
    )
    dev.add_argument(
        "--exit-after-samples",
        action="store_true",
        help="stop everything once the samples have landed (for scripts and tests)",
    )
    dev.set_defaults(func=run_command)


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    """Start the embedded stack and the worker (see ``fileserver dev --help``)."""
    from fileserver.devstack.dev import run_dev

    return run_dev(args)
