"""What one more member adds to a finished ``run_pipeline.py --fold all`` run, without rerunning it.

    python benchmarks/bench_extra_member.py --work-dir work_cv --model swin_tiny --out work_cv_swin \
        [--classification.epochs=8 --classification.steps_per_epoch=40]

Copies the work folder to ``--out`` (the finished run is only read), trains ``--model`` in
every fold on that fold's cache and detections and scores its held-out and validation
scans (given + detected candidates, the given list alone) exactly as the pipeline's
``classify`` and ``predict`` stages call ``train_classification.py`` and ``predict.py``,
then redoes the cross-fold choice of each fold's merge with the model among the members
(``cross_fold.py``) and prints the pooled FROC and the pooled table of every member. The
``--section.key`` overrides reach the new member's training only (e.g. a shorter schedule
for a member that costs more a step).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import config as config_lib  # noqa: E402
from paths import WorkPaths  # noqa: E402

GIVEN_CANDIDATES = "candidates"  # predict.py's name of the cache's own candidate list


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", required=True, help="a finished run_pipeline.py --fold all")
    parser.add_argument("--model", required=True, help="the member to add (a CLASSIFIERS name)")
    parser.add_argument("--out", required=True, help="new folder: the copy the member is added to")
    config_lib.add_config_arguments(parser)
    return parser


def add_member(work: WorkPaths, model: str, folds: list[int], settings: list[str]) -> None:
    """``model`` trained and scored in every fold of ``work`` as the pipeline does it
    (``settings``: the run's profile and the overrides for the new member)."""
    import predict
    import train_classification

    for fold in folds:
        common = [*settings, "--cache-dir", str(work.cache),
                  "--work-dir", str(work.root), "--fold", str(fold), "--model", model]
        sources = [GIVEN_CANDIDATES, str(work.detections(fold))]
        start = time.perf_counter()
        if train_classification.main([*common, "--candidates", *sources]) != 0:
            raise SystemExit(f"error: training {model} in fold {fold} failed")
        print(f"[{model}] fold {fold}: trained in {time.perf_counter() - start:.0f} s", flush=True)
        for given, candidates in ((False, sources), (True, [GIVEN_CANDIDATES])):
            for validation in (False, True):
                out = work.predictions(fold, model, given=given, validation=validation)
                argv = [*common, "--candidates", *candidates, "--scans",
                        "val" if validation else "test", "--out", str(out)]
                if predict.main(argv) != 0:
                    raise SystemExit(f"error: scoring {out} failed")


def main(argv=None) -> int:
    config_lib.setup_tensorflow_environment()
    parser = _parser()
    args, _ = config_lib.parse_args(parser, argv)
    source, out = WorkPaths(args.work_dir), WorkPaths(args.out)
    if out.root.exists():
        print(f"error: {out.root}: --out exists; give a new folder", file=sys.stderr)
        return 2
    folds = source.held_out_folds()
    if not folds or not source.config.exists():
        print(f"error: {source.root}: not a finished run_pipeline.py --fold all", file=sys.stderr)
        return 2
    import cross_fold
    import pipeline_evaluation
    import run_pipeline

    shutil.copytree(source.root, out.root)
    run_cfg = config_lib.load_config(out.config)
    overrides = run_pipeline.config_overrides(parser, sys.argv[1:] if argv is None else argv)
    add_member(out, args.model, folds, ["--profile", run_cfg.profile, *overrides])
    members = (*run_cfg.ensemble.models, args.model)
    run_cfg = config_lib.override(run_cfg, "ensemble.models", members)
    cross_fold.submissions(run_cfg, out, folds)
    pipeline_evaluation.pool_submissions(run_cfg, out, folds)
    return pipeline_evaluation.evaluate_and_tabulate(run_cfg, out, "all", folds)


if __name__ == "__main__":
    sys.exit(main())
