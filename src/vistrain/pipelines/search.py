"""``vistrain search RUN --gallery DIR --query IMG``: parse, then ``Run.search``, then the table."""

from __future__ import annotations

import argparse

from vistrain.pipelines._args import console, positive_int

NAME = "search"
HELP = "nearest gallery images of a query image for an embedding run"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run directory (task: embedding)")
    p.add_argument("--gallery", required=True, help="folder of gallery images (class sub-folders or re-id names)")
    p.add_argument("--query", required=True, help="the query image")
    p.add_argument("--top-k", type=positive_int, default=20, metavar="K",
                   help="nearest gallery images to show (default 20; at most the gallery size)")
    p.add_argument("--output", help="PNG grid to write (default: RUN/search/<query>.png; a CSV beside it)")


def run_search(args: argparse.Namespace) -> int:
    import vistrain

    console()
    table = vistrain.Run(args.run).search(args.query, args.gallery, top_k=args.top_k, output=args.output)
    shown = table.drop(columns=["correct"]) if table.attrs["query_label"] is None else table
    print(shown.to_string(index=False))
    print(f"[DONE] grid written to {table.attrs['grid']}")
    return 0
