"""``fileserver config``: every setting with its default, current value and meaning;
``--check`` validates them all and reports every problem at once.

The metadata is :data:`fileserver.settings.DOCS`; ``python -m fileserver.config --markdown``
writes the settings table of docs/operations.md from it (tests/unit/test_config.py fails
when the two differ)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Mapping
from typing import Any, TextIO

from fileserver import exits
from fileserver.settings import (
    SECRET_FIELDS,
    Settings,
    default_text,
    env_name,
    redact_url,
    unknown_variables,
)
from fileserver.settings_docs import DOCS

#: Shown as ``***`` when set, besides the passwords (bearer-token hashes grant nothing,
#: but they are a credential's fingerprint).
REDACTED = SECRET_FIELDS | {"serve_tokens"}


def current(settings: Settings, name: str) -> Any:
    """A setting's value, safe to print (secrets ``***``, URL passwords hidden)."""
    value = getattr(settings, name)
    if name in REDACTED:
        return "***" if value else value
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    return value


def _plain(value: Any) -> str:
    if value is None or value == ():
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _untick(text: str) -> str:
    """Markdown to plain text: no backticks, no italics around a whole default."""
    text = text.replace("`", "")
    return text[1:-1] if text.startswith("*(") and text.endswith(")*") else text


def rows(settings: Settings, env: Mapping[str, str]) -> list[dict[str, Any]]:
    """One dict per setting: variable, default, current value, set (in ``env``), meaning."""
    out = []
    for name in DOCS:
        variable = env_name(name)
        out.append(
            {
                "variable": variable,
                "default": _untick(default_text(name)),
                "current": current(settings, name),
                "set": bool(env.get(variable, "").strip()),
                "meaning": _untick(DOCS[name].meaning),
            }
        )
    return out


def render(rows_: list[dict[str, Any]], width: int = 100) -> str:
    lines = []
    for row in rows_:
        mark = "*" if row["set"] else " "
        lines.append(f"{mark} {row['variable']} = {_plain(row['current'])}")
        if row["set"]:
            lines.append(f"    default: {row['default']}")
        lines.extend(
            textwrap.wrap(row["meaning"], width, initial_indent="    ", subsequent_indent="    ")
        )
    lines.append("(* set in the environment)")
    return "\n".join(lines)


def markdown() -> str:
    """The settings table of docs/operations.md."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, doc in DOCS.items():
        lines.append(f"| `{env_name(name)}` | {default_text(name)} | {doc.meaning} |")
    return "\n".join(lines) + "\n"


def check(env: Mapping[str, str], out: TextIO) -> int:
    """Validate every setting; print every problem and unknown variable; 0 or 2."""
    _, problems = Settings.read(env)
    for name, closest in unknown_variables(env):
        hint = f" (did you mean {closest}?)" if closest else ""
        print(f"warning: {name} is not a setting and is ignored{hint}", file=out)
    for problem in problems:
        print(f"error: {problem}", file=out)
    if problems:
        print(f"{len(problems)} setting(s) wrong", file=out)
        return exits.USAGE
    print("settings ok", file=out)
    return exits.OK


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fileserver config``."""
    p = sub.add_parser(
        "config",
        help="list every setting (default, current value, meaning); --check validates them",
        description="List every FILESERVER_* setting with its default, its current value "
        "(passwords and token hashes as ***, URL passwords hidden) and its meaning. With "
        "--check, validate them all and report every problem at once (exit status 2 if "
        "any). Variables named FILESERVER_* that are no setting are reported with the "
        "closest setting's name.",
    )
    p.add_argument(
        "--check", action="store_true", help="validate every setting; exit 2 if one is wrong"
    )
    p.add_argument("--json", action="store_true", help="the list as JSON on stdout")
    p.set_defaults(func=run_command, settings_free=True)


def run_command(args: argparse.Namespace, settings: Settings | None) -> int:
    """``fileserver config``: reads the environment itself (so that a wrong setting is
    listed rather than fatal)."""
    env = os.environ
    if args.check:
        return check(env, sys.stdout)
    current_settings, problems = Settings.read(env)
    table = rows(current_settings, env)
    if args.json:
        doc = {
            "settings": table,
            "problems": problems,
            "unknown": [{"variable": n, "closest": c} for n, c in unknown_variables(env)],
        }
        print(json.dumps(doc, indent=2, default=str))
    else:
        print(render(table))
        for name, closest in unknown_variables(env):
            hint = f" (did you mean {closest}?)" if closest else ""
            print(f"warning: {name} is not a setting and is ignored{hint}")
        for problem in problems:
            print(f"error: {problem}")
    return exits.USAGE if problems else exits.OK


def _main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fileserver.config")
    parser.add_argument("--markdown", action="store_true", help="print the docs' settings table")
    if parser.parse_args().markdown:
        sys.stdout.write(markdown())


if __name__ == "__main__":
    _main()
