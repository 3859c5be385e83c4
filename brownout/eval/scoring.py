"""Shared pieces of the fixed-tau evaluations: loading a model (with united experts) and
running one batch as one serving step, so brownout counts cover the whole batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from brownout.config import ModelLoadConfig
from brownout.models.context import ForwardContext
from brownout.runner.loader import load_model
from brownout.unite.store import load_united, read_manifest

log = logging.getLogger(__name__)


@dataclass
class EvalModel:
    loaded: object  # runner.loader.LoadedModel
    tokenizer: object
    united: Optional[dict]  # manifest of the installed united experts, None without

    @property
    def model(self):
        return self.loaded.model

    @property
    def device(self) -> torch.device:
        return self.loaded.device


def load_eval_model(model_dir: str, united_dir: Optional[str] = None, device: str = "auto",
                    dtype: str = "float32") -> EvalModel:
    from transformers import AutoTokenizer

    extra = None
    if united_dir is not None:
        extra = read_manifest(Path(united_dir))["num_groups"]  # room for exactly these slots
    loaded = load_model(ModelLoadConfig(model=model_dir, device=device, dtype=dtype,
                                        extra_expert_slots=extra))
    united = load_united(loaded, Path(united_dir)) if united_dir is not None else None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return EvalModel(loaded, tokenizer, united)


def check_taus(taus: Sequence[float], has_united: bool) -> None:
    for tau in taus:
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau: each value must be in [0, 1], got {tau}")
    if not has_united and any(tau < 1.0 for tau in taus):
        raise ValueError("tau < 1 needs united experts (--united DIR)")


@torch.inference_mode()
def run_step(model, input_ids: torch.Tensor, tau: Optional[float],
             valid: Optional[torch.Tensor] = None,
             top_k: Optional[int] = None) -> tuple[torch.Tensor, list[int]]:
    """One batch [B, L] as one step -> (logits [B, L, V] float32, slots touched per MoE layer).

    `valid` [B, L] marks real tokens; padding is not counted by brownout and touches no expert.
    tau None or 1 runs the exact model. `top_k` sheds each token's routed experts to k'
    (None: the model's k).
    """
    B, L = input_ids.shape
    device = input_ids.device
    positions = torch.arange(L, device=device).expand(B, L)
    ctx = ForwardContext(
        tau=None if tau is None else torch.tensor(float(tau), dtype=torch.float32, device=device),
        valid=None if valid is None else valid.reshape(-1).to(device),
        top_k=None if top_k is None else torch.tensor(int(top_k), dtype=torch.int32, device=device))
    out = model(input_ids, positions, ctx)
    logits = model.compute_logits(out.hidden)  # [B, L, V]
    return logits, [] if out.experts_touched is None else out.experts_touched.tolist()
