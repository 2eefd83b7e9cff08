"""The ``--json`` summary of the operator verbs (backfill, redrive, reconcile).

``--json`` (or ``--json -``) prints the verb's summary as one JSON object on stdout at
the end, and moves the text (plan, table, progress) to stderr; ``--json FILE`` writes
the object to FILE and leaves the text on stdout. Every object starts with
``"command"`` (the verb) and ends with ``"exit_status"`` and ``"exit_meaning"`` (the
shared table of :mod:`fileserver.exits`); the keys between are the verb's, snake_case.
The shapes are documented in docs/operations.md (JSON summaries).

Only a run that ends with a summary prints one: an error before the run starts (a
configuration error, a dependency unreachable) is the one-line fatal error of
:mod:`fileserver.cli` instead (a JSON line on stderr when logs are JSON).

A FILE that cannot be written is refused before the run (exit status 2). If writing it
fails anyway at the end, the object goes to stderr instead and the exit status is not 0
(a script must not go on to read a stale FILE).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from fileserver import exits
from fileserver.errors import ConfigError

STDOUT = "-"

log = logging.getLogger("fileserver.summary")


def add_json_option(parser: argparse._ActionsContainer, what: str) -> None:
    """``--json [FILE]``: the summary as one JSON object (``what`` names it in the help)."""
    parser.add_argument(
        "--json",
        nargs="?",
        const=STDOUT,
        metavar="FILE",
        help=f"{what} as one JSON object at the end: on stdout (the text then goes to "
        "stderr) without FILE or with '-', else written to FILE",
    )


def document(command: str, body: Mapping[str, Any], exit_status: int) -> dict[str, Any]:
    """The object: ``command``, the verb's own keys, ``exit_status``, ``exit_meaning``."""
    return {
        "command": command,
        **body,
        "exit_status": exit_status,
        "exit_meaning": exits.meaning(exit_status),
    }


class Output:
    """Where a verb writes its text and its JSON summary, for its ``--json`` value."""

    def __init__(
        self, json_path: str | None, *, out: TextIO | None = None, err: TextIO | None = None
    ) -> None:
        if json_path is not None and json_path != STDOUT:
            check_writable(json_path)
        self.json_path = json_path
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        #: the exit status :meth:`emit` returned (and printed), once it has
        self.emitted: int | None = None

    @property
    def text(self) -> TextIO:
        """The stream for the text summary: stderr when stdout is the JSON's."""
        return self.err if self.json_path == STDOUT else self.out

    def emit(self, command: str, body: Mapping[str, Any], exit_status: int) -> int:
        """Write the summary object (nothing without ``--json``); returns the exit status
        the command ends with: ``exit_status``, or 1 instead of 0 when FILE could not be
        written (the object, with that status, is then written on stderr)."""
        if self.json_path is None:
            self.emitted = exit_status
            return exit_status
        doc = _dumps(document(command, body, exit_status))
        if self.json_path == STDOUT:
            self.out.write(doc)
            self.out.flush()
            self.emitted = exit_status
            return exit_status
        try:
            with open(self.json_path, "w", encoding="utf-8") as f:
                f.write(doc)
        except OSError as exc:
            status = exit_status or exits.INCOMPLETE
            log.error(
                "cannot write the --json summary to %s: %s; it follows on stderr (exit status %d)",
                self.json_path,
                exc.strerror or exc,
                status,
            )
            self.err.write(_dumps(document(command, body, status)))
            self.err.flush()
            self.emitted = status
            return status
        self.emitted = exit_status
        return exit_status


def _dumps(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, indent=2) + "\n"


def check_writable(path: str) -> None:
    """Refuse (:class:`ConfigError`, exit status 2) a ``--json FILE`` that cannot be
    written, before the run rather than after it."""
    if not path:
        raise ConfigError("--json '': give a file name, or '-' (or nothing) for stdout")
    if os.path.isdir(path):
        raise ConfigError(f"--json {path}: is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"--json {path}: {parent} is not a directory")
    if os.path.exists(path):
        writable = os.access(path, os.W_OK)
    else:
        writable = os.access(parent, os.W_OK | os.X_OK)
    if not writable:
        raise ConfigError(f"--json {path}: permission denied")
