"""Exact generation: greedy equals transformers; batching, chunking and preemption change nothing."""

import pytest
import torch

from brownout.config import CacheConfig, SchedulerConfig
from brownout.engine.llm import LLM
from brownout.types import FinishReason, SamplingParams, ValidationError

GREEDY32 = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "qwen3_moe"])
def test_greedy_equals_transformers(tiny_models, family):
    from transformers import AutoModelForCausalLM

    path = tiny_models[family]
    llm = LLM(str(path), device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    prompts = _prompts(2, seed=3)
    outs = llm.generate(prompts, GREEDY32)
    for prompt, out in zip(prompts, outs):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == ref
        assert len(out.token_ids) == 32


def _alone(llm, prompts):
    return [llm.generate([p], GREEDY32)[0].token_ids for p in prompts]


def test_batching_chunking_preemption_do_not_change_results(tiny_models):
    path = str(tiny_models["qwen2_moe"])
    prompts = _prompts(6, seed=7)
    expected = _alone(LLM(path, device="cpu"), prompts)
    # small step budget (chunked prefill) and a cache too small for all at once (preemption)
    llm = LLM(path, device="cpu", cache=CacheConfig(block_size=4, num_blocks=40),
              scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4))
    eng = llm.engine
    done, pending = {}, list(enumerate(prompts))
    steps = 0
    while pending or eng.has_unfinished_requests():
        if pending and steps % 3 == 0:  # requests arrive at different steps
            i, p = pending.pop(0)
            eng.add_request(f"r{i}", p, GREEDY32)
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.output_token_ids
        steps += 1
    assert eng.scheduler.num_preemptions > 0
    assert [done[f"r{i}"] for i in range(len(prompts))] == expected
    assert eng.blocks.num_used == 0


def test_seeded_sampling_is_reproducible(tiny_models):
    llm = LLM(str(tiny_models["mixtral"]), device="cpu")
    p = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=123, ignore_eos=True)
    a = llm.generate([[5, 6, 7]], p)[0].token_ids
    b = llm.generate([[5, 6, 7], [9, 10]], p)[0].token_ids
    assert a == b


def test_stop_strings_and_stop_tokens(tiny_models):
    llm = LLM(str(tiny_models["qwen2_moe"]), device="cpu")
    base = llm.generate("The quick brown fox", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    assert base.finish_reason == FinishReason.LENGTH
    stop_tok = base.token_ids[3]
    out = llm.generate("The quick brown fox", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                            stop_token_ids=[stop_tok]))[0]
    assert out.finish_reason == FinishReason.STOP and out.token_ids[-1] == stop_tok
    assert out.token_ids == base.token_ids[:base.token_ids.index(stop_tok) + 1]
    text = base.text
    snippet = next((text[i:i + 2] for i in range(2, len(text) - 2) if text[i:i + 2].strip()), None)
    if snippet:
        out = llm.generate("The quick brown fox", SamplingParams(max_tokens=20, temperature=0,
                                                                ignore_eos=True, stop=[snippet]))[0]
        assert out.finish_reason == FinishReason.STOP
        assert snippet not in out.text and text.startswith(out.text)


def test_prompt_logprobs_match_full_forward(tiny_models):
    llm = LLM(str(tiny_models["qwen3_moe"]), device="cpu",
              scheduler=SchedulerConfig(max_num_batched_tokens=8))  # chunked: 3 chunks
    prompt = list(range(10, 30))
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    logits = llm.engine.runner.model.forward_full(torch.tensor([prompt]))[0]
    ref = torch.log_softmax(logits, -1)[torch.arange(19), torch.tensor(prompt[1:])]
    got = torch.tensor([lp.logprob for lp in out.prompt_logprobs[1:]])
    assert out.prompt_logprobs[0] is None and len(got) == 19
    assert torch.allclose(got, ref, atol=1e-4)


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"), (dict(top_k=0), "top_k"), (dict(max_tokens=1.5), "max_tokens"),
])
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValidationError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field


def test_bad_prompts(tiny_models):
    llm = LLM(str(tiny_models["qwen2_moe"]), device="cpu", max_model_len=64)
    with pytest.raises(ValidationError, match="prompt: must not be empty"):
        llm.generate([[]])
    with pytest.raises(ValidationError) as e:
        llm.generate([list(range(3, 80))])
    assert e.value.field == "prompt" and "at most 63" in str(e.value)
    assert not llm.engine.has_unfinished_requests()


def test_one_sampling_params_per_prompt(tiny_models):
    llm = LLM(str(tiny_models["qwen2_moe"]), device="cpu")
    outs = llm.generate([[5, 6, 7], [9, 10]], [SamplingParams(max_tokens=3, ignore_eos=True),
                                              SamplingParams(max_tokens=5, ignore_eos=True)])
    assert [len(o.token_ids) for o in outs] == [3, 5]
    with pytest.raises(ValidationError, match="params"):
        llm.generate([[5, 6, 7], [9, 10]], [SamplingParams()])
