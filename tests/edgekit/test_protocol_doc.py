"""docs/protocol.md is generated from device_agent.delivery.protocol; it must match the schemas in the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_protocol_doc_is_in_sync_with_the_schemas():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_protocol_docs.py"), "--check"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_schema_and_topic_kind_is_documented():
    from device_agent.delivery import protocol

    doc = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    for name in protocol.SCHEMAS:
        assert f"### `{name}`" in doc
    for kind in protocol.KINDS:
        assert f"| `{kind}` |" in doc
    assert "```mermaid" in doc and "last will" in doc and "$share/" in doc
