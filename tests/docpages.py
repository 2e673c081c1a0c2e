"""The documentation as the tests read it: README.md and the pages under docs/.

    from docpages import docs_text, page
    assert "`MIP_PORT`" in page("settings.md")
"""

import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def page(name: str) -> str:
    """The text of one page: "README.md" at the root, else docs/<name>."""
    path = os.path.join(ROOT, name) if name == "README.md" else os.path.join(ROOT, "docs", name)
    with open(path, encoding="utf-8") as f:
        return f.read()


def docs_text() -> str:
    """README.md and every docs/*.md page, one after the other."""
    names = ["README.md"] + sorted(os.path.basename(p)
                                   for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    return "\n".join(page(name) for name in names)
