"""A synthetic cohort written as an nnU-Net v2 raw dataset.

:func:`write_cohort` writes an nnU-Net v2 raw dataset (``imagesTr``, ``labelsTr``, ``imagesTs``,
``labelsTs``, ``dataset.json``, ``metadata.csv`` and ``preview.png``; see its docstring), in
parallel over subjects, each subject seeded from ``(seed, index)``. :func:`preview_png` draws a
picture of a written cohort.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxseg.config import SynthConfig
from jaxseg.data.synth.preview import preview_png
from jaxseg.data.synth.subject import (
    CHANNELS,
    make_site,
    make_subject,
)
from jaxseg.data.synth.template import (
    _TEMPLATE_VERSION,
    LABELS,
    LESION_LABELS,
    Template,
    _atomic_write_bytes,
    load_template,
)


def _largest_remainder(props: np.ndarray, n: int) -> np.ndarray:
    raw = props / props.sum() * n
    counts = np.floor(raw).astype(int)
    rest = n - counts.sum()
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[:rest]] += 1
    return counts


def _save_nifti(arr: np.ndarray, affine: np.ndarray, path: Path, tmp_dir: Path) -> None:
    """Write ``arr`` to ``path`` atomically (through ``tmp_dir`` on the same file system)."""
    import nibabel as nib

    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    if arr.dtype == np.uint8:
        img.header.set_data_dtype(np.uint8)
    # same basename as the final file, so the gzip header (and the bytes) are the same
    tmp = tmp_dir / f"{os.getpid()}_{path.parent.name}" / path.name
    tmp.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, tmp)
    os.replace(tmp, path)


def _subject_job(args: dict) -> dict:
    """Make one subject and write its files; runs in a worker process."""
    template = _WORKER_TEMPLATE if args.get("template") is None else args["template"]
    rng = np.random.default_rng([args["seed"], args["index"]])
    subj = make_subject(rng, template, stratum=args["stratum"], age=args["age"],
                        site=args["site"], spacing=args["spacing"], lesions=args["lesions"],
                        channels=args["channels"], age_unit=args["age_unit"],
                        skull_strip=args.get("skull_strip", True),
                        lesion_radius_mm=args.get("lesion_radius_mm", (1.0, 5.0)))
    out, tmp = Path(args["out_dir"]), Path(args["tmp_dir"])
    img_dir = out / ("imagesTs" if args["split"] == "test" else "imagesTr")
    lab_dir = out / ("labelsTs" if args["split"] == "test" else "labelsTr")
    case = args["case"]
    for c, ch in enumerate(args["channels"]):
        _save_nifti(subj["images"][ch], subj["affine"], img_dir / f"{case}_{c:04d}.nii.gz", tmp)
    _save_nifti(subj["label"].astype(np.uint8), subj["affine"], lab_dir / f"{case}.nii.gz", tmp)
    return {"case": case, "metadata": subj["metadata"]}


_WORKER_TEMPLATE: Template | None = None


def _init_worker(labels: np.ndarray, affine: np.ndarray) -> None:
    global _WORKER_TEMPLATE
    _WORKER_TEMPLATE = Template(labels, affine)


METADATA_COLUMNS = ("case", "stratum", "age", "site", "split", "age_unit", "brain_scale",
                    "cerebellum", "ventricles_ml", "cerebellum_ml", "brain_ml", "n_lesions",
                    "lesion_ml")


def write_cohort(out_dir: str | Path, cfg: SynthConfig, *, channels: Sequence[str] | None = None,
                 age_range: tuple[float, float] | None = None, skull_strip: bool = True, workers: int = 2,
                 progress: bool = True, preview: bool = True, overwrite: bool = False,
                 template: Template | None = None, name: str | None = None) -> dict[str, Any]:
    """Write the synthetic cohort of ``cfg`` (the config's ``synth`` section) as an nnU-Net v2 raw
    dataset in ``out_dir``.

    * ``cfg.flavour="tissue"``: labels = :data:`LABELS` (8 classes); channels ``("T1",)`` by
      default, ``channels=("T1", "T2")`` for two; ages in weeks PMA, default ``age_range`` (26, 45).
    * ``cfg.flavour="lesion"``: labels = :data:`LESION_LABELS` (binary); channels ``("T1",
      "FLAIR")``; adult anatomy, ages in years, default ``age_range`` (20, 60); lesion radii
      ``cfg.lesion_radius_mm``.
    * strata: ``cfg.strata()`` (control, ``p_ventriculomegaly``, ``p_cerebellar_hypoplasia``;
      a stratum of proportion 0 is left out); counts are allocated exactly (largest remainder)
      and shuffled.
    * ``cfg.sites``: number of sites, balanced; ``cfg.n_test``: held-out cases (None: 20% from 5
      subjects on, stratified by stratum) written to ``imagesTs`` / ``labelsTs``.
    * ``skull_strip`` (default True): brain-extracted images, exactly 0 outside
      :func:`brain_mask` and nonzero inside (see :func:`make_subject`), like the real datasets;
      False keeps the noisy background. Recorded in ``dataset.json`` (``synth.skull_strip`` and
      the description).

    Files: ``imagesTr/synth_0001_0000.nii.gz`` (4-digit channel suffix),
    ``labelsTr/synth_0001.nii.gz`` (uint8), ``imagesTs/``, ``labelsTs/``, ``dataset.json``,
    ``metadata.csv`` (columns :data:`METADATA_COLUMNS`) and, with ``preview``, ``preview.png``.
    Each file is written to a temporary name (under ``out_dir/.tmp``) and renamed, ``dataset.json``
    last, so an interrupted run leaves whole files and no ``dataset.json``. Subject ``i`` is drawn
    from ``default_rng([cfg.seed, i])`` whatever the number of ``workers`` (a "spawn" process pool
    when > 1), so the files are byte-identical for a seed. The template defaults to
    ``load_template(1)`` (``load_template(2)`` for spacings >= 3 mm). An existing non-empty
    ``out_dir`` is an error unless ``overwrite`` (which removes the previous cohort's files).

    Returns a summary dict: ``out_dir``, ``cases`` (the metadata rows), ``dataset_json``,
    ``preview`` (path or None), ``seconds``.
    """
    t0 = time.perf_counter()
    plan = _plan(cfg, channels, age_range)
    out = Path(out_dir)
    _clear(out, overwrite)
    for sub in ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if plan.n_test else ()):
        (out / sub).mkdir(parents=True, exist_ok=True)
    tmp_dir = out / ".tmp"
    tmp_dir.mkdir(exist_ok=True)

    if template is None:
        template = load_template(1 if cfg.spacing < 3 else 2)
    jobs = _jobs(cfg, plan, out, tmp_dir, skull_strip)
    results = _run_jobs(jobs, template, workers, progress, desc=f"synth {cfg.flavour} {cfg.spacing:g}mm")

    rows = [_metadata_row(j, results[j["case"]]["metadata"]) for j in jobs]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(METADATA_COLUMNS), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    _atomic_write_bytes(out / "metadata.csv", buf.getvalue().encode())

    ds = _dataset_json(cfg, plan, jobs, skull_strip, template, name)
    preview_path = None
    if preview:  # a failed picture must not cost the data: warn and carry on
        try:
            preview_path = preview_png(out, out / "preview.png", _rows=rows, _meta=ds)
        except Exception as e:  # noqa: BLE001
            import warnings

            warnings.warn(f"{out / 'preview.png'}: preview failed: {type(e).__name__}: {e}")
    _atomic_write_bytes(out / "dataset.json", (json.dumps(ds, indent=2) + "\n").encode())
    shutil.rmtree(tmp_dir, ignore_errors=True)
    return {"out_dir": out, "cases": rows, "dataset_json": out / "dataset.json",
            "preview": preview_path, "seconds": time.perf_counter() - t0}


@dataclass(frozen=True)
class _Plan:
    """What a cohort is made of, checked, before anything is written."""

    channels: tuple[str, ...]
    age_unit: str
    age_range: tuple[float, float]
    strata: dict[str, float]  # name -> proportion, zeros left out
    n_test: int


def _plan(cfg: SynthConfig, channels, age_range) -> _Plan:
    lesions = cfg.flavour == "lesion"
    channels = tuple(channels) if channels is not None else (("T1", "FLAIR") if lesions else ("T1",))
    for ch in channels:
        if ch not in CHANNELS:
            raise ValueError(f"unknown channel {ch!r}; expected some of {CHANNELS}")
    if len(set(channels)) != len(channels):
        raise ValueError(f"repeated channel in {channels}")
    if age_range is None:
        age_range = (20.0, 60.0) if lesions else (26.0, 45.0)
    a_lo, a_hi = float(age_range[0]), float(age_range[1])
    if not a_lo <= a_hi:
        raise ValueError(f"age_range must be (low, high), got {age_range}")
    strata = {k: p for k, p in cfg.strata().items() if p > 0}
    n = cfg.n_subjects
    n_test = (int(round(0.2 * n)) if n >= 5 else 0) if cfg.n_test is None else int(cfg.n_test)
    return _Plan(channels, "years" if lesions else "weeks", (a_lo, a_hi), strata, n_test)


def _clear(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` unless ``overwrite``, which removes the previous cohort's files."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out}: exists and is not empty (pass overwrite=True to replace it)")
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs", ".tmp"):
            shutil.rmtree(out / sub, ignore_errors=True)
        for fn in ("dataset.json", "metadata.csv", "preview.png"):
            (out / fn).unlink(missing_ok=True)


def _assign(cfg: SynthConfig, plan: _Plan) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per subject: stratum index (into ``plan.strata``), site, age and test flag, from one cohort-level
    stream independent of the subjects' own streams."""
    n = cfg.n_subjects
    rc = np.random.default_rng([int(cfg.seed), 0xC0407])
    counts = _largest_remainder(np.array(list(plan.strata.values())), n)
    stratum_of = np.repeat(np.arange(len(plan.strata)), counts)
    rc.shuffle(stratum_of)
    site_of = np.arange(n) % cfg.sites
    rc.shuffle(site_of)
    ages = np.round(rc.uniform(*plan.age_range, n), 2)
    # test split: stratified by stratum (largest remainder), random within stratum
    is_test = np.zeros(n, bool)
    if plan.n_test:
        per = _largest_remainder(counts.astype(float) + 1e-9, plan.n_test)
        per = np.minimum(per, counts)
        short = plan.n_test - per.sum()
        for k in np.argsort(-counts, kind="stable"):  # top up from the largest strata
            add = min(short, counts[k] - per[k])
            per[k] += add
            short -= add
        for k in range(len(plan.strata)):
            members = np.flatnonzero(stratum_of == k)
            is_test[rc.permutation(members)[: per[k]]] = True
    return stratum_of, site_of, ages, is_test


def _jobs(cfg: SynthConfig, plan: _Plan, out: Path, tmp_dir: Path, skull_strip: bool) -> list[dict]:
    """One job per subject for :func:`_subject_job` (picklable: the template is handed to the workers
    once)."""
    stratum_of, site_of, ages, is_test = _assign(cfg, plan)
    names = list(plan.strata)
    site_objs = [make_site(s, int(cfg.seed)) for s in range(cfg.sites)]
    return [{
        "seed": int(cfg.seed), "index": i, "case": f"synth_{i + 1:04d}",
        "stratum": names[stratum_of[i]], "age": float(ages[i]), "age_unit": plan.age_unit,
        "site": site_objs[site_of[i]], "spacing": float(cfg.spacing), "lesions": cfg.flavour == "lesion",
        "lesion_radius_mm": tuple(float(v) for v in cfg.lesion_radius_mm),
        "channels": plan.channels, "split": "test" if is_test[i] else "train",
        "skull_strip": bool(skull_strip),
        "out_dir": str(out), "tmp_dir": str(tmp_dir), "template": None,
    } for i in range(cfg.n_subjects)]


def _run_jobs(jobs: list[dict], template: Template, workers: int, progress: bool, desc: str) -> dict[str, dict]:
    """Run the subject jobs, in a "spawn" process pool when ``workers > 1``; results by case."""
    from tqdm.auto import tqdm

    results: dict[str, dict] = {}
    bar = tqdm(total=len(jobs), desc=desc, unit="case", disable=not progress)
    try:
        if workers > 1 and len(jobs) > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            ctx = mp.get_context("spawn")  # never fork a process that may hold JAX threads
            with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx,
                                     initializer=_init_worker,
                                     initargs=(template.labels, template.affine)) as pool:
                futs = [pool.submit(_subject_job, j) for j in jobs]
                try:
                    for fut in as_completed(futs):
                        r = fut.result()
                        results[r["case"]] = r
                        bar.update(1)
                except BaseException:
                    for fu in futs:
                        fu.cancel()
                    raise
        else:
            for j in jobs:
                r = _subject_job({**j, "template": template})
                results[r["case"]] = r
                bar.update(1)
    finally:
        bar.close()
    return results


def _metadata_row(job: dict, m: dict) -> dict:
    """One row of ``metadata.csv`` (:data:`METADATA_COLUMNS`) from a subject's metadata."""
    v = m["volumes_ml"]
    return {
        "case": job["case"], "stratum": m["stratum"], "age": f"{m['age']:.2f}",
        "site": m["site"], "split": job["split"], "age_unit": m["age_unit"],
        "brain_scale": f"{m['brain_scale']:.4f}", "cerebellum": m["cerebellum"],
        "ventricles_ml": f"{v['ventricles']:.2f}", "cerebellum_ml": f"{v['cerebellum']:.2f}",
        "brain_ml": f"{sum(x for k, x in v.items() if k != 'background'):.2f}",
        "n_lesions": m["n_lesions"], "lesion_ml": f"{m['lesion_ml']:.3f}",
    }


def _dataset_json(cfg: SynthConfig, plan: _Plan, jobs: list[dict], skull_strip: bool, template: Template,
                  name: str | None) -> dict:
    flavour, (a_lo, a_hi) = cfg.flavour, plan.age_range
    n_subjects = len(jobs)
    n_train = sum(j["split"] == "train" for j in jobs)
    counts = {k: sum(j["stratum"] == k for j in jobs) for k in plan.strata}
    return {
        "name": name or f"synth_{flavour}",
        "description": (
            f"jaxseg synthetic {flavour} cohort drawn from the MNI ICBM152 2009 template "
            f"(jaxseg.data.synth): {n_subjects} subjects, seed {cfg.seed}, {cfg.spacing:g} mm, "
            f"{cfg.sites} sites, strata {counts}, ages "
            f"{a_lo:g}-{a_hi:g} {plan.age_unit}. "
            + ("Skull-stripped: images are exactly 0 outside the brain mask (tissue labels > 0 "
               "dilated by one voxel) and nonzero inside."
               if skull_strip else "Not skull-stripped: Rician noise in the background.")),
        "channel_names": {str(c): ch for c, ch in enumerate(plan.channels)},
        "labels": dict(LESION_LABELS if flavour == "lesion" else LABELS),
        "numTraining": n_train,
        "numTest": n_subjects - n_train,
        "file_ending": ".nii.gz",
        "reference": "synthetic; anatomy from the MNI ICBM152 2009c template bundled with nilearn",
        "licence": "derived from MNI ICBM152 2009 (see nilearn's licence notes)",
        "synth": {"seed": int(cfg.seed), "spacing": float(cfg.spacing), "flavour": flavour,
                  "strata": {k: float(v) for k, v in plan.strata.items()}, "sites": cfg.sites,
                  "age_range": [a_lo, a_hi], "age_unit": plan.age_unit, "channels": list(plan.channels),
                  "skull_strip": bool(skull_strip),
                  "brain_mask": ("tissue labels > 0, dilated by 1 voxel (6-connected)"
                                 if skull_strip else None),
                  "template_version": _TEMPLATE_VERSION,
                  "template_resolution_mm": template.resolution},
    }
