"""``run_pipeline.py --fold all``: each fold's merge chosen on the other folds' validation scans.

A fold's own validation subset is one subset (4 scans of the built-in data, ~89 of LUNA16):
the members, weights, candidate list and stacker chosen on it are noisy, and when every
fold chooses a different merge, the pooled FROC ranks together scores of different
scales (a UNet probability of one fold against a stacked score of another). Once every
fold has run, fold k can choose on far more: the validation scans of every fold whose
validation subset is not k's held-out subset, each scored by the models of its own fold,
exactly as the held-out scans are scored in the pooled evaluation. Fold k's held-out scans
never enter its choice (they are the validation subset of one other fold, which is left
out), so the pooled FROC stays an honest cross-validated estimate: the LUNA16 rule of
evaluating each scan with models that never saw it (Setio et al. 2017), extended to the
models' merge.

Per fold this writes the pooled validation scores (``WorkPaths.other_folds_validation``),
the selected ensemble and the stacker fitted on them (members ``ensemble_pooled`` and
``stacked_pooled`` of the fold's prediction folder, both candidate lists), and the one of
the two that the pooled validation scans prefer, as ``WorkPaths.pooled_submission``, with
what chose it beside it. A fold whose choice cannot be made there (the validation scans
were not scored: ``run_pipeline.Pipeline.use_validation`` off) keeps its own submission.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

import cache
import config as config_lib
import ensemble
from ensemble import FEATURES_NAME, POOLED_ENSEMBLE_MEMBER, POOLED_STACKED_MEMBER
from paths import WorkPaths, config_beside
from pipeline_evaluation import ensemble_members, held_out_scans, reference_tables
from tables import CSV_ENCODING, InputError, atomic_open, read_seriesuids, write_csv_atomic

CANDIDATE_LISTS = ("all", "given")  # ensemble.CANDIDATE_LISTS, in the order selection reads them


def submissions(cfg, work: WorkPaths, folds: list[int]) -> dict[int, Path]:
    """Per fold, the submission whose held-out rows the pooled submission takes: the one
    chosen on the other folds' validation scans (written here), else the fold's own."""
    held_out_scans(work, folds)  # InputError where the folds' held-out scans overlap or miss one
    members = ensemble_members(cfg)
    metas = cache.load_scan_metas(work.cache)
    try:
        validation = {k: cache.split_by_subset(metas, k)["val"] for k in folds}
    except ValueError as err:
        raise InputError(f"{work.cache}: {err}") from None
    chosen = {}
    for k in folds:
        donors = donor_folds(work, k, folds, validation)
        missing = _missing_validation_scores(work, donors, members)
        if not donors or missing:
            why = (f"{missing} is missing" if missing
                   else "no other fold validates on other scans")
            print(f"[pool] fold {k}: its own submission ({why})", flush=True)
            work.pooled_submission(k).unlink(missing_ok=True)
            chosen[k] = work.fold_submission(k)
            continue
        chosen[k] = FoldMerge(cfg, work, k, donors, members, validation).run()
    return chosen


def donor_folds(work: WorkPaths, fold: int, folds: list[int],
                validation: dict[int, list[str]]) -> list[int]:
    """The folds whose validation scans hold none of ``fold``'s held-out scans."""
    held_out = set(read_seriesuids(work.test_seriesuids(fold)))
    return [j for j in folds if not held_out & set(validation[j])]


def _given_lists(work: WorkPaths, folds: list[int], members: list[str]) -> list[bool]:
    """``[False]``, and ``True`` where every fold scored the given candidate list too."""
    given = all(work.predictions(j, m, given=True, validation=True).exists()
                for j in folds for m in members)
    return [False, True] if given else [False]


def _missing_validation_scores(work: WorkPaths, donors: list[int],
                               members: list[str]) -> Path | None:
    """The first validation file of a member that a donor fold lacks (None: all there)."""
    for j in donors:
        for name in members:
            path = work.predictions(j, name, validation=True)
            if not path.exists():
                return path
    return None


def _concatenate(sources: list[Path], out: Path) -> None:
    """The rows of ``sources`` (prediction or feature tables), each cell's text as written,
    one after the other in ``out``."""
    frames = [pd.read_csv(p, dtype=str, keep_default_na=False, encoding=CSV_ENCODING)
              for p in sources]
    write_csv_atomic(pd.concat(frames, ignore_index=True), out)


@dataclass
class FoldMerge:
    """Fold ``fold``'s merge chosen on the pooled validation scans of the ``donors``."""

    cfg: config_lib.Config
    work: WorkPaths
    fold: int
    donors: list[int]
    members: list[str]
    validation: dict[int, list[str]]  # each fold's validation scans

    def run(self) -> Path:
        lists = _given_lists(self.work, [self.fold, *self.donors], self.members)
        scans = self.pool_validation(lists)
        annotations, excluded = reference_tables(self.work)
        ens = self.cfg.ensemble
        selection = ensemble.select_members(
            self.members, {CANDIDATE_LISTS[g]: [self.pooled(m, g) for m in self.members]
                           for g in lists},
            annotations, excluded, scans, weigh=ens.weigh_by_validation,
            select=ens.select_by_validation, candidate_list=ens.candidate_list, with_cpm=True)
        merged = {CANDIDATE_LISTS[g]: self.merge(selection, g) for g in lists}
        stacked = {} if ens.stack == "never" else self.stack(lists, annotations, excluded, scans)
        choice = ensemble.choose_submission(ens.stack, selection, stacked,
                                            fixed_list=ens.candidate_list != "validation")
        return self.submit(selection, merged, choice)

    def pooled(self, member: str, given: bool) -> Path:
        return self.work.other_folds_validation(self.fold, member, given=given)

    def held_out(self, member: str, given: bool) -> Path:
        return self.work.predictions(self.fold, member, given=given)

    def pool_validation(self, lists: list[bool]) -> list[str]:
        """The donors' validation scores (and candidate features, where every donor has
        them) concatenated per member and list; the pooled validation scans."""
        for given in lists:
            for name in [*self.members, FEATURES_NAME]:
                sources = [self.work.predictions(j, name, given=given, validation=True)
                           for j in self.donors]
                if all(p.exists() for p in sources):
                    _concatenate(sources, self.pooled(name, given))
        return sorted(uid for j in self.donors for uid in self.validation[j])

    def merge(self, selection: ensemble.Selection, given: bool) -> Path:
        """The selected members' held-out scores merged as selected."""
        method, weights = ensemble.selected_merge(selection, self.cfg.ensemble.method,
                                                  list(self.cfg.ensemble.weights))
        out = self.held_out(POOLED_ENSEMBLE_MEMBER, given)
        write_csv_atomic(ensemble.merge_files([self.held_out(m, given) for m in selection.members],
                                              method, weights), out)
        return out

    def stack(self, lists: list[bool], annotations, excluded, scans) -> dict[str, float | None]:
        """Per list, the stacker fitted on the pooled validation scans and applied to the
        held-out scans (``stacked_pooled``); its out-of-fold validation CPM. A list whose
        stacker cannot be fitted (one class, missing features) is left out, with a note."""
        ens, fitted = self.cfg.ensemble, {}
        for given in lists:
            out = self.held_out(POOLED_STACKED_MEMBER, given)
            try:
                model = ensemble.fit_stack_files(
                    self.members, [self.pooled(m, given) for m in self.members],
                    self.pooled(FEATURES_NAME, given), annotations, excluded, scans,
                    feature_names=list(ens.stack_features), c=ens.stack_c, folds=ens.stack_folds)
                ensemble.write_stacked(model, ensemble.stack_model_path(out), self.members,
                                       [self.held_out(m, given) for m in self.members],
                                       self.held_out(FEATURES_NAME, given), out, self.cfg,
                                       fitted=True)
            except InputError as err:
                for stale in (out, ensemble.stack_model_path(out), config_beside(out)):
                    stale.unlink(missing_ok=True)
                print(f"[pool] fold {self.fold}: no stacker ({err})", flush=True)
                continue
            fitted[CANDIDATE_LISTS[given]] = model.fit.get("cpm_out_of_fold")
        return fitted

    def submit(self, selection: ensemble.Selection, merged: dict[str, Path],
               choice: ensemble.Submission) -> Path:
        """The chosen scores as the fold's pooled submission, what chose them beside it."""
        source = (self.held_out(POOLED_STACKED_MEMBER, choice.candidate_list == "given")
                  if choice.stacked else merged[choice.candidate_list])
        out = self.work.pooled_submission(self.fold)
        with atomic_open(out, "wb") as handle:
            handle.write(source.read_bytes())
        members = self.members if choice.stacked else selection.members
        print(f"[pool] fold {self.fold}: chosen on the validation scans of folds "
              f"{', '.join(map(str, self.donors))}: "
              f"{'stacked scores' if choice.stacked else 'ensemble of ' + ', '.join(members)} "
              f"of the {ensemble.CANDIDATE_LISTS[choice.candidate_list]} ({choice.why})",
              flush=True)
        config_lib.save_config(self.cfg, config_beside(out), {
            "candidate_list": choice.candidate_list, "from": str(source), "members": members,
            "weighting": [] if choice.stacked else ensemble.weighting_options(selection),
            "chosen_on_folds": self.donors, "why": selection.why, "stack": choice.record})
        return out
