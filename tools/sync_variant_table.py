"""Write the variant table (``lstmkit.spec.markdown_table()``) into README.md and docs/cell.md,
between the markers ``<!-- variant-table -->`` and ``<!-- /variant-table -->``.

    python tools/sync_variant_table.py          # rewrite both files
    python tools/sync_variant_table.py --check  # exit 1 if either is out of date

``tests/test_variants.py`` runs the check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lstmkit.spec import markdown_table

ROOT = Path(__file__).resolve().parent.parent
FILES = (ROOT / "README.md", ROOT / "docs" / "cell.md")
START, END = "<!-- variant-table -->", "<!-- /variant-table -->"


def synced(text: str) -> str:
    """``text`` with the block between the markers replaced by the generated table."""
    head, start, rest = text.partition(START)
    body, end, tail = rest.partition(END)
    if not start or not end:
        raise ValueError(f"the markers {START} and {END} are missing")
    return f"{head}{START}\n{markdown_table()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    stale = []
    for path in FILES:
        text = path.read_text(encoding="utf-8")
        new = synced(text)
        if new != text:
            stale.append(path)
            if not args.check:
                path.write_text(new, encoding="utf-8")
    if args.check and stale:
        print("out of date: " + ", ".join(str(p.relative_to(ROOT)) for p in stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
