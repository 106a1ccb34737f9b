"""On-device 3D data augmentation in pure JAX (nnU-Net, Isensee et al. 2021; Kamraoui et al., DeepLesionBrain).

Everything here is jit-able with static shapes and runs inside the jitted train step: one
``augment(key, image, label, mask, params)`` call augments a whole batch, vmapped over the
samples, each sample driven by its own PRNG key. Random decisions ("apply this transform?") are
sampled booleans consumed by ``lax.cond`` (a select under ``vmap``), never Python control flow on
traced values. Python control flow only looks at the static ``AugmentParams`` (a frozen, hashable
dataclass), so transforms whose probability is 0 are not even traced.

Conventions
    image (B, X, Y, Z, C) float32, channels last; label (B, X, Y, Z) int; mask (B, X, Y, Z)
    float {0, 1}: "this voxel is labelled" (label budgeting, Richter & Fetit). The mask follows exactly the
    label's spatial transform (nearest neighbour); voxels sampled from outside the input get
    image 0, label 0 and mask 0 (unlabelled), so a masked loss never trains on padding.

Order (nnU-Net v2 ``get_training_transforms``): spatial (rotation, scaling, elastic, mirroring and
the centre crop to ``out_shape``, all composed into ONE coordinate field and ONE resampling), then
on the image only: Gaussian noise, Gaussian blur, multiplicative brightness, additive shift,
contrast, low-resolution simulation, inverted gamma, gamma, and finally IQDA (DeepLesionBrain).
Mirroring is folded into the sampling grid instead of running last as in nnU-Net; every intensity
transform is spatially homogeneous, so the output distribution is the same.

Cost (per sample, P = output voxels, C = channels, n = patch edge):
- geometry, only when a rotation/scale/elastic probability is non-zero: 8 scalar gathers per
  channel (trilinear) + 1 gather for label and mask together (nearest, packed as the int32 code
  2 * label + mask), sharing one index computation; otherwise a static centre slice and a
  select per mirrored axis. Elastic adds noise on a coarse grid (step f ~ sigma / 1.25) smoothed
  and upsampled by three small dense matrices (n x n/f).
- separable filters (blur, unsharp masking, axial mean filter, low-resolution simulation) are a
  dense (n x n) matrix per axis applied by a dot: n multiply-adds per voxel and axis. More FLOPs
  than 2r+1 shifted slices but a dot is never fused into its producers: with shifted slices
  XLA:CPU fused the 8-corner interpolation into every tap (geometry + blur 3x slower, the
  nnunet preset 10x slower end to end).
- all scalar random numbers of a sample come from one threefry draw (``_Draws``), which halves
  XLA:CPU compile time.
- under ``vmap`` a sampled ``lax.cond`` becomes a select that computes both branches, so a step
  costs the sum over the enabled transforms, not their expectation; ``batch_mode="map"``
  (``lax.map`` over samples, sequential) really skips unapplied transforms.
Measured with ``benchmark()`` on this project's 2-core CPU (XLA:CPU, jax 0.10.2), batch
(2, 64, 64, 64, 1), after compile (1.4 s), median of 30 calls: nnunet 28 ms (vmap) / 14 ms
(map); neonatal 14 / 10 ms; dlb_iqda 2.6 / 2.1 ms; none 0.6 ms; geometry alone (rotation +
scaling) 8 ms. An (80^3 -> 64^3) nnunet crop costs the same as 64^3 (the work scales with the
output patch). Under load from other processes the same calls took up to 2x longer.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Range = tuple[float, float]

_F32 = jnp.float32

# Gaussian kernels are truncated at this many standard deviations (scipy's default is 4.0; 3.0
# keeps 99.7 % of the mass and 25 % fewer taps). ``gaussian_blur`` matches
# ``scipy.ndimage.gaussian_filter(x, sigma, mode="reflect", truncate=3.0)``.
TRUNCATE = 3.0


def _as_range(value, name: str) -> Range:
    lo, hi = (float(v) for v in value)
    if lo > hi:
        raise ValueError(f"AugmentParams.{name}: lower bound {lo} > upper bound {hi}")
    return (lo, hi)


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """Probabilities and ranges of every transform; frozen and hashable (static under jit).

    Spatial transform: applied as a whole with probability ``p_spatial``; given that, rotation,
    scaling and elastic deformation are each applied with their own probability (nnU-Net:
    p_spatial 1, p_rotation 0.2, p_scale 0.2; MONAI's Rand3DElastic as the neonatal code uses it:
    p_spatial 0.24 and all three 1). All sampled transforms compose into a single sampling field
    ``coords = R S (g - c + d(g)) + c + offset`` (R rotation, S isotropic scale, d elastic
    displacement, g output voxel index, c output centre, offset centre of the input region), so
    the image is resampled once (trilinear) and label/mask once (nearest).

    - ``rotation_deg``: per array axis (0, 1, 2) the (low, high) angle in degrees, rotation about
      that axis; R = Rz @ Ry @ Rx (nnU-Net / batchgenerators order). Positive angles rotate the
      *sampling grid*: +90 deg about axis a gives ``out = jnp.rot90(in, k=-1, axes=((a + 1) % 3,
      (a + 2) % 3))``, e.g. axes (0, 1) for a rotation about axis 2.
    - ``scale_range``: isotropic factor s multiplying the sampling coordinates (s > 1 samples a
      larger region, i.e. zooms out, as in batchgenerators).
    - elastic: ``d = magnitude * G_sigma * U(-1, 1)`` in voxels, per component -- exactly the
      batchgenerators ``elastic_deform_coordinates(alpha=magnitude, sigma)`` and MONAI
      ``Rand3DElastic(sigma_range, magnitude_range)`` definition (uniform noise at every voxel,
      Gaussian-smoothed with zero padding, times the magnitude). In 3D the smoothing divides the
      noise std by about (2 sqrt(pi) sigma)^(3/2), so magnitude 40-80 with sigma 5-8 gives an RMS
      displacement of about 0.15-0.6 voxel (per component). For speed the noise is drawn on a
      coarse grid of step f (``elastic_grid_step``; 0 = auto, floor(sigma_min / 1.25)), scaled by
      f^(-3/2) so that the smoothed field keeps the same variance, smoothed with sigma / f and
      linearly upsampled; the field's statistics match the full-resolution definition (RMS
      within 10 % of the formula, tested against scipy). TorchIO's RandomElasticDeformation is a
      different parametrisation (B-spline control points, max displacement in mm) and is not
      what "sigma 5-8, magnitude 40-80" refers to.
    - ``p_mirror``: per-axis flip probability.

    Intensity (image only): ``noise_range`` is the range of the noise std (``noise_param="std"``:
    nnU-Net v2's GaussianNoiseTransform, despite its argument name ``noise_variance``, and MONAI
    RandGaussianNoise) or of its variance (``"variance"``), one value shared by the channels;
    ``noise_shared_field`` adds the very same noise field to every channel (nnU-Net's
    ``synchronize_channels=True`` expands one field over the channels). ``blur_sigma`` is sampled
    per axis (nnU-Net ``synchronize_axes=False``); each channel is blurred with probability
    ``p_blur_channel`` and, with ``blur_per_channel``, its own sigmas (nnU-Net: 0.5, own sigmas;
    MONAI RandGaussianSmooth: all channels, shared sigmas). Brightness is a multiplier per channel
    (``brightness_per_channel``; MONAI RandScaleIntensity's default draws one for all channels);
    ``shift_range`` an additive offset (MONAI RandShiftIntensity); contrast scales around the
    per-channel mean and clips to the original per-channel range; low-res zooms all axes by one
    factor (nearest down, linear up), each channel with probability ``p_lowres_channel`` and, with
    ``lowres_per_channel``, its own factor (nnU-Net: 0.5, own factor); gamma rescales each channel to
    [0, 1], raises to gamma, rescales back and (``gamma_retain_stats``) restores the mean and std
    (so with retain_stats the range is NOT kept exactly: that is what nnU-Net does); the inverted
    gamma applies the same to ``-image``. With ``two_sided_sampling`` (nnU-Net's ``BGContrast``)
    multipliers and gammas whose range straddles 1 are drawn from [low, 1] or [1, high] with
    probability 1/2 each, else uniformly on the range.

    IQDA (DeepLesionBrain, ``iqda=True``): per sample exactly one of none / Gaussian blur (isotropic
    sigma ~ U(iqda_sigma)) / unsharp masking ``x + alpha (x - blur(x))`` with alpha ~
    U(iqda_alpha) / mean filter of size sz (drawn from ``iqda_axial_sizes``) along
    ``iqda_axis``; none with probability ``iqda_p_none`` and the other three in proportion to
    ``iqda_weights``. Labels unchanged.

    Anisotropic patches (nnU-Net's dummy 2D augmentation): ``dummy_2d_axis`` (None: off) is the
    out-of-plane axis a; rotation is about a only, scaling and elastic deformation act in the
    plane of the other two axes and low-res simulation leaves a alone. :func:`for_patch` sets it,
    with nnU-Net's +-180 deg in-plane rotation, when ``anisotropy_rule`` is on and the patch is
    anisotropic (see there).
    """

    # spatial
    p_spatial: float = 1.0
    p_rotation: float = 0.0
    rotation_deg: tuple[Range, Range, Range] = ((-30.0, 30.0), (-30.0, 30.0), (-30.0, 30.0))
    p_scale: float = 0.0
    scale_range: Range = (0.7, 1.4)
    p_elastic: float = 0.0
    elastic_sigma: Range = (5.0, 8.0)
    elastic_magnitude: Range = (40.0, 80.0)
    elastic_grid_step: int = 0
    p_mirror: tuple[float, float, float] = (0.0, 0.0, 0.0)
    # intensity
    p_noise: float = 0.0
    noise_range: Range = (0.0, 0.1)
    noise_param: str = "variance"
    noise_shared_field: bool = False
    p_blur: float = 0.0
    blur_sigma: Range = (0.5, 1.0)
    p_blur_channel: float = 1.0
    blur_per_channel: bool = False
    p_brightness: float = 0.0
    brightness_range: Range = (0.75, 1.25)
    brightness_per_channel: bool = True
    p_shift: float = 0.0
    shift_range: Range = (-0.1, 0.1)
    p_contrast: float = 0.0
    contrast_range: Range = (0.75, 1.25)
    p_lowres: float = 0.0
    lowres_zoom: Range = (0.5, 1.0)
    p_lowres_channel: float = 1.0
    lowres_per_channel: bool = False
    p_gamma_inverted: float = 0.0
    p_gamma: float = 0.0
    gamma_range: Range = (0.7, 1.5)
    gamma_retain_stats: bool = True
    two_sided_sampling: bool = True
    # IQDA (DeepLesionBrain)
    iqda: bool = False
    iqda_p_none: float = 0.0
    iqda_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # blur, unsharp, axial mean filter
    iqda_sigma: Range = (0.5, 1.75)
    iqda_alpha: Range = (1.0, 1.0)
    iqda_axial_sizes: tuple[int, ...] = (2, 3, 4)
    iqda_axis: int = 2
    # anisotropic patches
    dummy_2d_axis: Optional[int] = None
    anisotropy_rule: bool = False

    def __post_init__(self):
        # Normalise lists (YAML) to tuples so the object stays hashable, then validate.
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("p_") and f.name != "p_mirror":
                value = float(value)
                if not 0.0 <= value <= 1.0:
                    raise ValueError(f"AugmentParams.{f.name} = {value} is not a probability")
                set_(f.name, value)
        if len(self.rotation_deg) != 3:
            raise ValueError("AugmentParams.rotation_deg needs one (low, high) range per axis")
        set_("rotation_deg", tuple(_as_range(r, "rotation_deg") for r in self.rotation_deg))
        mirror = tuple(float(p) for p in self.p_mirror)
        if len(mirror) != 3 or not all(0.0 <= p <= 1.0 for p in mirror):
            raise ValueError(f"AugmentParams.p_mirror = {self.p_mirror}: three probabilities")
        set_("p_mirror", mirror)
        for name in ("scale_range", "elastic_sigma", "elastic_magnitude", "noise_range",
                     "blur_sigma", "brightness_range", "shift_range", "contrast_range",
                     "lowres_zoom", "gamma_range", "iqda_sigma", "iqda_alpha"):
            set_(name, _as_range(getattr(self, name), name))
        if self.noise_param not in ("variance", "std"):
            raise ValueError(
                f"AugmentParams.noise_param = {self.noise_param!r}: 'variance' or 'std'")
        if self.noise_range[0] < 0:
            raise ValueError("AugmentParams.noise_range must be non-negative")
        for name in ("blur_sigma", "iqda_sigma", "elastic_sigma"):
            if getattr(self, name)[0] <= 0:
                raise ValueError(f"AugmentParams.{name} must be positive")
        if self.scale_range[0] <= 0 or self.lowres_zoom[0] <= 0 or self.lowres_zoom[1] > 1:
            raise ValueError("AugmentParams: scale_range must be > 0 and lowres_zoom in (0, 1]")
        if self.gamma_range[0] <= 0:
            raise ValueError("AugmentParams.gamma_range must be positive")
        set_("elastic_grid_step", int(self.elastic_grid_step))
        if self.elastic_grid_step < 0:
            raise ValueError("AugmentParams.elastic_grid_step must be >= 0 (0 = auto)")
        weights = tuple(float(w) for w in self.iqda_weights)
        if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError("AugmentParams.iqda_weights: three non-negative weights, sum > 0")
        set_("iqda_weights", weights)
        sizes = tuple(int(s) for s in self.iqda_axial_sizes)
        if not sizes or min(sizes) < 1:
            raise ValueError("AugmentParams.iqda_axial_sizes: positive integers")
        set_("iqda_axial_sizes", sizes)
        if self.iqda_axis not in (0, 1, 2):
            raise ValueError("AugmentParams.iqda_axis must be 0, 1 or 2")
        if self.dummy_2d_axis not in (None, 0, 1, 2):
            raise ValueError("AugmentParams.dummy_2d_axis must be None, 0, 1 or 2")

    # -- static facts used to prune the traced program --------------------------------------
    @property
    def needs_resampling(self) -> bool:
        """True when a rotation, scaling or elastic deformation can happen (then one gather)."""
        return self.p_spatial > 0 and max(self.p_rotation, self.p_scale, self.p_elastic) > 0

    @property
    def is_identity(self) -> bool:
        """True when every probability is zero (``augment`` then only centre-crops)."""
        return (not self.needs_resampling and max(self.p_mirror) == 0
                and not self.iqda and max(self.p_noise, self.p_blur, self.p_brightness,
                                           self.p_shift, self.p_contrast, self.p_lowres,
                                           self.p_gamma_inverted, self.p_gamma) == 0)


NONE = AugmentParams()

# nnU-Net v2's nnUNetTrainer.get_training_transforms for 3D data. Its GaussianNoiseTransform
# (noise_variance=(0, 0.1), synchronize_channels=True) passes the drawn value to np.random.normal
# as the std and adds one field to all channels; blur and low-res hit each channel with p 0.5 and
# its own sigmas / zoom (synchronize_channels=False).
NNUNET = AugmentParams(
    p_rotation=0.2, rotation_deg=((-30.0, 30.0),) * 3,
    p_scale=0.2, scale_range=(0.7, 1.4),
    p_mirror=(0.5, 0.5, 0.5),
    p_noise=0.1, noise_range=(0.0, 0.1), noise_param="std", noise_shared_field=True,
    p_blur=0.2, blur_sigma=(0.5, 1.0), p_blur_channel=0.5, blur_per_channel=True,
    p_brightness=0.15, brightness_range=(0.75, 1.25),
    p_contrast=0.15, contrast_range=(0.75, 1.25),
    p_lowres=0.25, lowres_zoom=(0.5, 1.0), p_lowres_channel=0.5, lowres_per_channel=True,
    p_gamma_inverted=0.1, p_gamma=0.3, gamma_range=(0.7, 1.5), gamma_retain_stats=True,
    anisotropy_rule=True,
)

# nnU-Net's do_dummy_2d_data_aug threshold, and its in-plane rotation range then (degrees).
ANISO_THRESHOLD = 3.0
DUMMY_2D_ROTATION_DEG = (-180.0, 180.0)


def for_patch(params: AugmentParams, patch_size) -> AugmentParams:
    """``params`` for training patches of ``patch_size``: with ``params.anisotropy_rule``, nnU-Net's
    dummy 2D augmentation (in-plane rotation of +-180 deg, in-plane scaling) when
    ``max(patch) / min(patch) > ANISO_THRESHOLD``, the shortest patch axis being out of plane.

    nnU-Net tests ``max(patch) / patch[0]``: it has transposed the data so that axis 0 has the
    coarsest spacing, which is the axis its planner gives the fewest voxels. jaxseg keeps the
    input's axis order, so the short axis is found instead of assumed to be axis 0.
    """
    patch = tuple(int(n) for n in patch_size)
    axis = int(np.argmin(patch))
    if not params.anisotropy_rule or max(patch) / patch[axis] <= ANISO_THRESHOLD:
        return params
    rotation = tuple(DUMMY_2D_ROTATION_DEG if a == axis else (0.0, 0.0) for a in range(3))
    return dataclasses.replace(params, dummy_2d_axis=axis, rotation_deg=rotation)

# Neonatal (Richter & Fetit, MONAI): flips p 0.1 per axis; Rand3DElastic p 0.24 with sigma 5-8,
# magnitude 40-80, rotation +-5/+-5/+-180 deg and scale +-15 % applied together; noise std
# U(0, 0.01) p 0.13; smoothing sigma 0.5-1.15 p 0.13; intensity scale x(1 +- 0.1) p 0.24, one
# factor for all channels (RandScaleIntensity's channel_wise=False); shift +-0.1 p 0.24.
NEONATAL = AugmentParams(
    p_mirror=(0.1, 0.1, 0.1),
    p_spatial=0.24, p_rotation=1.0, p_scale=1.0, p_elastic=1.0,
    rotation_deg=((-5.0, 5.0), (-5.0, 5.0), (-180.0, 180.0)),
    scale_range=(0.85, 1.15),
    elastic_sigma=(5.0, 8.0), elastic_magnitude=(40.0, 80.0),
    p_noise=0.13, noise_range=(0.0, 0.01), noise_param="std",
    p_blur=0.13, blur_sigma=(0.5, 1.15),
    p_brightness=0.24, brightness_range=(0.9, 1.1), brightness_per_channel=False,
    p_shift=0.24, shift_range=(-0.1, 0.1),
)

# DeepLesionBrain IQDA, the paper's values: always one of blur / unsharp / axial mean filter,
# unsharp alpha 1.
DLB_IQDA = AugmentParams(iqda=True, iqda_p_none=0.0, iqda_alpha=(1.0, 1.0))

# DeepLesionBrain IQDA as the later reference code does it: p(none) 0.1, alpha ~ U(1, 5).
DLB_IQDA_CODE = dataclasses.replace(DLB_IQDA, iqda_p_none=0.1, iqda_alpha=(1.0, 5.0))

# Keyed by the config enum values (a plain enum switch, not a registry).
PRESETS: dict[str, AugmentParams] = {
    "nnunet": NNUNET,
    "neonatal": NEONATAL,
    "dlb_iqda": DLB_IQDA,
    "dlb_iqda_code": DLB_IQDA_CODE,
    "none": NONE,
}


# ------------------------------------------------------------------------------------------
# Small building blocks (public where tests and other modules use them)
# ------------------------------------------------------------------------------------------

class _Draws:
    """All scalar random numbers of one sample, from a few uniform vector draws.

    Every transform consumes consecutive entries (a static, trace-time cursor), so a sample costs
    one threefry call per SIZE scalars instead of one per parameter: that cut XLA:CPU compile
    time of the nnU-Net preset by about half. Per-channel parameters grow with the channel count,
    so a request that does not fit opens a new block (key folded with the block number).
    Array-sized noise draws use their own keys.
    """

    SIZE = 96

    def __init__(self, key):
        self._key = key
        self._blocks = 0
        self._new_block(self.SIZE)

    def _new_block(self, size: int):
        key = self._key if self._blocks == 0 else jax.random.fold_in(self._key, self._blocks)
        self._u = jax.random.uniform(key, (size,), _F32)
        self._i = 0
        self._blocks += 1

    def next(self, n: Optional[int] = None):
        m = 1 if n is None else n
        if self._i + m > self._u.shape[0]:
            self._new_block(max(self.SIZE, m))
        out = self._u[self._i:self._i + m]
        self._i += m
        return out[0] if n is None else out

    def bernoullis(self, p: float, n: int):
        """n independent booleans, each True with probability p."""
        return self.next(n) < p

    def uniform(self, lo: float, hi: float, n: Optional[int] = None):
        # lo + 0 * u is exactly lo: a degenerate range gives exactly its value.
        return lo + (hi - lo) * self.next(n)

    def bernoulli(self, p: float):
        return self.next() < p  # p = 1 is always True (u < 1), p = 0 never

    def factor(self, rng: Range, n: Optional[int], two_sided: bool):
        """nnU-Net's BGContrast: half the mass in [lo, 1], half in [1, hi] if lo < 1 < hi."""
        lo, hi = rng
        if not (two_sided and lo < 1.0 < hi):
            return self.uniform(lo, hi, n)
        below = self.next(n) < 0.5
        return jnp.where(below, self.uniform(lo, 1.0, n), self.uniform(1.0, hi, n))

    def choice(self, probs: Sequence[float]):
        """Index i with probability probs[i] (static probabilities summing to 1)."""
        edges = np.cumsum(np.asarray(probs, np.float64))[:-1] / float(np.sum(probs))
        return jnp.sum(self.next() >= jnp.asarray(edges, _F32)).astype(jnp.int32)


def _flat_uniform(key, shape, lo: float, hi: float):
    # Drawn 1-D then reshaped: under vmap, XLA:CPU compiles multi-dimensional threefry draws
    # 5-10x slower (seconds) than the same number of values drawn as a vector.
    return jax.random.uniform(key, (math.prod(shape),), _F32, lo, hi).reshape(shape)


def _flat_normal(key, shape):
    return jax.random.normal(key, (math.prod(shape),), _F32).reshape(shape)


def _maybe(pred, fn: Callable, x):
    """``fn(x)`` if pred else ``x``; a real branch unbatched, a select under vmap."""
    return lax.cond(pred, fn, lambda y: y, x)


def gaussian_kernel_1d(sigma, radius: int, truncate: float = TRUNCATE):
    """Normalised Gaussian weights on offsets -radius..radius (static length, traced sigma).

    Taps beyond ``int(truncate * sigma + 0.5)`` are zero, as in scipy.ndimage.gaussian_filter.
    """
    offsets = jnp.arange(-radius, radius + 1, dtype=_F32)
    sigma = jnp.asarray(sigma, _F32)
    w = jnp.exp(-0.5 * (offsets / sigma) ** 2)
    w = jnp.where(jnp.abs(offsets) <= jnp.floor(truncate * sigma + 0.5), w, 0.0)
    return w / jnp.sum(w)


@functools.lru_cache(maxsize=64)
def _shift_matrices(n: int, radius: int, mode: str) -> np.ndarray:
    """Static (2 radius + 1, n, n) 0/1 matrices: P[t] @ v = v shifted by t - radius, with
    ``mode`` "reflect" (scipy's reflect = numpy's symmetric: d c b a | a b c d | d c b a) or
    "constant" (zeros outside)."""
    mats = np.zeros((2 * radius + 1, n, n), np.float32)
    for t in range(2 * radius + 1):
        for i in range(n):
            j = i + t - radius
            if mode == "constant" and not 0 <= j < n:
                continue
            while not 0 <= j < n:  # repeated reflection for kernels longer than the axis
                j = -j - 1 if j < 0 else 2 * n - 1 - j
            mats[t, i, j] += 1.0
    return mats


def filter_matrix(weights, n: int, mode: str = "reflect"):
    """(n, n) matrix of the 1D correlation ``out[i] = sum_t w[t] x[i + t - r]`` (len(w) = 2r+1).

    ``weights`` may be traced (its length is static). Applying a filter as a dense matrix costs n
    multiply-adds per voxel and axis instead of 2r+1, but it is a dot (batched matmul under
    vmap), which XLA never fuses into -- and so never recomputes -- its producers: the shifted-
    slices formulation was measured 3x (blur after resampling) to 10x (nnunet preset) slower on
    CPU, because XLA:CPU fused the 8-corner interpolation into every tap. Dots are also what
    accelerators are fastest at.
    """
    radius = (weights.shape[0] - 1) // 2
    return jnp.einsum("t,tij->ij", weights, jnp.asarray(_shift_matrices(n, radius, mode)),
                      precision=lax.Precision.HIGHEST)


def apply_along_axis(x, matrix, axis: int):
    """``out = matrix @ x`` along ``axis`` (the other axes untouched), full float32 precision."""
    letters = "abcdefgh"[: x.ndim]
    out = letters.replace(letters[axis], "z")
    return jnp.einsum(f"z{letters[axis]},{letters}->{out}", matrix, x,
                      precision=lax.Precision.HIGHEST)


def gaussian_blur(x, sigma, sigma_max: float, axes: Sequence[int] = (0, 1, 2),
                  truncate: float = TRUNCATE):
    """Separable Gaussian blur of ``x`` over ``axes``; ``sigma`` scalar or one per axis.

    ``sigma_max`` (static) fixes the kernel length ``2 * int(truncate * sigma_max + 0.5) + 1``.
    Equals ``scipy.ndimage.gaussian_filter(x, sigma, mode="reflect", truncate=truncate)``.
    """
    radius = max(1, int(math.floor(truncate * sigma_max + 0.5)))
    sigma = jnp.broadcast_to(jnp.asarray(sigma, _F32), (len(axes),))
    for i, axis in enumerate(axes):
        w = gaussian_kernel_1d(sigma[i], radius, truncate)
        x = apply_along_axis(x, filter_matrix(w, x.shape[axis]), axis)
    return x


def axial_mean_filter(x, size, max_size: int, axis: int = 2):
    """Mean filter of (traced) ``size`` along ``axis``, reflect padding.

    Window for output i: x[i - size//2 : i - size//2 + size], i.e. scipy's
    ``uniform_filter1d(x, size, axis, mode="reflect")`` (origin 0). ``max_size`` is static.
    """
    half = max_size // 2
    offsets = jnp.arange(-half, half + 1)  # cover every size <= max_size
    size = jnp.asarray(size, jnp.int32)
    start = -(size // 2)
    w = jnp.where((offsets >= start) & (offsets < start + size), 1.0, 0.0) / size.astype(_F32)
    return apply_along_axis(x, filter_matrix(w.astype(_F32), x.shape[axis]), axis)


def unsharp_mask(x, sigma, alpha, sigma_max: float, axes: Sequence[int] = (0, 1, 2)):
    """Edge enhancement: ``x + alpha * (x - gaussian_blur(x, sigma))``."""
    return x + alpha * (x - gaussian_blur(x, sigma, sigma_max, axes))


# ------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------

def rotation_matrix(angles):
    """R = Rz(a2) @ Ry(a1) @ Rx(a0), angles in radians about array axes 0, 1, 2."""
    a0, a1, a2 = angles[0], angles[1], angles[2]
    c0, s0, c1, s1 = jnp.cos(a0), jnp.sin(a0), jnp.cos(a1), jnp.sin(a1)
    c2, s2 = jnp.cos(a2), jnp.sin(a2)
    one, zero = jnp.ones_like(a0), jnp.zeros_like(a0)
    rx = jnp.array([[one, zero, zero], [zero, c0, -s0], [zero, s0, c0]])
    ry = jnp.array([[c1, zero, s1], [zero, one, zero], [-s1, zero, c1]])
    rz = jnp.array([[c2, -s2, zero], [s2, c2, zero], [zero, zero, one]])
    return rz @ ry @ rx


def _centre_offset(in_shape, out_shape):
    # Integer offset of the output patch's voxel 0 inside the input: the centre crop.
    return tuple((i - o) // 2 for i, o in zip(in_shape, out_shape))


def _elastic_step(params: AugmentParams) -> int:
    if params.elastic_grid_step > 0:
        return params.elastic_grid_step
    return max(1, int(params.elastic_sigma[0] / 1.25))


def _linear_upsample_matrix(n_out: int, n_coarse: int, step: int) -> np.ndarray:
    """(n_out, n_coarse) matrix: linear interpolation from grid points 0, step, 2 step, ..."""
    pos = np.arange(n_out) / step
    k0 = np.minimum(np.floor(pos).astype(np.int64), n_coarse - 1)
    frac = pos - k0
    k1 = np.minimum(k0 + 1, n_coarse - 1)
    m = np.zeros((n_out, n_coarse), np.float32)
    np.add.at(m, (np.arange(n_out), k0), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), k1), frac)
    return m


def _gaussian_matrix(n: int, sigma, truncate: float = TRUNCATE):
    """(n, n) matrix of a normalised 1D Gaussian filter with zero padding (traced sigma)."""
    d = jnp.arange(n, dtype=_F32)[:, None] - jnp.arange(n, dtype=_F32)[None, :]
    radius = jnp.floor(truncate * sigma + 0.5)
    g = jnp.where(jnp.abs(d) <= radius, jnp.exp(-0.5 * (d / sigma) ** 2), 0.0)
    taps = jnp.arange(-n + 1, n, dtype=_F32)
    norm = jnp.sum(jnp.where(jnp.abs(taps) <= radius, jnp.exp(-0.5 * (taps / sigma) ** 2), 0.0))
    return g / norm


def elastic_displacement(key, out_shape: Sequence[int], sigma, magnitude,
                         params: AugmentParams):
    """Displacement field (3, *out_shape) in voxels: magnitude * G_sigma * U(-1, 1) noise.

    See ``AugmentParams`` for the definition and the coarse-grid approximation (grid step from
    ``params``). Smoothing (zero padding) and linear upsampling are one small dense matrix per
    axis, (n_out, n_coarse), applied by three contractions: cheap to compile, a batched matmul
    under vmap.
    """
    step = _elastic_step(params)
    coarse = tuple(-(-(n - 1) // step) + 1 for n in out_shape)
    noise = _flat_uniform(key, (3,) + coarse, -1.0, 1.0) * (magnitude * step ** -1.5)
    mats = [jnp.matmul(_linear_upsample_matrix(n, c, step), _gaussian_matrix(c, sigma / step),
                       precision=lax.Precision.HIGHEST) for n, c in zip(out_shape, coarse)]
    for axis in range(3):
        noise = apply_along_axis(noise, mats[axis], axis + 1)
    return noise


def sampling_coordinates(draws: _Draws, key, in_shape, out_shape, params: AugmentParams, flips):
    """Per-axis input coordinates (3 arrays of ``out_shape``) for one sample."""
    gate = draws.bernoulli(params.p_spatial)
    angles = jnp.zeros((3,), _F32)
    if params.p_rotation > 0:
        on = gate & draws.bernoulli(params.p_rotation)
        lo = np.deg2rad([r[0] for r in params.rotation_deg]).astype(np.float32)
        hi = np.deg2rad([r[1] for r in params.rotation_deg]).astype(np.float32)
        if params.dummy_2d_axis is not None:  # in-plane: about the out-of-plane axis only
            others = [a for a in range(3) if a != params.dummy_2d_axis]
            lo[others] = hi[others] = 0.0
        angles = jnp.where(on, lo + (hi - lo) * draws.next(3), 0.0)
    scale = jnp.array(1.0, _F32)
    if params.p_scale > 0:
        on = gate & draws.bernoulli(params.p_scale)
        scale = jnp.where(on, draws.uniform(*params.scale_range), 1.0)
    # R @ diag(scale per axis); dummy 2D leaves the out-of-plane axis unscaled
    axis_scale = jnp.stack([jnp.ones_like(scale) if a == params.dummy_2d_axis else scale for a in range(3)])
    affine = rotation_matrix(angles) * axis_scale[None, :]

    centre = [(n - 1) / 2.0 for n in out_shape]
    offset = _centre_offset(in_shape, out_shape)
    u = []  # centred (and possibly mirrored) output grid, one broadcastable 1D array per axis
    for axis, n in enumerate(out_shape):
        g = jnp.arange(n, dtype=_F32)
        g = jnp.where(flips[axis], (n - 1) - g, g)
        shape = [1, 1, 1]
        shape[axis] = n
        u.append((g - centre[axis]).reshape(shape))
    if params.p_elastic > 0:
        on = gate & draws.bernoulli(params.p_elastic)
        sigma = draws.uniform(*params.elastic_sigma)
        magnitude = draws.uniform(*params.elastic_magnitude)
        d = lax.cond(on, lambda k: elastic_displacement(k, out_shape, sigma, magnitude, params),
                     lambda k: jnp.zeros((3,) + tuple(out_shape), _F32), key)
        u = [u[i] if i == params.dummy_2d_axis else u[i] + d[i] for i in range(3)]  # dummy 2D: in-plane
    coords = []
    for i in range(3):
        c = affine[i, 0] * u[0] + affine[i, 1] * u[1] + affine[i, 2] * u[2]
        coords.append(jnp.broadcast_to(c + (centre[i] + offset[i]), tuple(out_shape)))
    return coords


def resample(image, label, mask, coords):
    """Trilinear image, nearest label and mask at ``coords``; outside the input: 0, 0, 0.

    image (X, Y, Z, C), label (X, Y, Z) int, mask (X, Y, Z); coords: three arrays of the output
    shape. Per channel 8 scalar gathers from a zero-padded flat copy (scalar gathers are much
    faster on CPU than gathers of channel rows), the corner indices shared by all channels;
    label and mask share one nearest gather of the int32 code ``2 * label + mask``. Integral
    coordinates reproduce the input exactly. Same semantics as
    ``jax.scipy.ndimage.map_coordinates(..., order=1 / 0, mode="constant", cval=0)``.
    """
    shape = image.shape[:3]
    sx, sy = (shape[1] + 3) * (shape[2] + 3), shape[2] + 3
    i0s, fracs = [], []
    for c, n in zip(coords, shape):
        # Clamp to [-1, n]: every corner then lies in the zero-padded array (pad 1 before,
        # 2 after), and points further out still read zeros.
        c = jnp.clip(c, -1.0, float(n))
        i0 = jnp.floor(c)
        fracs.append(c - i0)
        i0s.append(i0.astype(jnp.int32) + 1)
    fx, fy, fz = fracs
    base = i0s[0] * sx + i0s[1] * sy + i0s[2]
    pad = ((1, 2), (1, 2), (1, 2))
    offsets = [dx * sx + dy * sy + dz for dx, dy, dz in itertools.product((0, 1), repeat=3)]

    def lerp(a, b, f):
        return a * (1.0 - f) + b * f

    channels = []
    for ch in range(image.shape[3]):
        flat = jnp.pad(image[..., ch].astype(_F32), pad).reshape(-1)
        v = [flat.at[base + o].get(mode="promise_in_bounds") for o in offsets]
        x00, x01 = lerp(v[0], v[4], fx), lerp(v[1], v[5], fx)
        x10, x11 = lerp(v[2], v[6], fx), lerp(v[3], v[7], fx)
        channels.append(lerp(lerp(x00, x10, fy), lerp(x01, x11, fy), fz))
    out_image = jnp.stack(channels, axis=-1)

    nearest = ((i0s[0] + (fx >= 0.5)) * sx + (i0s[1] + (fy >= 0.5)) * sy + (i0s[2] + (fz >= 0.5)))
    code = label.astype(jnp.int32) * 2 + (mask > 0.5).astype(jnp.int32)
    code = jnp.pad(code, pad).reshape(-1).at[nearest].get(mode="promise_in_bounds")
    out_label = (code >> 1).astype(label.dtype)
    out_mask = (code & 1).astype(mask.dtype)
    return out_image, out_label, out_mask


def _crop_or_pad(x, offset, out_shape):
    """Static centre crop (negative offsets pad with zeros) of the three leading axes."""
    pads, starts = [], []
    for o, n_out, n_in in zip(offset, out_shape, x.shape[:3]):
        before = max(0, -o)
        after = max(0, (o + n_out) - n_in)
        pads.append((before, after))
        starts.append(o + before)
    if any(p != (0, 0) for p in pads):
        x = jnp.pad(x, pads + [(0, 0)] * (x.ndim - 3))
    idx = tuple(slice(s, s + n) for s, n in zip(starts, out_shape))
    return x[idx]


def _geometry(draws: _Draws, key, image, label, mask, params: AugmentParams, out_shape):
    in_shape = image.shape[:3]
    flips = [draws.bernoulli(p) if p > 0 else jnp.array(False) for p in params.p_mirror]
    if params.needs_resampling:
        coords = sampling_coordinates(draws, key, in_shape, out_shape, params, flips)
        return resample(image, label, mask, coords)
    offset = _centre_offset(in_shape, out_shape)
    image, label, mask = (_crop_or_pad(x, offset, out_shape) for x in (image, label, mask))
    for axis, p in enumerate(params.p_mirror):
        if p > 0:
            image, label, mask = (jnp.where(flips[axis], jnp.flip(x, axis), x)
                                  for x in (image, label, mask))
    return image, label, mask


# ------------------------------------------------------------------------------------------
# Intensity
# ------------------------------------------------------------------------------------------

def _channel_stats(x):
    return x.mean(axis=(0, 1, 2)), x.min(axis=(0, 1, 2)), x.max(axis=(0, 1, 2))


def gamma_transform(x, gamma, retain_stats: bool = True, invert: bool = False):
    """nnU-Net's gamma per channel: to [0, 1], power, back; optionally restore mean and std."""
    if invert:
        x = -x
    mean, std = x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2))
    lo, hi = x.min(axis=(0, 1, 2)), x.max(axis=(0, 1, 2))
    rng = hi - lo
    y = jnp.power(jnp.clip((x - lo) / (rng + 1e-7), 0.0, 1.0), gamma) * rng + lo
    if retain_stats:
        y = y - y.mean(axis=(0, 1, 2))
        y = y / (y.std(axis=(0, 1, 2)) + 1e-8) * std + mean
    return -y if invert else y


def contrast_transform(x, factor):
    """Scale around the per-channel mean, clip to the original per-channel range."""
    mean, lo, hi = _channel_stats(x)
    return jnp.clip((x - mean) * factor + mean, lo, hi)


def _lowres_matrix(n: int, zoom):
    """(n, n) matrix: nearest-exact down to m = round(n * zoom) voxels, linear (half-pixel,
    as torch ``interpolate(..., "trilinear")``) back up to n. Traced ``zoom``, static n."""
    m = jnp.clip(jnp.round(n * zoom), 1, n)
    i = jnp.arange(n, dtype=_F32)
    u = jnp.clip((i + 0.5) * m / n - 0.5, 0.0, m - 1)
    k0 = jnp.floor(u)
    w = u - k0
    k1 = jnp.minimum(k0 + 1, m - 1)

    def src(k):  # nearest-exact source voxel of coarse voxel k
        return jnp.clip(jnp.floor((k + 0.5) * n / m), 0, n - 1).astype(jnp.int32)

    cols = jnp.arange(n, dtype=jnp.int32)[None, :]
    return (jnp.where(cols == src(k0)[:, None], 1.0 - w[:, None], 0.0)
            + jnp.where(cols == src(k1)[:, None], w[:, None], 0.0))


def simulate_low_resolution(x, zoom, axes: Sequence[int] = (0, 1, 2)):
    """Downsample (nearest) by ``zoom`` then upsample (linear) back along ``axes``, separably,
    static shapes. ``zoom`` is a scalar or one factor per channel (the last axis of ``x``).

    One (n, n) resampling matrix per axis (and channel) applied by a contraction (a batched matmul
    under vmap; a gather with per-sample indices is several times slower on CPU under vmap).
    """
    zoom = jnp.asarray(zoom, _F32)
    for axis in axes:
        n = x.shape[axis]
        if zoom.ndim == 0:
            x = apply_along_axis(x, _lowres_matrix(n, zoom), axis)
        else:
            x = apply_along_axis_per_channel(x, jax.vmap(lambda z: _lowres_matrix(n, z))(zoom), axis)
    return x


def apply_along_axis_per_channel(x, matrices, axis: int):
    """``out[..., c] = matrices[c] @ x[..., c]`` along ``axis``; x (X, Y, Z, C), matrices (C, n, n)."""
    letters = "abc"
    out = letters.replace(letters[axis], "z")
    return jnp.einsum(f"dz{letters[axis]},{letters}d->{out}d", matrices, x,
                      precision=lax.Precision.HIGHEST)


def gaussian_blur_per_channel(x, sigmas, sigma_max: float, truncate: float = TRUNCATE):
    """Separable Gaussian blur of x (X, Y, Z, C) with ``sigmas`` (C, 3): each channel its own per
    axis sigmas; equals :func:`gaussian_blur` channel by channel."""
    radius = max(1, int(math.floor(truncate * sigma_max + 0.5)))
    for axis in range(3):
        n = x.shape[axis]
        mats = jax.vmap(lambda s: filter_matrix(gaussian_kernel_1d(s, radius, truncate), n))(sigmas[:, axis])
        x = apply_along_axis_per_channel(x, mats, axis)
    return x


def _channel_choice(draws: _Draws, p: float, n_ch: int):
    # p = 1 draws nothing, so presets without per-channel choices keep their random streams
    return draws.bernoullis(p, n_ch) if p < 1 else jnp.ones((n_ch,), bool)


def intensity_draws(draws: _Draws, n_ch: int, params: AugmentParams) -> dict:
    """Every random intensity parameter of one sample (the ``on`` flags, per-channel choices,
    sigmas, factors), in the order :func:`_intensity` consumes them. Public for the tests."""
    two = params.two_sided_sampling
    d: dict = {}
    if params.p_noise > 0:
        d["noise_on"] = draws.bernoulli(params.p_noise)
        v = draws.uniform(*params.noise_range)
        d["noise_std"] = jnp.sqrt(v) if params.noise_param == "variance" else v
    if params.p_blur > 0:
        d["blur_on"] = draws.bernoulli(params.p_blur)
        d["blur_channels"] = _channel_choice(draws, params.p_blur_channel, n_ch)
        # (C, 3): own sigmas per channel and axis, or one triple shared by the channels
        sig = draws.uniform(*params.blur_sigma, 3 * n_ch if params.blur_per_channel else 3)
        d["blur_sigma"] = jnp.broadcast_to(sig.reshape(-1, 3), (n_ch, 3))
    if params.p_brightness > 0:
        d["brightness_on"] = draws.bernoulli(params.p_brightness)
        f = draws.factor(params.brightness_range, n_ch if params.brightness_per_channel else None, two)
        d["brightness"] = jnp.broadcast_to(f, (n_ch,))
    if params.p_shift > 0:
        d["shift_on"] = draws.bernoulli(params.p_shift)
        d["shift"] = draws.uniform(*params.shift_range)
    if params.p_contrast > 0:
        d["contrast_on"] = draws.bernoulli(params.p_contrast)
        d["contrast"] = draws.factor(params.contrast_range, n_ch, two)
    if params.p_lowres > 0:
        d["lowres_on"] = draws.bernoulli(params.p_lowres)
        d["lowres_channels"] = _channel_choice(draws, params.p_lowres_channel, n_ch)
        z = draws.uniform(*params.lowres_zoom, n_ch if params.lowres_per_channel else None)
        d["lowres_zoom"] = jnp.broadcast_to(z, (n_ch,))
    for name, p in (("gamma_inverted", params.p_gamma_inverted), ("gamma", params.p_gamma)):
        if p > 0:
            d[f"{name}_on"] = draws.bernoulli(p)
            d[name] = draws.factor(params.gamma_range, n_ch, two)
    return d


def _intensity(draws: _Draws, key, x, params: AugmentParams):
    d = intensity_draws(draws, x.shape[-1], params)

    if "noise_on" in d:
        # nnU-Net's synchronize_channels=True: one field expanded over the channels
        shape = x.shape[:3] + (1,) if params.noise_shared_field else x.shape
        x = _maybe(d["noise_on"], lambda x: x + d["noise_std"] * _flat_normal(key, shape), x)

    if "blur_on" in d:
        smax = params.blur_sigma[1]
        if params.blur_per_channel:
            blur = lambda x: gaussian_blur_per_channel(x, d["blur_sigma"], smax)  # noqa: E731
        else:
            blur = lambda x: gaussian_blur(x, d["blur_sigma"][0], smax)  # noqa: E731
        if params.p_blur_channel < 1:
            blur = lambda x, f=blur: jnp.where(d["blur_channels"], f(x), x)  # noqa: E731
        x = _maybe(d["blur_on"], blur, x)

    if "brightness_on" in d:
        x = _maybe(d["brightness_on"], lambda x: x * d["brightness"], x)

    if "shift_on" in d:
        x = _maybe(d["shift_on"], lambda x: x + d["shift"], x)

    if "contrast_on" in d:
        x = _maybe(d["contrast_on"], lambda x: contrast_transform(x, d["contrast"]), x)

    if "lowres_on" in d:
        axes = tuple(a for a in range(3) if a != params.dummy_2d_axis)  # nnU-Net's ignore_axes
        zoom = d["lowres_zoom"] if params.lowres_per_channel else d["lowres_zoom"][0]
        lowres = lambda x: simulate_low_resolution(x, zoom, axes)  # noqa: E731
        if params.p_lowres_channel < 1:
            lowres = lambda x, f=lowres: jnp.where(d["lowres_channels"], f(x), x)  # noqa: E731
        x = _maybe(d["lowres_on"], lowres, x)

    for name, invert in (("gamma_inverted", True), ("gamma", False)):
        if f"{name}_on" in d:
            x = _maybe(d[f"{name}_on"], lambda x, g=d[name], inv=invert: gamma_transform(
                x, g, params.gamma_retain_stats, inv), x)
    return x


def _iqda(draws: _Draws, x, params: AugmentParams):
    rest = (1.0 - params.iqda_p_none) / sum(params.iqda_weights)
    choice = draws.choice([params.iqda_p_none] + [w * rest for w in params.iqda_weights])
    sigma = draws.uniform(*params.iqda_sigma)
    alpha = draws.uniform(*params.iqda_alpha)
    sizes = params.iqda_axial_sizes
    size = jnp.asarray(sizes, jnp.int32)[draws.choice([1.0] * len(sizes))]
    smax = params.iqda_sigma[1]
    branches = [
        lambda x: x,
        lambda x: gaussian_blur(x, sigma, smax),
        lambda x: unsharp_mask(x, sigma, alpha, smax),
        lambda x: axial_mean_filter(x, size, max(sizes), params.iqda_axis),
    ]
    return lax.switch(choice, branches, x)


# ------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------

def augment_sample(key, image, label, mask, params: AugmentParams, out_shape=None):
    """Augment one sample: image (X, Y, Z, C), label (X, Y, Z), mask (X, Y, Z)."""
    out_shape = tuple(image.shape[:3]) if out_shape is None else tuple(int(n) for n in out_shape)
    k_draws, k_elastic, k_noise = jax.random.split(key, 3)
    draws = _Draws(k_draws)
    image, label, mask = _geometry(draws, k_elastic, image.astype(_F32), label, mask, params,
                                   out_shape)
    image = _intensity(draws, k_noise, image, params)
    if params.iqda:
        image = _iqda(draws, image, params)
    return image, label, mask


def augment(key, image, label, mask=None, params: AugmentParams = NONE, out_shape=None,
            batch_mode: str = "vmap"):
    """Augment a batch on device: ``(image, label, mask) -> (image, label, mask)``.

    image (B, X, Y, Z, C) float, label (B, X, Y, Z) int, mask (B, X, Y, Z) float {0, 1} or None
    (all labelled). ``out_shape`` (px, py, pz): the output patch, taken from the centre of the
    input region (which may be larger so that rotation/scaling do not sample outside it);
    None = the input shape. ``params``, ``out_shape`` and ``batch_mode`` are static under jit
    (use ``augment_jit`` or jit the enclosing train step). ``batch_mode``: "vmap" (default, all
    samples in parallel) or "map" (``lax.map``: sequential, but unapplied transforms are skipped).
    Each sample gets its own key from ``jax.random.split(key, B)``.
    """
    if image.ndim != 5:
        raise ValueError(f"augment: image must be (B, X, Y, Z, C), got shape {image.shape}")
    if label.shape != image.shape[:4]:
        raise ValueError(f"augment: label shape {label.shape} != image shape {image.shape[:4]}")
    if mask is None:
        mask = jnp.ones(label.shape, _F32)
    elif mask.shape != label.shape:
        raise ValueError(f"augment: mask shape {mask.shape} != label shape {label.shape}")
    if out_shape is not None and len(out_shape) != 3:
        raise ValueError(f"augment: out_shape must have 3 entries, got {out_shape}")
    out_shape = None if out_shape is None else tuple(int(n) for n in out_shape)
    if params.is_identity and (out_shape is None or out_shape == tuple(image.shape[1:4])):
        return image.astype(_F32), label, mask
    keys = jax.random.split(key, image.shape[0])

    def one(k, x, y, m):
        return augment_sample(k, x, y, m, params, out_shape)

    if batch_mode == "vmap":
        return jax.vmap(one)(keys, image, label, mask)
    if batch_mode == "map":
        return lax.map(lambda a: one(*a), (keys, image, label, mask))
    raise ValueError(f"augment: batch_mode must be 'vmap' or 'map', got {batch_mode!r}")


augment_jit = jax.jit(augment, static_argnames=("params", "out_shape", "batch_mode"))


def benchmark(params: AugmentParams = NNUNET, shape=(2, 64, 64, 64, 1), out_shape=None,
              batch_mode: str = "vmap", repeats: int = 10, seed: int = 0) -> dict:
    """Compile and time one jitted ``augment`` call; returns seconds (compile, median, min).

    ``python -c "from jaxseg.data.augment import *; print(benchmark(PRESETS['nnunet']))"``
    """
    key = jax.random.key(seed)
    image = jax.random.normal(key, shape, _F32)
    label = jax.random.randint(jax.random.fold_in(key, 1), shape[:4], 0, 4)
    mask = jnp.ones(shape[:4], _F32)
    fn = jax.jit(lambda k, x, y, m: augment(k, x, y, m, params, out_shape, batch_mode))
    t = time.perf_counter()
    jax.block_until_ready(fn(jax.random.fold_in(key, 2), image, label, mask))
    compile_s = time.perf_counter() - t
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(jax.random.fold_in(key, 3 + i), image, label, mask))
        times.append(time.perf_counter() - t)
    return {"compile_s": compile_s, "median_s": float(np.median(times)), "min_s": float(min(times))}
