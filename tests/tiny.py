"""Tiny random checkpoints of each supported family, built with transformers' own classes."""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = ("The quick brown fox jumps over the lazy dog. A serving engine batches requests; "
          "experts route tokens; the brownout dims accuracy only while a burst lasts. ") * 20

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_tokenizer(path: Path, vocab_size: int = 320) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([CORPUS], vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(path))


def make_tiny_checkpoint(family: str, path: Path, seed: int = 0, vocab_size: int = 320,
                         num_layers: int = 2) -> Path:
    from transformers import (MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig,
                              Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  eos_token_id=2, bos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    if family == "qwen2_moe":
        cfg = Qwen2MoeConfig(**common, intermediate_size=96, moe_intermediate_size=32,
                             shared_expert_intermediate_size=64, num_experts=8,
                             num_experts_per_tok=2, norm_topk_prob=False)
        cls = Qwen2MoeForCausalLM
    elif family == "mixtral":
        cfg = MixtralConfig(**common, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)
        cls = MixtralForCausalLM
    elif family == "qwen3_moe":
        cfg = Qwen3MoeConfig(**common, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                             num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
        cls = Qwen3MoeForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    with torch.no_grad():  # larger weights than the default init: routing differs per token
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.08)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    save_tokenizer(path, vocab_size)
    return path
