"""Code blocks of docs/integrations.md, so each documented example is executed by a test."""

import pathlib
import re


def doc_example(name: str) -> str:
    """The python block after ``<!-- example: name -->`` in docs/integrations.md."""
    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text()
    match = re.search(rf"<!-- example: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"no example {name!r} in docs/integrations.md"
    return match.group(1)
