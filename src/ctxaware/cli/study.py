"""Run the standard diagnosis of a chat model and write one report (embedded model by default).

``ctxaware study [--model M] [--out DIR]`` runs NIH in the modes raw+prefix, chat+prefix,
chat+prefix+steer and chat, measures attention by role with and without the template, optionally
evaluates contextual QA (``--qa squad,quac,drop``), and writes ``DIR/report.html``. Rerunning with
the same ``--out`` resumes every part.
"""

from __future__ import annotations

import argparse

HELP = "the standard diagnosis: NIH modes + attention by role (+ QA) -> one HTML report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..study.config import StudyConfig
    from .options import add_config_options

    parser.add_argument("--config", metavar="FILE", help="YAML/JSON file of study options")
    add_config_options(parser, StudyConfig)


def run(args: argparse.Namespace) -> int:
    from ..niah.scoring import format_table
    from ..study import StudyConfig, run_study
    from .options import config_from_args

    config = config_from_args(StudyConfig, args)
    result = run_study(config)
    for run in result.tasks.values() or [result.niah]:
        recs = run.records
        if not recs:
            continue
        shard = f" · shard {run.shard[0]}/{run.shard[1]}" if run.shard[1] > 1 else ""
        print(f"study: {recs[0]['model']} · needle {recs[0]['needle']} · haystack {recs[0]['haystack']} "
              f"· {len(recs)} NIH cells ({run.new_cells} new){shard}")
        print(format_table(run.summary))
        n = min(s["cells"] for s in run.summary.values()) if run.summary else 0
        if n:
            from ..report.verdict import mde_phrase

            print(f"detectable between two modes (exact McNemar, 5 % level): {mde_phrase(n)}")
    if result.attention is None:
        print("NIH shard done; rerun the same command without --shard to merge the shards and run the other parts"
              if config.shard else "this process's NIH shard is done; the main process merges and goes on")
        return 0
    rh = result.attention["retrieval_head"]
    for cond, data in result.attention["conditions"].items():
        shares = ", ".join(f"{k} {v:.2f}" for k, v in data["mean_shares"].items())
        print(f"attention ({cond}, mean over layers): {shares}")
    print(f"retrieval head: layer {rh['layer']} head {rh['head']} (needle mass {rh['needle_mass']:.3f})")
    for variant, data in result.qa.items():
        for task, row in data["tables"].items():
            se = f" ± {row['stderr']:.3f}" if row.get("stderr") is not None else ""
            print(f"QA {variant:<10} {task:<28} {row['metric']} {row['value']:.3f}{se} (n={row['n']})")
    if result.mtbench:
        from ..mtbench import format_summary

        for summary in result.mtbench.values():
            print(format_summary(summary))
    if result.report:
        print(f"report: {result.report}")
    print(f"results in {result.out}/")
    return 0
