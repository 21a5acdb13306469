"""The layers of docs/DESIGN.md, "Layers", read from the source: every `import` of every module of
dvos, those inside functions included, against the order utils < data < metrics < models <
inference < lit < callbacks < cli."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dvos"
LAYERS = ("utils", "data", "metrics", "models", "inference", "lit", "callbacks", "cli")


def imported_modules(path: Path) -> list[str]:
    """Every absolute module name `path` imports, `from a import b` giving both `a` and `a.b`."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return names


def layer_of(module: str) -> str | None:
    """`dvos.<layer>...` → layer, for the packages of LAYERS; None otherwise."""
    parts = module.split(".")
    return parts[1] if parts[0] == "dvos" and len(parts) > 1 and parts[1] in LAYERS else None


def modules_of_dvos() -> list[Path]:
    paths = sorted(PACKAGE.rglob("*.py"))
    assert len(paths) > 50 and PACKAGE / "cli" / "main.py" in paths
    return paths


def test_nothing_outside_the_cli_imports_it():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)} imports {module}"
        for path in modules_of_dvos()
        if path.parent.name != "cli"
        for module in imported_modules(path)
        if layer_of(module) == "cli"
    ]
    assert not offenders, "\n".join(offenders)


def test_no_layer_imports_a_higher_one():
    offenders = []
    for path in modules_of_dvos():
        own = path.relative_to(PACKAGE).parts[0]
        if own not in LAYERS:  # config.py, bench/ and the top-level modules beside the CLI
            continue
        for module in imported_modules(path):
            target = layer_of(module)
            if target is not None and LAYERS.index(target) > LAYERS.index(own):
                offenders.append(f"{path.relative_to(PACKAGE.parent)} ({own}) imports {module}")
    assert not offenders, "\n".join(offenders)


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    path = tmp_path / "module.py"
    path.write_text("def run():\n    from dvos.cli.common import log\n\nimport dvos.data.vos\n")
    assert sorted(map(layer_of, imported_modules(path))) == ["cli", "cli", "data"]
