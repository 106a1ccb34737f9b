"""The embedded default dataset: synthetic brain MRI cohorts drawn from the MNI ICBM152 2009.

No real cohort can ship, so the project makes its own from a real anatomy (numpy / scipy only,
no JAX; deterministic from a seed).

The package follows the cohort's making: :mod:`.template` (the 8-class label map of the MNI
template), :mod:`.subject` (sites and one subject's anatomy and appearance), :mod:`.cohort` (an
nnU-Net raw dataset, :func:`write_cohort`) and :mod:`.preview` (a picture of a written cohort).
Every public name is re-exported here.
"""

from jaxseg.data.synth.cohort import METADATA_COLUMNS, write_cohort
from jaxseg.data.synth.preview import preview_png
from jaxseg.data.synth.subject import (
                                       CHANNELS,
                                       DEFAULT_STRATA,
                                       MIN_BRAIN_INTENSITY,
                                       STRATA,
                                       Site,
                                       brain_mask,
                                       make_site,
                                       make_subject,
                                       output_grid,
)
from jaxseg.data.synth.template import (
                                       FOV_MM,
                                       LABELS,
                                       LESION_LABELS,
                                       Template,
                                       cache_dir,
                                       load_template,
                                       template_label_map,
)

__all__ = [
    "LABELS",
    "LESION_LABELS",
    "STRATA",
    "CHANNELS",
    "FOV_MM",
    "DEFAULT_STRATA",
    "METADATA_COLUMNS",
    "Template",
    "Site",
    "template_label_map",
    "load_template",
    "cache_dir",
    "output_grid",
    "brain_mask",
    "MIN_BRAIN_INTENSITY",
    "make_site",
    "make_subject",
    "write_cohort",
    "preview_png",
]
