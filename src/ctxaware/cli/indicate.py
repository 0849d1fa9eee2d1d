"""Label a scored dataset: append " [IND]" to user turns whose response scored above a threshold.

``ctxaware indicate --in scored.jsonl --out labelled.jsonl --threshold 0.6`` reads the output of
``ctxaware score`` and writes rows in ``messages`` format (ShareGPT rows converted), ready for
``ctxaware train``; it prints the fraction of scored turns labelled at 0.5 / 0.6 / 0.7 / 0.8.

The paper's β = 0.6 was calibrated on its own probe; with another probe it can label almost
nothing. ``--target-fraction 0.1`` labels the top 10 % of scored turns instead (ties broken by
position), and ``--threshold auto`` picks the β that labels the paper's fraction for the dataset's
kind (ShareGPT 0.10, UltraChat 0.18, WizardLM 0.23; ``--dataset-kind`` or detected from the file
name / schema). The chosen β and the labelled fraction are printed.
"""

from __future__ import annotations

import argparse
import json
import math

from ..scoring.indicator import PAPER_FRACTIONS

HELP = "append the [IND] indicator to context-dependent user turns of a scored dataset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in", dest="input", required=True, metavar="SCORED",
                        help="scored dataset (.jsonl/.json/.parquet/datasets dir) with a ctx_scores column")
    parser.add_argument("--out", required=True, metavar="LABELLED", help="output .jsonl/.json/.parquet")
    parser.add_argument("--threshold", default=None, metavar="BETA|auto",
                        help="label a user turn when its response's score is strictly above this (default: 0.6); "
                        "'auto': the β that labels the paper's fraction for the dataset kind")
    parser.add_argument("--target-fraction", type=float, default=None, metavar="F",
                        help="label exactly the top F (0-1) of scored turns instead of using a threshold")
    parser.add_argument("--dataset-kind", choices=sorted(PAPER_FRACTIONS), default=None,
                        help="dataset kind for --threshold auto (default: detected from the file name or schema)")
    parser.add_argument("--scores-column", default="ctx_scores", help="column holding the per-turn scores")
    parser.add_argument("--add-period", action="store_true",
                        help="reference quirk: also append '.' to scored user turns ending in a letter or digit")
    parser.add_argument("--keep-scores", action="store_true", help="keep the ctx_* columns in the output")
    parser.add_argument("--split", default="train", help="split of a datasets input (default: train)")
    parser.add_argument("--json", action="store_true", help="print the label fractions as JSON")


def _rule(args: argparse.Namespace, rows: list[dict], score_lists: list) -> dict:
    """How to label: {'rule', 'beta', 'labels' (or None), 'target', 'kind'}; validates the options."""
    from ..errors import ConfigError
    from ..scoring.indicator import detect_dataset_kind, threshold_for_fraction, top_fraction_labels

    auto = str(args.threshold).strip().lower() == "auto"
    if args.target_fraction is not None:
        if args.threshold is not None:
            raise ConfigError("pass either --threshold or --target-fraction, not both")
        sel = top_fraction_labels(score_lists, args.target_fraction)
        return {"rule": "target-fraction", "beta": sel.beta, "labels": sel.labels, "target": args.target_fraction,
                "kind": None}
    if auto:
        kind = args.dataset_kind or detect_dataset_kind(args.input, rows)
        if kind is None:
            raise ConfigError(f"cannot tell the dataset kind of {args.input} for --threshold auto; pass "
                              f"--dataset-kind {'|'.join(sorted(PAPER_FRACTIONS))} or use --target-fraction F")
        target = PAPER_FRACTIONS[kind]
        return {"rule": "auto", "beta": threshold_for_fraction(score_lists, target), "labels": None,
                "target": target, "kind": kind}
    try:
        beta = 0.6 if args.threshold is None else float(args.threshold)
    except ValueError:
        raise ConfigError(f"--threshold must be a number or 'auto', got {args.threshold!r}") from None
    if math.isnan(beta):
        raise ConfigError("--threshold must be a number or 'auto', got nan")
    return {"rule": "threshold", "beta": beta, "labels": None, "target": None, "kind": None}


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..scoring import apply_indicator, label_fractions, read_rows, row_messages, write_rows
    from ..scoring.io import RowError
    from ..scoring.run import SCORE_COLUMNS

    rows = read_rows(args.input, split=args.split)
    if rows and not any(args.scores_column in r for r in rows):
        raise InputError(f"{args.input} has no {args.scores_column!r} column; run `ctxaware score` first")
    score_lists = [r.get(args.scores_column) for r in rows]
    rule = _rule(args, rows, score_lists)
    beta = rule["beta"] if rule["beta"] is not None else math.inf
    out, skipped, labelled, scored = [], 0, 0, 0
    for i, row in enumerate(rows):
        scores = row.get(args.scores_column)
        try:
            messages = row_messages(row)
        except RowError:
            skipped += 1
            continue
        labels = rule["labels"][i] if rule["labels"] is not None else None
        try:
            new_messages = apply_indicator(messages, scores, beta, add_period=args.add_period, labels=labels)
        except InputError as exc:
            raise InputError(f"{args.input}: row {i}: {exc}") from exc
        new = {k: v for k, v in row.items() if k != "conversations"
               and (args.keep_scores or k not in SCORE_COLUMNS)}
        new["messages"] = new_messages
        out.append(new)
        before = sum(m.get("role") == "user" and str(m.get("content", "")).endswith("[IND]") for m in messages)
        labelled += sum(m.get("role") == "user" and str(m.get("content", "")).endswith("[IND]")
                        for m in new_messages) - before
        scored += sum(1 for s in scores or [] if isinstance(s, (int, float)) and not isinstance(s, bool)
                      and not math.isnan(s))
    write_rows(out, args.out)
    fractions = label_fractions(score_lists)
    fraction = labelled / scored if scored else 0.0
    if args.json:
        print(json.dumps({"output": args.out, "rows": len(out), "skipped": skipped, "rule": rule["rule"],
                          "threshold": rule["beta"], "target_fraction": rule["target"],
                          "dataset_kind": rule["kind"], "labelled_turns": labelled, "scored_turns": scored,
                          "labelled": {"turns": fraction},
                          "fractions": {str(k): v for k, v in fractions.items()}}))
        return 0
    if rule["rule"] == "auto":
        how = f"auto threshold for {rule['kind']} (target {rule['target']:.2f})"
    elif rule["rule"] == "target-fraction":
        how = f"top {rule['target']:.3g} of turns, lowest labelled score"
    else:  # a fixed threshold has no target: format nothing of it
        how = "threshold"
    shown = "none" if rule["beta"] is None else f"{rule['beta']:.4f}"
    print(f"wrote {args.out}: {len(out)} rows ({skipped} unreadable rows dropped); {how} β = {shown}: "
          f"{labelled} of {scored} scored turns labelled ({fraction:.3f})")
    print("threshold  turns  rows")
    for t, f in fractions.items():
        print(f"  {t:<8} {f['turns']:.3f}  {f['rows']:.3f}")
    return 0
