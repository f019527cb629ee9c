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


# The one library module allowed to import the demo package at module level, and what it may import:
# training/evaluate.py scores captions against shapes-world scenes (its scene-grounded caption precision and
# recall, read from a dataset's scenes_<split>.json) with `Scene` and `caption_precision_recall`.
DEMO_IMPORTS_ALLOWED = {"training/evaluate.py": {"training.demo.shapes"}}


def module_level_imports(path: Path):
    """Modules imported when `path` is imported: every import statement outside a function body."""

    def walk(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(child, ast.Import):
                yield from (a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                # `from training.demo import shapes` -> training.demo.shapes; `from m import f` -> m.f
                yield from (f"{child.module}.{a.name}" for a in child.names)
            yield from walk(child)

    yield from walk(ast.parse(path.read_text(), filename=str(path)))


def test_the_library_does_not_import_the_demo():
    """training/demo/ (the shapes world, the demo's LLM and vision pretraining, their gates, `qbridge demo
    build`) sits on top of the library: no module outside it imports it at module level, but the
    allow-listed ones, and those only what the allow-list says."""
    demo = ROOT / "training" / "demo"
    assert (demo / "__init__.py").exists()
    bad, used = [], set()
    for package in FORBIDDEN:
        for path in (ROOT / package).rglob("*.py"):
            if demo in path.parents:
                continue
            rel = str(path.relative_to(ROOT))
            allowed = DEMO_IMPORTS_ALLOWED.get(rel, set())
            for name in set(module_level_imports(path)):
                if name != "training.demo" and not name.startswith("training.demo."):
                    continue
                hit = {a for a in allowed if name == a or name.startswith(a + ".")}
                used |= {(rel, a) for a in hit}
                if not hit:
                    bad.append(f"{rel}: {name}")
    assert not bad, "\n".join(sorted(bad))
    # an allowance nothing uses any more is dropped from the list, not kept as a standing licence
    assert used == {(f, a) for f, mods in DEMO_IMPORTS_ALLOWED.items() for a in mods}, used
