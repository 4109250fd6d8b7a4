#!/usr/bin/env python3
"""Prints the requirements of ``searchrl`` core plus some extras, one per line: an image's share of its lock inputs.

``deploy/docker/lock.py`` writes this list into each image's ``locks/<image>.in``. Engine images (vLLM, SGLang, verl)
pass ``--without models``: the engine pins its own ``torch`` and ``transformers``, so the CPU development pins of the
``models`` extra (``torch==2.13.0``, ``transformers<...``) are left out. The GPU retriever passes ``--exclude
faiss-cpu`` because it installs ``faiss-gpu`` (both ship ``faiss``).

usage: requirements_for.py [--pyproject PATH] [--without EXTRA ...] [--exclude PACKAGE ...] EXTRA [EXTRA ...]
"""

from __future__ import annotations

import argparse
import re
import sys

import tomllib

SELF = re.compile(r"^searchrl\[([^\]]+)\]\s*$")
NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _name(req: str) -> str:
    m = NAME.match(req)
    return re.sub(r"[-_.]+", "-", m.group(1)).lower() if m else req


def expand(project: dict, extras: list[str], without: set[str]) -> list[str]:
    """Core dependencies plus every requirement of ``extras``, following ``searchrl[...]`` self-references.

    Raises:
        KeyError: an extra that pyproject.toml does not define.
    """
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    out: list[str] = list(project.get("dependencies", []))
    seen: set[str] = set()
    stack = list(extras)
    while stack:
        extra = stack.pop()
        if extra in seen or extra in without:
            continue
        seen.add(extra)
        if extra not in optional:
            raise KeyError(f"pyproject.toml has no extra {extra!r} (known: {', '.join(sorted(optional))})")
        for req in optional[extra]:
            m = SELF.match(req)
            if m:
                stack.extend(x.strip() for x in m.group(1).split(","))
            elif req not in out:
                out.append(req)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("extras", nargs="+")
    parser.add_argument("--pyproject", default="pyproject.toml")
    parser.add_argument("--without", action="append", default=[], help="extra to leave out (repeatable)")
    parser.add_argument("--exclude", action="append", default=[], help="package to leave out (repeatable)")
    args = parser.parse_args(argv)
    with open(args.pyproject, "rb") as fh:
        project = tomllib.load(fh)["project"]
    try:
        reqs = expand(project, args.extras, set(args.without))
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    excluded = {_name(x) for x in args.exclude}
    print("\n".join(r for r in reqs if _name(r) not in excluded))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
