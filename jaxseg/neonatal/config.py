"""The neonatal studies' config: the core config, the synthetic tissue cohort (``synth``) they write,
and the transfer-learning study's section (``transfer``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from jaxseg.config import SynthRunConfig
from jaxseg.config.convert import check_field, Section


@dataclass(frozen=True)
class TransferConfig(Section):
    """The transfer-learning study (jaxseg.neonatal.transfer): roles by age in the synthetic cohort
    (paper: oldest 100 -> 90 pre-train / 10 validation; youngest 120 -> 40 fine-tune / 80 test)."""

    n_old: int = 30                # oldest subjects: pre-training
    n_old_val: int = 4             # of which validation (the pre-trained model's best checkpoint)
    n_young: int = 30              # youngest subjects: fine-tuning and test
    n_finetune: int = 10           # of which fine-tuning (drawn with data.split_seed); the rest test
    strategies: tuple[Literal["none", "shallow", "medium", "deep", "full", "scratch"], ...] = (
        "none", "shallow", "medium", "deep", "full", "scratch")
    finetune_steps: int = 100      # fine-tuning and from-scratch runs alike (train.* sets pre-training)
    finetune_lr: float = 1e-3      # the paper's fine-tuning lr (Richter & Fetit)
    scratch_lr: float | None = None  # null: optim.lr (a fresh network, as pre-training)

    def _validate(self) -> None:
        check_field(self.n_old >= 2, "n_old", f"must be >= 2, got {self.n_old}")
        check_field(1 <= self.n_old_val < self.n_old, "n_old_val", f"must be in [1, n_old), got {self.n_old_val}", "n_old")
        check_field(self.n_young >= 2, "n_young", f"must be >= 2, got {self.n_young}")
        check_field(1 <= self.n_finetune < self.n_young, "n_finetune",
               f"must be in [1, n_young) (the rest are the test set), got {self.n_finetune}", "n_young")
        check_field(len(self.strategies) >= 1 and len(set(self.strategies)) == len(self.strategies), "strategies",
               f"must be distinct and not empty, got {list(self.strategies)}")
        check_field(self.finetune_steps >= 1, "finetune_steps", f"must be >= 1, got {self.finetune_steps}")
        check_field(self.finetune_lr > 0, "finetune_lr", f"must be > 0, got {self.finetune_lr}")
        if self.scratch_lr is not None:
            check_field(self.scratch_lr > 0, "scratch_lr", f"must be > 0 or null, got {self.scratch_lr}")


@dataclass(frozen=True)
class NeonatalConfig(SynthRunConfig):
    transfer: TransferConfig = field(default_factory=TransferConfig)
