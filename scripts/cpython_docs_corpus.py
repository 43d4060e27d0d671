"""Write the demo corpus: documentation text that ships with CPython itself, one JSON document per line.

Documents: each `help()` topic of pydoc_data (the language reference text) and, per standard-library module, its
docstrings joined together. Nothing is downloaded and none of it is written by us.
"""

import ast
import json
import sys
import sysconfig
from pathlib import Path
from pydoc_data.topics import topics


def module_docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef)))]
    docs = (ast.get_docstring(n) for n in nodes)
    return "\n\n".join(d for d in docs if d and len(d) > 40)


def documents(max_docs: int = 10_000) -> list[str]:
    """The corpus, in order: the help() topics, then each standard-library module's docstrings."""
    texts = [text for _, text in sorted(topics.items())]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        text = module_docstrings(path)
        if len(text) > 200:
            texts.append(text)
    return texts[:max_docs]


def main(max_docs: int) -> None:
    for text in documents(max_docs):
        sys.stdout.write(json.dumps({"text": text}) + "\n")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
