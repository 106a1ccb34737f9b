"""DeepLesionBrain's config section (``dlb``) and its run config: the core config plus ``dlb``.

`dlb-train` / `dlb-predict` load :class:`DLBRunConfig`; `dlb-ablation` also writes the synthetic cohort
(:class:`DLBAblationConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from jaxseg.config import Config, SynthRunConfig
from jaxseg.config.convert import check_field, Section


@dataclass(frozen=True)
class DLBConfig(Section):
    """DeepLesionBrain (jaxseg.dlb): the tile grid, the ensemble's training and the fusion."""

    tiles_per_axis: int = 5
    tile_size: int = 96
    # stride and offset null: the reference code's grid on 181x217x181 at 5 tiles of 96^3 (strides 20/29/20,
    # offsets 4/4/0), tiles spread evenly on any other volume (jaxseg.dlb.grid.make_grid)
    stride: tuple[int, int, int] | None = None
    offset: tuple[int, int, int] | None = None
    method: Literal["hsl", "independent", "generic"] = "hsl"
    lesion_only: bool = True
    batch_size: int = 1
    generic_batch_size: int = 1
    steps_per_epoch: int | None = None
    generic_steps_per_epoch: int | None = None
    max_epochs: int = 500
    patience: int = 50
    generic_max_epochs: int = 500
    generic_patience: int = 50
    val_fraction: float = 0.2
    val_max_subvolumes: int = 64
    train_sites: tuple[str, ...] | None = None
    group_size: int = 25
    # majority_vote: the DeepLesionBrain paper; mean_prob (summed softmax, argmax): its reference code
    fusion: Literal["mean_prob", "majority_vote"] = "majority_vote"

    def _validate(self) -> None:
        check_field(self.tiles_per_axis >= 1, "tiles_per_axis", f"must be >= 1, got {self.tiles_per_axis}")
        check_field(self.tile_size >= 8 and self.tile_size % 8 == 0, "tile_size",
               f"must be a positive multiple of 8 (the compact U-Net pools 3 times), got {self.tile_size}")
        for name in ("batch_size", "generic_batch_size", "max_epochs", "patience", "generic_max_epochs",
                     "generic_patience", "group_size", "val_max_subvolumes"):
            check_field(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("steps_per_epoch", "generic_steps_per_epoch"):
            v = getattr(self, name)
            check_field(v is None or v >= 1, name, f"must be >= 1 or null, got {v}")
        check_field(0.0 < self.val_fraction < 1.0, "val_fraction", f"must be in (0, 1), got {self.val_fraction!r}")
        if self.stride is not None:
            check_field(all(v >= 0 for v in self.stride), "stride", f"must be >= 0, got {self.stride}")
        if self.offset is not None:
            check_field(all(v >= 0 for v in self.offset), "offset", f"must be >= 0, got {self.offset}")


@dataclass(frozen=True)
class DLBRunConfig(Config):
    dlb: DLBConfig = field(default_factory=DLBConfig)


@dataclass(frozen=True)
class DLBAblationConfig(DLBRunConfig, SynthRunConfig):
    """The ablation: the synthetic MS-like cohort (``synth``) and the DLB runs on it."""
