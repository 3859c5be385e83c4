"""Corpus, tokenizer and token streams for the project's demo MoE model.

Reads the plain-text training files of `../shared/data/text/` (never `eval/`), turns the
GSM8K problems into ChatML conversations (so the chat template is exercised), holds out
the last 5% of every source, trains a byte-level BPE tokenizer on the training part and
writes the tokenized streams as uint16 arrays for the GPU training run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOT, IM_START, IM_END]
HELD_OUT_FRACTION = 0.05
PLAIN_SOURCES = ("tinyshakespeare.txt", "us_inaugural_addresses_1789_2021.txt",
                 "us_state_of_the_union_1945_2006.txt")
CHAT_SOURCE = "gsm8k_train.jsonl"

# ChatML: one <|im_start|>role\ncontent<|im_end|>\n block per message
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def chat_text(question: str, answer: str) -> str:
    return f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n{answer}{IM_END}\n"


def split_plain(text: str) -> tuple[str, str]:
    """Cut at a line boundary so the held-out part starts on a fresh line."""
    cut = text.rfind("\n", 0, int(len(text) * (1 - HELD_OUT_FRACTION))) + 1
    return text[:cut], text[cut:]


def load_documents(text_dir: Path) -> dict[str, list[str]]:
    """{"train": [...], "held_out": [...]} documents, one plain file or one chat each."""
    split: dict[str, list[str]] = {"train": [], "held_out": []}
    for name in PLAIN_SOURCES:
        train, held = split_plain((text_dir / name).read_text(encoding="utf-8"))
        split["train"].append(train)
        split["held_out"].append(held)
    rows = [json.loads(line) for line in (text_dir / CHAT_SOURCE).read_text().splitlines() if line]
    cut = int(len(rows) * (1 - HELD_OUT_FRACTION))
    split["train"] += [chat_text(r["question"], r["answer"]) for r in rows[:cut]]
    split["held_out"] += [chat_text(r["question"], r["answer"]) for r in rows[cut:]]
    return split


def train_tokenizer(documents: list[str], vocab_size: int, out_dir: Path) -> None:
    """Byte-level BPE with the chat special tokens, saved for AutoTokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(documents, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=IM_END,
                                  pad_token=EOT, unk_token=None, bos_token=None,
                                  model_max_length=2048, clean_up_tokenization_spaces=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    # a classic config (class name and template inline) loads with transformers 4.x and 5.x
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE)
    cfg.pop("backend", None)
    cfg_path.write_text(json.dumps(cfg, indent=1) + "\n")
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)


def encode_stream(tokenizer_dir: Path, documents: list[str]) -> np.ndarray:
    """All documents, each followed by <|endoftext|>, as one uint16 token stream."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch(documents):
        ids.extend(enc.ids)
        ids.append(eot)
    if tok.get_vocab_size() > np.iinfo(np.uint16).max:
        raise ValueError("vocabulary too large for uint16 token streams")
    return np.asarray(ids, dtype=np.uint16)


def prepare(text_dir: Path, tokenizer_dir: Path, tokens_dir: Path, vocab_size: int) -> dict:
    docs = load_documents(text_dir)
    train_tokenizer(docs["train"], vocab_size, tokenizer_dir)
    tokens_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for part, documents in docs.items():
        stream = encode_stream(tokenizer_dir, documents)
        np.save(tokens_dir / f"{part}.npy", stream)
        sizes[part] = int(stream.size)
    meta = {"sources": list(PLAIN_SOURCES) + [CHAT_SOURCE], "held_out_fraction": HELD_OUT_FRACTION,
            "vocab_size": vocab_size, "tokens": sizes}
    (tokens_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    log.info("tokenized: %s", sizes)
    return meta
