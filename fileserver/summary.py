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
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from fileserver import exits

STDOUT = "-"


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
        self.json_path = json_path
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    @property
    def text(self) -> TextIO:
        """The stream for the text summary: stderr when stdout is the JSON's."""
        return self.err if self.json_path == STDOUT else self.out

    def emit(self, command: str, body: Mapping[str, Any], exit_status: int) -> None:
        """Write the summary object (nothing without ``--json``)."""
        if self.json_path is None:
            return
        doc = json.dumps(document(command, body, exit_status), indent=2) + "\n"
        if self.json_path == STDOUT:
            self.out.write(doc)
            self.out.flush()
        else:
            with open(self.json_path, "w", encoding="utf-8") as f:
                f.write(doc)
