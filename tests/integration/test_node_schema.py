"""Every node's schema as the real server publishes it: valid, documented, and stable.

Saved workflows store node IDs and positional widget values, so a renamed node or an input
inserted before others silently breaks users' graphs; ``node_schema.json`` is the committed
contract (append only).
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
COMMITTED = json.loads((HERE / "node_schema.json").read_text())["nodes"]


@pytest.fixture(scope="module")
def ours(comfy) -> dict:
    info = comfy.get("/object_info")
    return {k: v for k, v in info.items() if k.startswith("SafeT2I") and not k.startswith("SafeT2ITest")}


def test_node_ids_match_the_committed_list(ours):
    assert sorted(ours) == sorted(COMMITTED), (
        "node IDs changed: renamed/removed nodes break saved workflows; new nodes must be appended to "
        f"node_schema.json. Missing: {sorted(set(COMMITTED) - set(ours))}, new: {sorted(set(ours) - set(COMMITTED))}")


def test_inputs_and_outputs_are_only_appended(ours):
    for node_id, committed in COMMITTED.items():
        order = ours[node_id]["input_order"]
        inputs = order.get("required", []) + order.get("optional", [])
        assert inputs[: len(committed["inputs"])] == committed["inputs"], node_id
        assert ours[node_id]["output_name"][: len(committed["outputs"])] == committed["outputs"], node_id
        # An input appended after the committed ones must not break a saved workflow or API prompt
        # that lacks it: it is optional, or a widget with a default value.
        for name in inputs[len(committed["inputs"]):]:
            if name in order.get("optional", []):
                continue
            typ, *rest = ours[node_id]["input"]["required"][name]
            opts = rest[0] if rest and isinstance(rest[0], dict) else {}
            assert "default" in opts, f"{node_id}.{name}: a required input appended without a default"


def test_schemas_are_complete_and_documented(ours, comfy):
    for node_id, spec in ours.items():
        assert spec["display_name"].startswith("SafeT2I "), node_id
        assert spec["category"].split("/")[0] == "SafeT2I", node_id
        assert len(spec["description"]) > 40, node_id
        assert spec["python_module"].startswith("custom_nodes."), node_id
        for group in ("required", "optional"):
            for name in spec["input_order"].get(group, []):
                typ, *rest = spec["input"][group][name]
                opts = rest[0] if rest and isinstance(rest[0], dict) else {}
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert len(spec["output"]) == len(spec["output_name"]) and all(spec["output_name"]), node_id
        page = REPO / "web" / "docs" / f"{node_id}.md"
        assert page.is_file(), f"no help page web/docs/{node_id}.md"
        text = page.read_text()
        assert text.startswith("# ") and len(text) > 300, node_id
        # The server serves it where the frontend's node-docs panel looks for it.
        with urllib.request.urlopen(f"{comfy.url}/extensions/safet2i/docs/{node_id}.md", timeout=10) as r:
            assert r.status == 200 and r.read().decode() == text
