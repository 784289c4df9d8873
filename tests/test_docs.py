"""The manual stays true to the code: docs/cli.md is the parser's help of every verb, and what the
sources, tests and docs cite is in the repository.

Regenerate docs/cli.md after changing an option: PYTHONPATH=src python tests/test_docs.py"""

import argparse
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI_MD = ROOT / "docs" / "cli.md"
COLUMNS = "100"  # argparse wraps the help to the terminal's width: fixed here, so the file is one text
HEADER = """# Command reference

Every verb of `alexnet` and its options, as `alexnet VERB --help` prints them. Generated from the
parser (`build_parser()` in src/alexnet/cli.py): tests/test_docs.py fails when this file differs from it;
regenerate it with `PYTHONPATH=src python tests/test_docs.py`.
"""


def cli_reference() -> str:
    from alexnet.cli import build_parser

    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    parts = [HEADER] + [f"## {p.prog}\n\n```text\n{p.format_help().rstrip()}\n```\n" for p in [parser, *verbs.values()]]
    return "\n".join(parts)


def test_cli_reference_is_the_parsers_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", COLUMNS)
    written = CLI_MD.read_text() if CLI_MD.is_file() else ""
    assert written == cli_reference(), "docs/cli.md is out of date: PYTHONPATH=src python tests/test_docs.py"


def cited_files() -> set[tuple[str, str]]:
    """(file, cited path) for each docs/*.md path that a source, test or doc names, and for each citation of
    the reference file from outside the repository the code used to cite (its facts: docs/reference.md)."""
    texts = [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("src/**/*.py"), *ROOT.glob("tests/**/*.py")]
    texts += [p for p in ROOT.glob("benchmarks/*") if p.suffix in (".py", ".md", ".sh")]
    found = set()
    for path in texts:
        for cited in re.findall(r"\b(?:docs/[\w-]+\.md|" + "REFERENCE" + r"\.md)", path.read_text()):
            found.add((str(path.relative_to(ROOT)), cited))
    return found


def test_what_is_cited_is_in_the_repository():
    cited = cited_files()
    assert ("src/alexnet/model/lrn.py", "docs/reference.md") in cited  # the search finds citations
    missing = sorted(f"{path} cites {name}" for path, name in cited if not (ROOT / name).is_file())
    assert not missing, "\n".join(missing)


if __name__ == "__main__":
    os.environ["COLUMNS"] = COLUMNS
    CLI_MD.write_text(cli_reference())
    print(f"wrote {CLI_MD}")
