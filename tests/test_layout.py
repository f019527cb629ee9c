"""Dependency direction: training -> qformer <- service; the model package needs no serving or training libs."""

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_DEPS = {"torch", "transformers", "safetensors", "tokenizers", "huggingface_hub", "PIL", "qformer", "tqdm"}
FORBIDDEN = {"qformer": {"training", "service"}, "training": {"service"}, "service": {"training"}}


def imports(package: str):
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield path, alias.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                yield path, node.module.split(".")[0]


def test_packages_import_one_way():
    bad = [(str(p.relative_to(ROOT)), m) for pkg, banned in FORBIDDEN.items() for p, m in imports(pkg) if m in banned]
    assert not bad


def test_model_package_needs_only_its_core_dependencies():
    stdlib = set(sys.stdlib_module_names)
    extra = {(str(p.relative_to(ROOT)), m) for p, m in imports("qformer") if m not in stdlib | MODEL_DEPS}
    assert not extra


def test_documents_cited_by_the_code_are_in_the_repository():
    """A docstring or comment that names a Markdown file names one that ships with the code: a relative
    path from the repository root or from the citing file's folder. Files the code writes are not
    citations: argparse metavars, and the two reports below."""
    written = {"REPORT.md", "eval.md"}  # `qbridge demo build`'s report; `qbridge eval --markdown eval.md`

    cited = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[A-Za-z_][\w.-]*\.md)\b")
    missing = []
    for package in (*FORBIDDEN, "tests"):
        for path in (ROOT / package).rglob("*.py"):
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                if "metavar=" in line:
                    continue
                for name in set(cited.findall(line)) - written:
                    if not ((ROOT / name).exists() or (path.parent / name).exists()):
                        missing.append(f"{path.relative_to(ROOT)}:{lineno}: {name}")
    assert not missing, "\n".join(missing)
