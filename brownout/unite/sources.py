"""Text sources for calibration and pricing: plain text, or records of requests (JSON / JSONL).

A source is one file. Plain text is one document; a `.jsonl` file holds one record per
line and a `.json` file a list of records (or an object holding one such list). A record
is rendered as the conversation a server would see: a plain string, a {"text"} field, a
prompt/answer pair (gsm8k's {question, answer}, logged {prompt, output}, AlpacaEval's
{instruction, output}, {prompt, completion}), ShareGPT's {"conversations": [...]},
OpenAI's {"messages": [...]} or MT-Bench's {"turns": [...]}. Conversations go through the
tokenizer's chat template when it has one (so the states seen in calibration are those of
served chat requests), else their turns are joined by blank lines.

Every source splits into a `fit` part and a `tail` (the last `HELD_OUT_FRACTION`: the
last 5% of a plain file cut at a line boundary, the last 5% of records), the same cut as
the demo model's training data (scripts/demo_data.py): calibration takes the fit part,
prices are read on the tail, which neither the model nor the calibration saw.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)

HELD_OUT_FRACTION = 0.05  # the tail of every source is kept out of calibration for pricing
PARTS = ("fit", "tail", "all")
RECORD_SUFFIXES = (".jsonl", ".json")
# (user field, assistant field) pairs of common request logs and datasets, tried in order
PAIR_FIELDS = (("question", "answer"), ("prompt", "output"), ("instruction", "output"),
               ("prompt", "completion"), ("input", "output"), ("prompt", "response"))
TEXT_FIELDS = ("text", "content")  # a record holding only plain text
CHAT_FIELDS = ("messages", "conversations", "turns")
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
                 "bing": "assistant", "model": "assistant"}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class SourceSpec:
    """One calibration source and its share of the calibration tokens (relative weight)."""

    path: Path
    weight: float = 1.0

    @staticmethod
    def parse(text: str) -> "SourceSpec":
        """`FILE` or `FILE:WEIGHT` (a weight suffix only where FILE itself does not exist)."""
        head, sep, tail = text.rpartition(":")
        if sep and not Path(text).exists():
            try:
                weight = float(tail)
            except ValueError:
                weight = None
            if weight is not None:
                if weight <= 0:
                    raise ValueError(f"calibration: weight of {head} must be > 0, got {weight}")
                return SourceSpec(Path(head), weight)
        return SourceSpec(Path(text))


def is_records(path: Path) -> bool:
    return Path(path).suffix.lower() in RECORD_SUFFIXES


def read_records(path: Path) -> list[Any]:
    """Records of a `.jsonl` (one per line) or `.json` (a list, or an object holding one) file."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from None
        return rows
    data = json.loads(text)
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise ValueError(f"{path}: a JSON object must hold exactly one list of records")
        data = lists[0]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return data


def _plain_text(record: Any) -> Optional[str]:
    """The text of a plain-text record ({"text": ...} without chat fields), else None."""
    if not isinstance(record, dict) or any(k in record for k in CHAT_FIELDS) \
            or any(u in record and a in record for u, a in PAIR_FIELDS):
        return None
    return next((record[k] for k in TEXT_FIELDS if isinstance(record.get(k), str)), None)


def record_messages(record: Any) -> list[dict[str, str]]:
    """A request record as chat messages [{"role", "content"}] (see the module docstring)."""
    if isinstance(record, str):
        return [{"role": "user", "content": record}]
    if not isinstance(record, dict):
        raise ValueError(f"record: expected a string or an object, got {type(record).__name__}")
    for key in ("messages", "conversations"):
        turns = record.get(key)
        if isinstance(turns, list) and turns:
            messages = []
            for turn in turns:
                role = str(turn.get("role", turn.get("from", "user")))
                messages.append({"role": _ROLE_ALIASES.get(role, role),
                                 "content": str(turn.get("content", turn.get("value", "")))})
            return messages
    if isinstance(record.get("turns"), list):
        return [{"role": "user", "content": str(t)} for t in record["turns"]]
    for user, assistant in PAIR_FIELDS:
        if isinstance(record.get(user), str) and isinstance(record.get(assistant), str):
            return [{"role": "user", "content": record[user]},
                    {"role": "assistant", "content": record[assistant]}]
    raise ValueError(f"record: no known text fields in {sorted(record)[:8]}")


def render_record(record: Any, tokenizer=None) -> str:
    """A record as the text a server sees: plain text stays plain, a conversation goes
    through the tokenizer's chat template (turns joined by blank lines without one)."""
    text = _plain_text(record)
    if text is not None:
        return text
    messages = record_messages(record)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n\n".join(m["content"] for m in messages) + "\n"


def split_plain(text: str, held_out: float = HELD_OUT_FRACTION) -> tuple[str, str]:
    """(fit, tail): cut at a line boundary so the tail starts on a fresh line (at a space,
    or mid-word, in a text without line breaks before the cut)."""
    at = int(len(text) * (1 - held_out))
    for sep in ("\n", " "):
        cut = text.rfind(sep, 0, at) + 1
        if cut > 0:
            return text[:cut], text[cut:]
    return text[:at], text[at:]


def split_records(rows: Sequence[Any], held_out: float = HELD_OUT_FRACTION) -> tuple[list, list]:
    cut = int(len(rows) * (1 - held_out))
    return list(rows[:cut]), list(rows[cut:])


def source_documents(path: Path, part: str = "all", tokenizer=None,
                     held_out: float = HELD_OUT_FRACTION) -> list[str]:
    """The documents of one source's `part` (fit | tail | all), rendered as text."""
    if part not in PARTS:
        raise ValueError(f"part: must be one of {'|'.join(PARTS)}, got {part!r}")
    path = Path(path)
    if is_records(path):
        rows = read_records(path)
        if part != "all":
            rows = split_records(rows, held_out)[part == "tail"]
        return [render_record(r, tokenizer) for r in rows]
    text = path.read_text(encoding="utf-8", errors="replace")
    if part != "all":
        text = split_plain(text, held_out)[part == "tail"]
    return [text]


def source_text(path: Path, part: str = "all", tokenizer=None,
                held_out: float = HELD_OUT_FRACTION) -> str:
    """One source's part as a single text (documents concatenated, as the demo model saw them)."""
    return "".join(source_documents(path, part, tokenizer, held_out))


def source_record(path: Path, part: str, tokens: int, weight: Optional[float] = None,
                  documents: Optional[int] = None) -> dict:
    """What a manifest says about one source: file, digest, part and tokens taken from it."""
    entry = {"path": str(path), "name": Path(path).name, "sha256": file_sha256(Path(path)),
             "kind": "records" if is_records(Path(path)) else "plain", "part": part,
             "tokens": int(tokens)}
    if weight is not None:
        entry["weight"] = weight
    if documents is not None:
        entry["documents"] = documents
    return entry
