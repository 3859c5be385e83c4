"""Options of united-expert distillation (torch-free, so the command line starts fast)."""

from __future__ import annotations

from dataclasses import dataclass

VALIDATIONS = ("sources", "random")
STARTS = ("frequency", "average")


@dataclass
class DistillConfig:
    max_steps: int = 1000
    batch_tokens: int = 512
    lr_scale: float = 0.05  # Adam step relative to the RMS of each weight tensor
    eval_every: int = 50
    patience: int = 4  # evaluations without improvement before stopping
    max_val_tokens: int = 4096  # validation tokens per fold (a random sample of the left-out source)
    validation: str = "sources"  # leave-one-source-out folds, or a random split
    max_folds: int = 2  # left-out sources per group (rotating over groups); 0: every source
    held_out: float = 0.1  # validation share of a random split
    min_fold_tokens: int = 32  # a source routing fewer tokens to the group is no validation fold
    anchor: float = 0.0  # weight of the L2 pull toward the start
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    start: str = "frequency"  # the mean distillation starts from (and the anchor pulls toward)

    def __post_init__(self) -> None:
        if self.validation not in VALIDATIONS:
            raise ValueError(f"validation: must be one of {'|'.join(VALIDATIONS)}, got {self.validation!r}")
        if self.start not in STARTS:
            raise ValueError(f"start: must be one of {'|'.join(STARTS)}, got {self.start!r}")
        if self.max_folds < 0 or self.max_folds == 1:
            raise ValueError(f"max_folds: 0 (every source) or at least 2, got {self.max_folds}")
        if self.anchor < 0 or self.weight_decay < 0:
            raise ValueError("anchor and weight_decay must be >= 0")
