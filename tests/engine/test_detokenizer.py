"""Incremental detokenisation: the native stream and the Python window emit the same text,
and it is the tokenizer's own decode of the whole output."""

import random

import pytest

from brownout.defaults import default_model_dir
from brownout.engine.detokenizer import IncrementalDetokenizer
from brownout.engine.request import Request
from brownout.types import SamplingParams


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir()))


def _emit(tok, prompt, out, stop, native: bool) -> str:
    d = IncrementalDetokenizer(tok, prompt, stop, include_stop=False)
    if not native:
        d.stream = None
    text = ""
    for i, t in enumerate(out):
        d.add(t)
        cut = d.find_stop()
        text += d.flush(cut is not None or i == len(out) - 1, cut)
        if cut is not None:
            break
    return text


def test_native_stream_equals_python_window_on_random_ids(tokenizer):
    rng = random.Random(0)
    used = 0
    for trial in range(400):
        prompt = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 20))]
        out = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 40))]
        stop = [tokenizer.decode(out[5:7])] if trial % 2 and len(out) > 7 else []
        used += IncrementalDetokenizer(tokenizer, prompt, stop, False).stream is not None
        assert _emit(tokenizer, prompt, out, stop, True) == _emit(tokenizer, prompt, out, stop, False)
    assert used > 300  # the native path is the one that runs


def test_stream_of_real_text_is_its_decode(tokenizer):
    text = "Once upon a time, the brown fox (naive cafe, 12,345 dogs) ran.\nThe end? Yes: the end."
    ids = tokenizer.encode(text, add_special_tokens=False)
    for split in range(1, len(ids)):
        want = tokenizer.decode(ids, skip_special_tokens=True)[len(tokenizer.decode(ids[:split])):]
        assert _emit(tokenizer, ids[:split], ids[split:], [], True) == want


def test_token_slice_equals_all_token_ids_slice():
    req = Request("r", list(range(10)), SamplingParams(), 0.0)
    req.output_token_ids.extend(range(100, 106))
    for start in range(17):
        for n in range(8):
            assert req.token_slice(start, n) == req.all_token_ids[start:start + n]
