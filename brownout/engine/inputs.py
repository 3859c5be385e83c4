"""Prompts into token ids: encode text, apply the chat template, check the ids against the
model (not empty, within its context, within its vocabulary); the tokenizer and EOS ids."""

from __future__ import annotations

import logging
from typing import Optional, Union

from brownout.config import EngineConfig
from brownout.types import ValidationError

log = logging.getLogger(__name__)


class PromptProcessor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def encode(self, prompt: Union[str, list[int]]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValidationError("prompt", "this model has no tokenizer: send token ids")
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValidationError("prompt", "must be a string or a list of integer token ids")
        return list(prompt)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise ValidationError("messages", "must be a non-empty list of {role, content}")
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValidationError("messages", "this model has no chat template")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
        except Exception as exc:  # jinja errors on odd messages: the client's fault
            raise ValidationError("messages", f"cannot apply the chat template: {exc}") from exc
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt_ids(self, prompt: Union[str, list[int]]) -> list[int]:
        """The prompt's token ids, checked: at least one, room for one generated token."""
        ids = self.encode(prompt)
        if not ids:
            raise ValidationError("prompt", "must not be empty")
        if len(ids) >= self.max_model_len:
            raise ValidationError("prompt", f"has {len(ids)} tokens; the model's context allows "
                                            f"at most {self.max_model_len - 1} prompt tokens")
        if max(ids) >= self.vocab_size or min(ids) < 0:
            raise ValidationError("prompt", f"token ids must be in [0, {self.vocab_size - 1}]")
        return ids


def load_tokenizer(config: EngineConfig, loaded):
    """The checkpoint's (or `--tokenizer`'s) tokenizer; None when there is none."""
    # a heavy import (it loads torch), made only when an engine is built
    from transformers import AutoTokenizer

    source = config.load.tokenizer or (str(loaded.model_dir) if loaded.model_dir else None)
    if source is None:
        return None
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        log.warning("no tokenizer at %s (%s): prompts must be token ids", source, exc)
        return None


def eos_ids(loaded, tokenizer: Optional[object]) -> set[int]:
    """End-of-sequence ids of the model's config and of its tokenizer."""
    ids = getattr(loaded.hf_config, "eos_token_id", None)
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
