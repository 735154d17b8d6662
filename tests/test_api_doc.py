"""docs/API.md: every Python block runs as written, in order, in one namespace (each block's asserts are its claims)."""

from __future__ import annotations

import re
from pathlib import Path

API = Path(__file__).parent.parent / "docs" / "API.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", API.read_text(), flags=re.S)


def test_api_doc_has_an_example_for_each_noun_and_verb():
    text = API.read_text()
    for word in ("**`Denoiser`**", "**`Conditioning`**", "**`Site`**", "**capture**", "**probe**", "**intervene**"):
        assert word in text, word
    assert len(blocks()) == 6


def test_api_doc_examples_run_top_to_bottom():
    namespace: dict = {"__name__": "api_doc"}
    for i, code in enumerate(blocks()):
        exec(compile(code, f"docs/API.md block {i + 1}", "exec"), namespace)


def test_readme_links_the_api_overview():
    readme = (API.parent.parent / "README.md").read_text()
    assert "(docs/API.md)" in readme
