"""Label a scored dataset: append " [IND]" to user turns whose response scored above a threshold.

``ctxaware indicate --in scored.jsonl --out labelled.jsonl --threshold 0.6`` reads the output of
``ctxaware score`` and writes rows in ``messages`` format (ShareGPT rows converted), ready for
``ctxaware train``; it prints the fraction of scored turns labelled at 0.5 / 0.6 / 0.7 / 0.8.
"""

from __future__ import annotations

import argparse
import json

HELP = "append the [IND] indicator to context-dependent user turns of a scored dataset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in", dest="input", required=True, metavar="SCORED",
                        help="scored dataset (.jsonl/.json/.parquet/datasets dir) with a ctx_scores column")
    parser.add_argument("--out", required=True, metavar="LABELLED", help="output .jsonl/.json/.parquet")
    parser.add_argument("--threshold", type=float, default=0.6,
                        help="label a user turn when its response's score is strictly above this (default: 0.6)")
    parser.add_argument("--scores-column", default="ctx_scores", help="column holding the per-turn scores")
    parser.add_argument("--add-period", action="store_true",
                        help="reference quirk: also append '.' to scored user turns ending in a letter or digit")
    parser.add_argument("--keep-scores", action="store_true", help="keep the ctx_* columns in the output")
    parser.add_argument("--split", default="train", help="split of a datasets input (default: train)")
    parser.add_argument("--json", action="store_true", help="print the label fractions as JSON")


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..scoring import apply_indicator, label_fractions, read_rows, row_messages, write_rows
    from ..scoring.io import RowError
    from ..scoring.run import SCORE_COLUMNS

    rows = read_rows(args.input, split=args.split)
    if rows and not any(args.scores_column in r for r in rows):
        raise InputError(f"{args.input} has no {args.scores_column!r} column; run `ctxaware score` first")
    out, skipped = [], 0
    for i, row in enumerate(rows):
        scores = row.get(args.scores_column)
        try:
            messages = row_messages(row)
        except RowError:
            skipped += 1
            continue
        try:
            labelled = apply_indicator(messages, scores, args.threshold, add_period=args.add_period)
        except InputError as exc:
            raise InputError(f"{args.input}: row {i}: {exc}") from exc
        new = {k: v for k, v in row.items() if k != "conversations"
               and (args.keep_scores or k not in SCORE_COLUMNS)}
        new["messages"] = labelled
        out.append(new)
    write_rows(out, args.out)
    fractions = label_fractions([r.get(args.scores_column) for r in rows])
    labelled_now = label_fractions([r.get(args.scores_column) for r in rows], (args.threshold,))[args.threshold]
    if args.json:
        print(json.dumps({"output": args.out, "rows": len(out), "skipped": skipped, "threshold": args.threshold,
                          "labelled": labelled_now, "fractions": {str(k): v for k, v in fractions.items()}}))
        return 0
    print(f"wrote {args.out}: {len(out)} rows ({skipped} unreadable rows dropped); "
          f"threshold {args.threshold}: {labelled_now['turns']:.3f} of scored turns labelled")
    print("threshold  turns  rows")
    for t, f in fractions.items():
        print(f"  {t:<8} {f['turns']:.3f}  {f['rows']:.3f}")
    return 0
