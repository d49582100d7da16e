"""Every ``torch.load`` in FADAL passes ``weights_only=True``: a checkpoint, cache entry or state file
cannot run code when it is read (a pickled object can)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def test_every_torch_load_is_weights_only():
    calls, unsafe = 0, []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                calls += 1
                flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    unsafe.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert calls >= 5 and not unsafe, unsafe
