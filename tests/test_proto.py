"""The committed generated code matches proto/ (make proto), and every message and field is documented."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools not installed")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), str(tmp_path)], check=True, capture_output=True
    )
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".py", ".pyi"))
    assert fresh, "generator produced nothing"
    stale = [str(rel) for rel in fresh if (ROOT / rel).read_text() != (tmp_path / rel).read_text()]
    assert not stale, f"generated code is stale, run `make proto`: {stale}"


def test_every_message_and_field_is_documented() -> None:
    undocumented = []
    for proto in sorted((ROOT / "proto").rglob("*.proto")):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            s = line.strip()
            is_decl = re.match(r"^(message|enum|service|rpc)\s", s) or re.match(
                r"^(repeated |optional )?[\w.]+ \w+ = \d+;", s
            )
            if is_decl and not lines[i - 1].strip().startswith("//"):
                undocumented.append(f"{proto.relative_to(ROOT)}:{i + 1}: {s}")
    assert not undocumented, "\n".join(undocumented)


def test_one_request_response_pair_per_rpc() -> None:
    for proto in sorted((ROOT / "proto").rglob("*.proto")):
        for name, req, resp in re.findall(r"rpc (\w+)\((\w+)\) returns \((?:stream )?(\w+)\)", proto.read_text()):
            assert (req, resp) == (f"{name}Request", f"{name}Response"), f"{proto.name}: {name}"


def _buf() -> str:
    import shutil

    found = shutil.which("buf") or (
        str(ROOT / ".tools" / "bin" / "buf") if (ROOT / ".tools" / "bin" / "buf").exists() else None
    )
    if not found:
        pytest.skip("buf not installed (make tools installs it from npm @bufbuild/buf)")
    return found


def test_buf_lint_standard() -> None:
    res = subprocess.run([_buf(), "lint"], cwd=ROOT / "proto", capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_buf_breaking_against_last_release_tag() -> None:
    tags = subprocess.run(
        ["git", "tag", "--list", "v*", "--sort=-v:refname"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    if not tags:
        pytest.skip("no release tag yet: breaking-change checks start with the first v* tag")
    res = subprocess.run(
        [_buf(), "breaking", "proto", "--against", f".git#tag={tags[0]},subdir=proto"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
