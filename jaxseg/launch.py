"""`python -m jaxseg.launch COMMAND ...`: parses the command line, then calls library code.

Commands: synth, prepare, train, predict, evaluate, demo; neonatal studies: budget-study (label
budgeting), age-study (AgeU-Net), transfer-study (fine-tuning strategies);
DeepLesionBrain: dlb-train, dlb-predict, dlb-ablation; import-torch (PyTorch DynUNet / nnU-Net
weights -> a run directory). Each has --help.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
from pathlib import Path

CONFIG_HELP = "YAML config (see configs/); defaults when omitted"
OVERRIDES_HELP = "dotted config overrides, e.g. model.features_base=16 data.patch_size=[64,64,64]"


def _config(args, schema=None, **kwargs):
    """The command's config: `schema` is the core config plus the sections the command reads (default:
    the core's and the synthetic cohort's, so that `train --config configs/demo.yaml` works)."""
    from jaxseg.config import SynthRunConfig, load_config

    return load_config(args.config, args.overrides, schema or SynthRunConfig, **kwargs)


def cmd_synth(args) -> None:
    from jaxseg.data.synth import write_cohort

    s = _config(args).synth
    out = write_cohort(args.out, s, overwrite=args.overwrite)
    n_test = sum(1 for c in out["cases"] if c.get("split") == "test")
    print(f"wrote {args.out}: {len(out['cases']) - n_test} training and {n_test} test cases in "
          f"{out['seconds']:.1f} s; preview {out.get('preview')}")


def cmd_prepare(args) -> None:
    from jaxseg.data.prepare import prepare
    from jaxseg.locks import hold

    cfg = _config(args, ignore_sections=True)  # data.* of any experiment's config, a method's included
    spacing = _parse_spacing(args.spacing)
    store_root = args.store or cfg.data.store
    with hold(store_root, "prepare", "--store" if args.store else "data.store"):
        report = prepare(args.dataset or cfg.data.dataset, store_root, target_spacing=spacing,
                         num_workers=args.workers, skip_bad=args.skip_bad, crop=not args.no_crop)
    for r in report["redone"]:
        print(f"redid case {r['case_id']!r}: {r['reason']}", file=sys.stderr)
    redone = f" ({len(report['redone'])} redone: source changed)" if report["redone"] else ""
    print(f"prepared {len(report['prepared'])} cases{redone}, {len(report['skipped_existing'])} already done, "
          f"{len(report['rejected'])} rejected -> {report['store_root']}")


def _parse_spacing(text):
    """--spacing: None, 'median' or three positive finite mm values 'x,y,z'."""
    from jaxseg.config import ConfigError

    if text in (None, "median"):
        return text
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"--spacing {text!r}: expected 'median' or three positive numbers in mm, e.g. 1,1,1.5")
    return values


def cmd_train(args) -> None:
    from jaxseg.train.loop import train_and_evaluate

    out = train_and_evaluate(_config(args), args.workdir, max_steps=args.max_steps)
    best = out["best"]
    val = ("no validation ran" if best.get("step") is None
           else f"best validation Dice {best['val_dice']:.4f} at step {best['step']}")
    print(f"trained to step {out['step']}/{out['total_steps']} ({out['skipped_steps']} non-finite steps skipped); "
          f"{val}")


def cmd_predict(args) -> None:
    from jaxseg.data.io import DataError
    from jaxseg.inference.runs import check_runs, predict_with_runs
    from jaxseg.locks import hold

    check_runs(args.run)  # cheap checks before the lock and before any parameters are loaded
    with hold(args.output, "predict", "--output"):
        preds = predict_with_runs(args.run, args.input, args.output, which=args.checkpoint,
                                  splits=args.split or None, mirror_tta=args.mirror_tta or None,
                                  save_probabilities=args.probabilities, skip_bad=args.skip_bad,
                                  skip_existing=not args.overwrite)
    kept = [p.case_id for p in preds if p.kept]
    print(f"wrote {len(preds) - len(kept)} predictions to {args.output}"
          + (f", kept {len(kept)} already there (--overwrite to redo them)" if kept else ""))
    if preds.failed:
        raise DataError(f"{args.input}: {len(preds.failed)} case(s) failed and were skipped: "
                        + "; ".join(f"{c}: {m}" for c, m in preds.failed.items()))


def cmd_evaluate(args) -> None:
    from jaxseg.fileio import output_dir

    with output_dir(args.out, "--out") as out:  # checked before any work; removed if left empty
        _evaluate(args, out)


def _evaluate(args, out: Path) -> None:
    from jaxseg.data.datasets import read_dataset
    from jaxseg.data.io import DataError
    from jaxseg.evaluation.evaluate import evaluate_folder, write_case_csv
    from jaxseg.evaluation.report import write_report

    reference = read_dataset(args.reference)
    if args.split:
        reference = dataclasses.replace(reference, cases=[c for c in reference.cases if c.split in set(args.split)])
        if not reference.cases:
            raise DataError(f"{args.reference}: no case in split(s) {args.split}")
    rows, methods = [], []
    for item in args.pred:
        name, sep, folder = item.partition("=")
        if not sep:
            name, folder = Path(item).name, item
        # Without --split: exactly the cases that were predicted, saying which references have none.
        got = evaluate_folder(folder, reference, method=name, allow_missing=not args.split, warn_missing=False)
        if not got:
            raise DataError(f"{folder}: no prediction of a case of {args.reference}")
        if got.missing:
            shown = ", ".join(got.missing[:10]) + (" ..." if len(got.missing) > 10 else "")
            print(f"{name}: evaluated the {len(got)} predicted case(s) of {len(got) + len(got.missing)}; "
                  f"{len(got.missing)} without a prediction in {folder} left out (--split to choose): {shown}",
                  file=sys.stderr)
        rows.extend(got)
        methods.append(name)
    write_case_csv(rows, out / "metrics.csv")
    paths = write_report(out, rows, methods=methods, title=args.title)
    print(f"wrote {out / 'metrics.csv'}, {paths['markdown']}, {paths['html']}")


def cmd_demo(args) -> None:
    from jaxseg.demo import run_demo

    out = run_demo(_config(args), args.workdir)
    print(f"demo finished: report at {out['markdown']} and {out['html']}")


def cmd_budget_study(args) -> None:
    from jaxseg.neonatal.config import NeonatalConfig
    from jaxseg.neonatal.label_budget import run_label_budget

    out = run_label_budget(_config(args, NeonatalConfig), args.workdir)
    print(f"label-budget table at {out['markdown']} ({out['timings']['total_s']:.0f} s)")


def cmd_age_study(args) -> None:
    from jaxseg.neonatal.age_unet import run_age_study
    from jaxseg.neonatal.config import NeonatalConfig

    out = run_age_study(_config(args, NeonatalConfig), args.workdir)
    print(f"AgeU-Net table at {out['markdown']} ({out['timings']['total_s']:.0f} s)")


def cmd_transfer_study(args) -> None:
    from jaxseg.neonatal.config import NeonatalConfig
    from jaxseg.neonatal.transfer import run_transfer_study

    out = run_transfer_study(_config(args, NeonatalConfig), args.workdir)
    print(f"transfer-learning tables at {out['markdown']} ({out['timings']['total_s']:.0f} s)")


def cmd_dlb_train(args) -> None:
    from jaxseg.dlb.config import DLBRunConfig
    from jaxseg.dlb.ensemble import tile_mesh
    from jaxseg.dlb.train import train_dlb

    # The ensemble's networks sharded over every device (mesh axis `tile`); resumes a killed run.
    out = train_dlb(_config(args, DLBRunConfig), args.workdir, mesh=tile_mesh())
    print(f"trained DeepLesionBrain ({out['method']}) into {args.workdir}")


def cmd_dlb_predict(args) -> None:
    from jaxseg.dlb.config import DLBRunConfig
    from jaxseg.dlb.ensemble import tile_mesh
    from jaxseg.dlb.train import predict_dlb

    saved = Path(args.workdir) / "config.yaml"  # what dlb-train ran with, unless --config says otherwise
    if args.config is None and saved.is_file():
        args.config = str(saved)
    preds = predict_dlb(_config(args, DLBRunConfig), args.workdir, args.output, args.case or None, mesh=tile_mesh())
    print(f"wrote {len(preds)} predictions to {args.output}")


def cmd_dlb_ablation(args) -> None:
    from jaxseg.dlb.ablation import run_ablation
    from jaxseg.dlb.config import DLBAblationConfig

    if args.lesion_empty_pred:
        args.overrides = [*args.overrides, f"eval.lesion_empty_pred={args.lesion_empty_pred}"]
    out = run_ablation(_config(args, DLBAblationConfig), args.workdir)
    print(f"ablation table at {Path(args.workdir) / 'table.md'} ({out['timings']['total_s']:.0f} s)")


def cmd_import_torch(args) -> None:
    from jaxseg.interop.torch_run import import_torch_run

    rec = import_torch_run(args.checkpoint, args.kind, args.out, arch=args.arch, plans=args.plans,
                           configuration=args.configuration, patch_size=args.patch_size, spacing=args.spacing,
                           verify=not args.no_verify)
    d = rec["verification"]["max_abs_logit_diff"]
    check = f"max |logit - torch| {d:.2g}" if d is not None else rec["verification"]["note"]
    patch = "x".join(map(str, rec["patch_size"]))
    print(f"imported {rec['kind']} {args.checkpoint} into {args.out} ({check}; patch {patch} from "
          f"{rec['patch_size_from']}); predict with: python -m jaxseg.launch predict --run {args.out} "
          f"--input ... --output ...")


def parser() -> argparse.ArgumentParser:
    """The command line: one declarative table of every subcommand and its flags (long because the
    CLI is; each command's work is a library function)."""
    p = argparse.ArgumentParser(prog="python -m jaxseg.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, fn, help_, config=True):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        if config:
            sp.add_argument("--config", help=CONFIG_HELP)
            sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
        return sp

    sp = add("synth", cmd_synth, "write the synthetic cohort (config section `synth`) as an nnU-Net raw dataset")
    sp.add_argument("--out", required=True, help="output folder")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")

    sp = add("prepare", cmd_prepare, "check, reorient, crop, normalise and store a dataset (nnU-Net raw or CSV)")
    sp.add_argument("--dataset", help="nnU-Net raw folder or CSV manifest (default: data.dataset)")
    sp.add_argument("--store", help="case store folder (default: data.store)")
    sp.add_argument("--spacing", help="resample to 'median' or 'x,y,z' mm (default: keep the spacing)")
    sp.add_argument("--workers", type=int, default=2)
    sp.add_argument("--skip-bad", action="store_true", help="skip bad cases, listing them in rejected.json")
    sp.add_argument("--no-crop", action="store_true",
                    help="keep the whole grid (registered volumes, DeepLesionBrain) instead of cropping")

    sp = add("train", cmd_train, "train (ERM or DRO) from a prepared store; resumes from --workdir")
    sp.add_argument("--workdir", required=True, help="run directory (config, checkpoints, logs)")
    sp.add_argument("--max-steps", type=int, help="stop early after this many steps (the schedule is unchanged)")

    sp = add("predict", cmd_predict, "predict label maps in the input's geometry with one or several runs",
             config=False)
    sp.add_argument("--run", action="append", required=True, help="run directory; repeat to ensemble")
    sp.add_argument("--input", required=True, help="nnU-Net raw folder, CSV manifest or folder of images")
    sp.add_argument("--output", required=True, help="folder for the predicted NIfTI files")
    sp.add_argument("--checkpoint", choices=("best", "last"), default="best")
    sp.add_argument("--split", action="append", help="only cases of this split (e.g. test); repeatable")
    sp.add_argument("--mirror-tta", action="store_true", help="average over the 8 mirrorings")
    sp.add_argument("--probabilities", choices=("nifti", "npz"), help="also write class probabilities")
    sp.add_argument("--skip-bad", action="store_true",
                    help="report a bad input case and go on with the others (exit code 1 at the end)")
    sp.add_argument("--overwrite", action="store_true",
                    help="predict again cases whose output exists (default: keep them, e.g. on a rerun)")

    sp = add("evaluate", cmd_evaluate, "per-case metrics, stratified percentile tables and a report",
             config=False)
    sp.add_argument("--pred", action="append", required=True, help="NAME=FOLDER of predictions; repeatable")
    sp.add_argument("--reference", required=True, help="dataset (nnU-Net raw or CSV) with the reference labels")
    sp.add_argument("--out", required=True, help="folder for metrics.csv, report.md, report.html, plots/")
    sp.add_argument("--title", default="Segmentation evaluation")
    sp.add_argument("--split", action="append",
                    help="only reference cases of this split (e.g. test), each must have a prediction; "
                         "default: the cases that have one")

    sp = add("dlb-train", cmd_dlb_train, "DeepLesionBrain: train the generic network and/or the tile ensemble "
             "(config section `dlb`) from a store prepared with --no-crop")
    sp.add_argument("--workdir", required=True)
    sp = add("dlb-predict", cmd_dlb_predict, "DeepLesionBrain: segment store cases (default: the test split) "
             "into NIfTI files in each input's geometry; the config defaults to the run's config.yaml")
    sp.add_argument("--workdir", required=True, help="the dlb-train run")
    sp.add_argument("--output", required=True)
    sp.add_argument("--case", action="append", help="case id; repeatable (default: the test split)")
    sp = add("dlb-ablation", cmd_dlb_ablation, "DeepLesionBrain's ablation (paper Tables 2/3) on the synthetic "
             "MS cohort, cross-site")
    sp.add_argument("--workdir", default="runs/dlb_ablation")
    sp.add_argument("--lesion-empty-pred", choices=("zero", "nan"),
                    help="PPV / LFPR of an empty prediction: 0 (ISBI 2015, the default) or NaN, left out of "
                         "the means (same as eval.lesion_empty_pred=...)")

    sp = add("import-torch", cmd_import_torch, "convert a PyTorch checkpoint (MONAI DynUNet or nnU-Net v2 "
             "PlainConvUNet) into a run directory for `predict --run`", config=False)
    sp.add_argument("checkpoint", metavar="CHECKPOINT", help=".pt/.pth file: a state_dict, nnU-Net's "
                    "checkpoint_final.pth, or a dict holding a state_dict")
    sp.add_argument("--kind", required=True, choices=("dynunet", "nnunet"),
                    help="dynunet: MONAI DynUNet (needs --arch); nnunet: nnU-Net v2 PlainConvUNet (needs --plans)")
    sp.add_argument("--out", required=True, metavar="RUN_DIR", help="the new run directory (must not exist)")
    sp.add_argument("--arch", metavar="ARCH.json",
                    help="dynunet: JSON object of DynUNet's constructor arguments (may add patch_size)")
    sp.add_argument("--plans", metavar="PLANS.json", help="nnunet: the nnU-Net v2 plans.json")
    sp.add_argument("--configuration", default="3d_fullres", metavar="NAME", help="nnunet: the plans configuration")
    sp.add_argument("--patch-size", metavar="X,Y,Z", help="sliding-window patch (default: the plans' or --arch's "
                    "patch_size, else the total stride)")
    sp.add_argument("--spacing", metavar="X,Y,Z", help="mm: predict resamples inputs to it (default: no resampling)")
    sp.add_argument("--no-verify", action="store_true", help="skip the comparison with the torch model")

    sp = add("demo", cmd_demo, "synth -> prepare -> train ERM and DRO -> predict -> evaluate -> report")
    sp.add_argument("--workdir", default="runs/demo")
    sp = add("budget-study", cmd_budget_study, "neonatal label budgeting (Richter & Fetit Table 3) on the synthetic "
             "tissue cohort: 'full' (a third of the subjects fully labelled) vs a third of the slices of every "
             "subject (random, sagittal, coronal, axial) at equal slice budget and steps")
    sp.add_argument("--workdir", default="runs/budget_study",
                    help="study folder: cohort, store, one run per setting, table.md (default: runs/budget_study)")
    sp = add("age-study", cmd_age_study, "AgeU-Net on the synthetic tissue cohort: U-Net vs AgeU-Net (one lr, own "
             "head lr, centred head); test Dice, age MAE/MSE beside the mean-age baseline; the cohort's age effect")
    sp.add_argument("--workdir", default="runs/age_study", help="study folder (default: runs/age_study)")
    sp = add("transfer-study", cmd_transfer_study, "transfer learning on the synthetic tissue cohort: pre-train on the "
             "oldest, fine-tune on a few of the youngest (none/shallow/medium/deep/full, scratch) over seeds; "
             "Table 4 layout and Bonferroni-corrected t-tests")
    sp.add_argument("--workdir", default="runs/transfer_study", help="study folder (default: runs/transfer_study)")
    return p


@contextlib.contextmanager
def _quiet_cli():
    """For a terminal user: orbax's absl notices (read-only checkpoint managers on every predict) are
    not theirs to act on, and a warning is one line, not a source excerpt. Undone on return, for
    callers of main() in a longer-lived process."""
    import logging
    import warnings

    absl, level, fmt = logging.getLogger("absl"), logging.getLogger("absl").level, warnings.formatwarning
    absl.setLevel(logging.ERROR)
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    try:
        yield
    finally:
        absl.setLevel(level)
        warnings.formatwarning = fmt


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        return 2
    default_configs = {"demo": "demo.yaml", "budget-study": "neonatal_budget_synth.yaml",
                       "age-study": "neonatal_age_synth.yaml", "transfer-study": "neonatal_transfer_synth.yaml"}
    if getattr(args, "config", None) is None and args.command in default_configs:
        args.config = str(Path(__file__).resolve().parent.parent / "configs" / default_configs[args.command])
    from jaxseg.config import ConfigError
    from jaxseg.data.io import DataError
    from jaxseg.fileio import OutputError
    from jaxseg.interop.torch_run import ImportRunError
    from jaxseg.locks import LockError
    from jaxseg.rundir import RunError
    from jaxseg.train.checkpoint import IncompatibleResume
    from jaxseg.train.loop import TrainingError

    try:
        with _quiet_cli():
            args.fn(args)
    except (ConfigError, DataError, ImportRunError, IncompatibleResume, TrainingError, FileNotFoundError,
            OutputError, LockError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
