"""Node help pages (``web/docs/<NodeId>.md``) stay complete and true to the code, without ComfyUI.

Every node of the committed contract (``tests/integration/node_schema.json``) has a page with:
``# <display name>``, a ``**Paper:**`` line, then ``## Inputs`` (a row per input, in order, with
the type and default of the node's ``define_schema``), ``## Outputs`` (a row per output),
``## Cost`` (every timing or ratio copied verbatim from ``benchmarks/RESULTS.md``) and
``## Notes``. Types, defaults and display names are read from ``nodes/*.py`` with ``ast``, so
nothing of ComfyUI is imported. The integration test checks that the server serves the pages.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "web" / "docs"
CONTRACT = REPO / "tests" / "integration" / "node_schema.json"
NODES = json.loads(CONTRACT.read_text(encoding="utf-8"))["nodes"]
RESULTS = (REPO / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
SECTIONS = ["## Inputs", "## Outputs", "## Cost", "## Notes"]
NO_DEFAULT = "—"
# A timing or ratio: a number followed by "×", "ms" or "s" (as a word: "10 steps" is not one).
MEASURE = re.compile(r"(?<![\w.])\d+(?:\.\d+)?\s?(?:×|ms\b|s\b)")


# --------------------------------------------------------------------------- the code's schemas

def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _io_type(func: ast.expr, customs: dict[str, str]) -> str | None:
    """``io.Float.Input`` -> FLOAT, ``FilterModels.Input`` (= io.Custom("X")) -> X."""
    owner = func.value if isinstance(func, ast.Attribute) else None
    if isinstance(owner, ast.Attribute) and isinstance(owner.value, ast.Name) and owner.value.id == "io":
        return owner.attr.upper()
    if isinstance(owner, ast.Name):
        return customs.get(owner.id)
    return None


def _schemas() -> dict[str, dict]:
    """node_id -> {display_name, inputs: [(name, type, has_default, default)], outputs: [(name, type)]}."""
    found: dict[str, dict] = {}
    for path in sorted((REPO / "nodes").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        customs = {}
        for node in tree.body:  # FilterModels = io.Custom("SAFET2I_FILTER_MODELS")
            value = getattr(node, "value", None)
            if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                    and isinstance(value, ast.Call) and getattr(value.func, "attr", None) == "Custom"
                    and value.args and isinstance(value.args[0], ast.Constant)):
                customs[node.targets[0].id] = value.args[0].value
        for call in ast.walk(tree):
            if not (isinstance(call, ast.Call) and isinstance(_kw(call, "node_id"), ast.Constant)):
                continue
            entry = {"display_name": ast.literal_eval(_kw(call, "display_name")), "inputs": [], "outputs": []}
            for item in getattr(_kw(call, "inputs"), "elts", []):
                if isinstance(item, ast.Call) and getattr(item.func, "attr", None) == "Input" and item.args:
                    default = _kw(item, "default")
                    try:
                        value = ast.literal_eval(default) if default is not None else None
                    except ValueError:  # a named constant (e.g. the SLD concept text): not compared
                        value = ...
                    entry["inputs"].append((ast.literal_eval(item.args[0]), _io_type(item.func, customs),
                                            default is not None, value))
            for item in getattr(_kw(call, "outputs"), "elts", []):
                if isinstance(item, ast.Call) and getattr(item.func, "attr", None) == "Output":
                    name = ast.literal_eval(_kw(item, "display_name"))
                    entry["outputs"].append((name, _io_type(item.func, customs)))
            found[_kw(call, "node_id").value] = entry
    return found


SCHEMAS = _schemas()


# --------------------------------------------------------------------------- the pages

def _sections(text: str) -> dict[str, str]:
    parts, current = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            current = line.strip()
            parts[current] = ""
        elif current:
            parts[current] += line + "\n"
    return parts


def _rows(section: str) -> list[list[str]]:
    """Body rows of the section's markdown table, cells stripped (backticks removed)."""
    rows = []
    for line in section.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip("|"))]
        if all(re.fullmatch(r":?-+:?", c) for c in cells):
            continue
        rows.append(cells)
    return rows[1:]  # the first row is the header


def _name(cell: str) -> str:
    return cell.replace("`", "").strip()


def _page(node_id: str) -> str:
    page = DOCS / f"{node_id}.md"
    assert page.is_file(), f"no help page web/docs/{node_id}.md"
    return page.read_text(encoding="utf-8")


def test_every_node_of_the_contract_is_in_the_code():
    assert not set(NODES) - set(SCHEMAS), f"not found in nodes/*.py: {sorted(set(NODES) - set(SCHEMAS))}"
    for node_id, spec in NODES.items():
        inputs = [i[0] for i in SCHEMAS[node_id]["inputs"]]
        outputs = [o[0] for o in SCHEMAS[node_id]["outputs"]]
        assert inputs[: len(spec["inputs"])] == spec["inputs"], node_id
        assert outputs[: len(spec["outputs"])] == spec["outputs"], node_id


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_page_structure(node_id):
    text = _page(node_id)
    lines = text.splitlines()
    assert lines[0] == f"# {SCHEMAS[node_id]['display_name']}", f"{node_id}: first line must be the title"
    head = text.split("\n## ", 1)[0]
    assert re.search(r"^\*\*Paper:\*\* \S", head, re.M), f"{node_id}: no '**Paper:**' line before ## Inputs"
    intro = head.split("**Paper:**")[0].strip().splitlines()[1:]
    assert any(ln.strip() for ln in intro), f"{node_id}: no paragraph after the title"
    headings = [ln.strip() for ln in lines if ln.startswith("## ")]
    assert headings == SECTIONS, f"{node_id}: sections {headings}, expected {SECTIONS}"


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_inputs_table_lists_every_input_with_type_and_default(node_id):
    sections = _sections(_page(node_id))
    rows = _rows(sections["## Inputs"])
    assert rows and all(len(r) == 4 for r in rows), (
        f"{node_id}: Inputs needs | Input | Type | Default | Meaning |")
    names = [_name(r[0]) for r in rows]
    code = SCHEMAS[node_id]["inputs"]
    expected = NODES[node_id]["inputs"] + [i[0] for i in code[len(NODES[node_id]["inputs"]):]]
    assert names == expected, f"{node_id}: input rows {names}, the node has {expected}"
    for (name, typ, has_default, default), (_, typ_cell, default_cell, meaning) in zip(code, rows):
        assert meaning, f"{node_id}.{name}: empty meaning"
        where = f"{node_id}.{name}: page says {default_cell!r}"
        assert typ is None or typ in typ_cell, f"{node_id}.{name}: type {typ!r} not in {typ_cell!r}"
        if not has_default:
            assert default_cell.startswith(NO_DEFAULT), f"{where}; no default in the code: '{NO_DEFAULT}'"
        elif default is ...:
            assert default_cell and not default_cell.startswith(NO_DEFAULT), f"{where}; the code has one"
        elif isinstance(default, bool):
            assert str(default).lower() in default_cell.lower(), f"{where}; default {default}"
        elif isinstance(default, (int, float)):
            numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", default_cell)]
            assert float(default) in numbers, f"{where}; default {default}"
        elif default == "":
            assert "empty" in default_cell.lower() or '""' in default_cell, f"{where}; default is empty"
        else:
            assert str(default) in default_cell, f"{where}; default {default!r}"


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_outputs_table_lists_every_output(node_id):
    rows = _rows(_sections(_page(node_id))["## Outputs"])
    assert rows and all(len(r) == 3 for r in rows), f"{node_id}: Outputs needs | Output | Type | Meaning |"
    code = SCHEMAS[node_id]["outputs"]
    expected = NODES[node_id]["outputs"] + [o[0] for o in code[len(NODES[node_id]["outputs"]):]]
    assert [_name(r[0]) for r in rows] == expected, node_id
    for (name, typ), (_, typ_cell, meaning) in zip(code, rows):
        assert meaning, f"{node_id}.{name}: empty meaning"
        assert typ is None or typ in typ_cell, f"{node_id}.{name}: type {typ!r}, page {typ_cell!r}"


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_cost_numbers_come_from_the_benchmark_results(node_id):
    cost = _sections(_page(node_id))["## Cost"]
    assert cost.strip(), f"{node_id}: empty Cost section"
    for measure in MEASURE.findall(" ".join(cost.split())):  # a line break counts as a space
        # Verbatim, and not as the tail of a longer number ("8 s" is not in "1.8 s").
        assert re.search(r"(?<![\d.])" + re.escape(measure), RESULTS), (
            f"{node_id}: '{measure}' in Cost is not in benchmarks/RESULTS.md")


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_relative_links_resolve(node_id):
    for target in re.findall(r"\]\(([^)\s]+)\)", _page(node_id)):
        if re.match(r"[a-z]+:|#", target):
            continue
        assert (DOCS / target.split("#")[0]).resolve().exists(), f"{node_id}: broken link {target}"


def test_measure_pattern():
    text = "2.468 s = 1.36×, ≈ 15–17 ms, 10 steps, 63.8 img/s, 2 vCPU"
    assert MEASURE.findall(text) == ["2.468 s", "1.36×", "17 ms"]
