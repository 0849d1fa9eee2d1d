"""Build one self-contained HTML report from study, niah, attention, eval or calibration result directories.

``ctxaware report DIR... --out report.html`` states the verdict with its numbers, draws heatmaps,
recall vs length and attention by role, tables QA with standard errors, and records provenance;
several models are compared side by side. The page works offline (images inline, no script).
"""

from __future__ import annotations

import argparse

HELP = "one self-contained HTML report from result directories (several models side by side)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="result directories (study, niah, attention, eval, "
                        "calibration); sub-directories are searched one level deep")
    parser.add_argument("--out", default="report.html", metavar="FILE", help="HTML file to write (default: report.html)")


def run(args: argparse.Namespace) -> int:
    from ..report import build_report, load_results
    from ..report.html import findings

    path = build_report(args.dirs, args.out)
    for m in load_results(args.dirs):
        print(m.model)
        for f in findings(m):
            print(f"  - {f.text}")
    print(f"wrote {path}")
    return 0
