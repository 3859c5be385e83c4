"""lm-eval's `local-completions` model against a real server, as the recipe in docs/evaluating.md runs it:
a tiny local multiple-choice task and a rolling log-likelihood task, with the server's own
tokenizer (/tokenize, /detokenize, /tokenizer_info: `tokenizer_backend=remote`) and with the
model directory's (`tokenizer_backend=huggingface`), which must agree. Skipped when lm-eval
is not installed (it is not part of the default install).
"""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import start_server

lm_eval = pytest.importorskip("lm_eval")
for _extra in ("aiohttp", "tenacity", "requests"):  # lm-eval[api], which local-completions needs
    pytest.importorskip(_extra)
from lm_eval.tasks import TaskManager  # noqa: E402  (only once lm_eval is known to be there)

pytestmark = pytest.mark.slow

QUESTIONS = [
    {"question": "The sky on a clear day is", "choices": [" blue", " green", " loud"], "answer": 0},
    {"question": "Once upon a time there was a", "choices": [" king", " of", " the"], "answer": 0},
    {"question": "Crème brûlée is a", "choices": [" dessert", " planet"], "answer": 0},
]
TEXTS = [{"text": "The quick brown fox jumps over the lazy dog. Naïve café — 日本語 text too."},
         {"text": "Once upon a time, in a land far away, there lived a king who loved stories."}]


def _task(name: str, data, extra: str, task_dir) -> None:
    path = task_dir / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in data))
    (task_dir / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\n"
        f"test_split: test\n{extra}")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> TaskManager:
    task_dir = tmp_path_factory.mktemp("lm_eval_tasks")
    _task("brownout_tiny_choice", QUESTIONS,
          "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
          "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n", task_dir)
    _task("brownout_tiny_rolling", TEXTS,
          "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
          "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n", task_dir)
    return TaskManager(include_path=str(task_dir))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = start_server(model_dir, ["--served-model-name", "demo"], tmp_path_factory)
    yield srv
    srv.stop()


def _evaluate(server, tasks: TaskManager, tokenizer_args: str) -> dict:
    max_len = httpx.get(server.url + "/v1/models/demo", timeout=30).json()["max_model_len"]
    args = (f"model=demo,base_url={server.url}/v1/completions,{tokenizer_args},"
            f"num_concurrent=1,max_retries=1,max_length={max_len}")
    out = lm_eval.simple_evaluate(model="local-completions", model_args=args,
                                  tasks=["brownout_tiny_choice", "brownout_tiny_rolling"],
                                  task_manager=tasks)
    return out["results"]


def test_local_completions_with_the_servers_tokenizer(server, tasks, model_dir):
    remote = _evaluate(server, tasks, "tokenizer_backend=remote")
    local = _evaluate(server, tasks, f"tokenizer_backend=huggingface,tokenizer={model_dir}")
    choice, rolling = remote["brownout_tiny_choice"], remote["brownout_tiny_rolling"]
    assert 0.0 <= choice["acc,none"] <= 1.0
    assert rolling["bits_per_byte,none"] > 0
    for task in ("brownout_tiny_choice", "brownout_tiny_rolling"):
        for metric, value in remote[task].items():
            if isinstance(value, float):
                assert value == pytest.approx(local[task][metric], rel=1e-6), (task, metric)
