"""The service's layering: schemas need pydantic only; the engine knows no HTTP; qformer never imports service.

The service's own tests live in tests/service/.
    .venv/bin/python -m pytest tests/test_service_protocol.py -q
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_protocol_is_pydantic_only():
    assert imported_modules(ROOT / "service" / "protocol.py") - set(sys.stdlib_module_names) == {"pydantic"}
    code = "import sys, service.protocol; assert 'torch' not in sys.modules and 'fastapi' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_engine_and_backends_know_no_http():
    http = {"fastapi", "starlette", "uvicorn", "httpx"}
    for name in ("engine.py", "batching.py", "cache.py", "backends/base.py", "backends/torch_backend.py"):
        assert not imported_modules(ROOT / "service" / name) & http, name


def test_qformer_cli_client_uses_the_standard_library_only():
    found = imported_modules(ROOT / "qformer" / "cli.py")
    assert "service" not in found and "httpx" not in found and "requests" not in found
