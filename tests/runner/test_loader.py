"""The loader accounts for every piece of a checkpoint: a complete one loads and equals
transformers; a missing, misshapen, unexpected or unreadable tensor is an error naming it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from brownout.config import ModelLoadConfig
from brownout.parallel.info import ParallelInfo
from brownout.parallel.sharding import local_part
from brownout.runner.loader import load_model
from brownout.runner.weights import CheckpointError

FAMILIES = ["qwen2_moe", "mixtral", "qwen3_moe"]
WEIGHTS = "model.safetensors"
VOCAB = 320  # tests/tiny.py's vocabulary
TOLERANCE = 1e-4  # float32 logits, relative to the largest one (as tests/models/test_parity.py)
DEMO = Path(__file__).resolve().parents[2] / "brownout" / "assets" / "demo" / "model"
# the down projection of routed expert 5 of layer 1, as each family's checkpoint names it
EXPERT_DOWN = {"qwen2_moe": "model.layers.1.mlp.experts.5.down_proj.weight",
               "mixtral": "model.layers.1.block_sparse_moe.experts.5.w2.weight",
               "qwen3_moe": "model.layers.1.mlp.experts.5.down_proj.weight"}


def _load(path: Path, parallel: ParallelInfo = None, load_format: str = "auto", fold=None):
    cfg = ModelLoadConfig(model=str(path), device="cpu", dtype="float32", load_format=load_format,
                          fold_shared_expert=fold)
    return load_model(cfg, parallel).model


def _copy_without_weights(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    return dst


def _variant(src: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of checkpoint `src` whose tensors `edit` changed in place."""
    tensors = load_file(str(src / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(_copy_without_weights(src, dst) / WEIGHTS))
    return dst


def _drop(name: str) -> Callable[[dict], None]:
    return lambda tensors: tensors.pop(name)


def _assert_matches_transformers(ours, reference_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(reference_dir), dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits.float()
    got = ours.forward_full(ids)
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_checkpoint_with_index_matches_transformers(tiny_models, family, tmp_path):
    src = tiny_models[family]
    dst = _copy_without_weights(src, tmp_path / "sharded")
    tensors = load_file(str(src / WEIGHTS))
    names = sorted(tensors)
    shards = {"part-1.safetensors": names[::2], "part-2.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(dst / file))
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _assert_matches_transformers(_load(dst), src)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_expert_layout_matches_transformers(tiny_models, family, tmp_path):
    """transformers' in-memory state dict: every expert of a layer in one tensor (and
    Mixtral's MoE block named mlp)."""
    from transformers import AutoModelForCausalLM

    src = tiny_models[family]
    state = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).state_dict()
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    dst = _copy_without_weights(src, tmp_path / "packed")
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst / WEIGHTS))
    _assert_matches_transformers(_load(dst), src)


def test_missing_k_proj_is_named(tiny_models, tmp_path):
    name = "model.layers.1.self_attn.k_proj.weight"
    path = _variant(tiny_models["qwen2_moe"], tmp_path / "ckpt", _drop(name))
    with pytest.raises(CheckpointError, match=re.escape(f"{name} is missing from the checkpoint in {path}")):
        _load(path)


@pytest.mark.parametrize("family", FAMILIES)
def test_missing_expert_is_named(tiny_models, family, tmp_path):
    path = _variant(tiny_models[family], tmp_path / "ckpt", _drop(EXPERT_DOWN[family]))
    with pytest.raises(CheckpointError, match=re.escape(f"{EXPERT_DOWN[family]} is missing")):
        _load(path)


def test_missing_lm_head_of_untied_model_is_named(tiny_models, tmp_path):
    path = _variant(tiny_models["mixtral"], tmp_path / "ckpt", _drop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=re.escape(f"lm_head.weight is missing from the checkpoint in {path}")):
        _load(path)


def test_every_missing_piece_is_counted(tiny_models, tmp_path):
    """Several pieces of one packed parameter: the first is named, the rest counted."""
    names = [f"model.layers.0.self_attn.{p}_proj.weight" for p in ("k", "v")]
    path = _variant(tiny_models["qwen3_moe"], tmp_path / "ckpt", lambda t: [t.pop(n) for n in names])
    with pytest.raises(CheckpointError, match=re.escape(f"{names[0]} is missing from the checkpoint "
                                                        f"in {path} (and 1 more pieces)")):
        _load(path)


def test_tied_model_needs_no_lm_head():
    """The demo model ties its embeddings and ships no lm_head."""
    assert "lm_head.weight" not in load_file(str(DEMO / WEIGHTS))
    model = _load(DEMO)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_wrong_shape_names_tensor_file_and_shapes(tiny_models, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"

    def halve(tensors):
        tensors[name] = tensors[name][:16].contiguous()

    path = _variant(tiny_models["qwen2_moe"], tmp_path / "ckpt", halve)
    with pytest.raises(CheckpointError, match=re.escape(f"{name} in {path / WEIGHTS} has shape (16, 64), "
                                                        f"the model expects (32, 64)")):
        _load(path)


def test_truncated_file_is_named(tiny_models, tmp_path):
    path = _copy_without_weights(tiny_models["mixtral"], tmp_path / "ckpt")
    data = (tiny_models["mixtral"] / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint file {path / WEIGHTS} is not a readable")):
        _load(path)


def test_index_naming_an_absent_file_is_named(tiny_models, tmp_path):
    path = _variant(tiny_models["qwen3_moe"], tmp_path / "ckpt", lambda t: None)
    index = {"weight_map": {"model.norm.weight": WEIGHTS, "lm_head.weight": "other.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(f"{path / 'other.safetensors'}, named in")):
        _load(path)


def test_only_safetensors_are_read(tiny_models, tmp_path):
    path = _copy_without_weights(tiny_models["qwen2_moe"], tmp_path / "ckpt")
    (path / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(CheckpointError, match="only safetensors are read"):
        _load(path)


@pytest.mark.parametrize("extra", [
    "model.layers.0.mlp.experts.8.down_proj.weight",  # a ninth expert of an 8-expert config
    "model.layers.2.input_layernorm.weight",  # a third layer of a 2-layer config
    "model.layers.0.self_attn.q_proj.bias",  # a bias the config does not have (Qwen3: none)
])
def test_tensor_without_a_place_is_an_error(tiny_models, tmp_path, extra):
    def add(tensors):
        tensors[extra] = torch.zeros(4)

    path = _variant(tiny_models["qwen3_moe"], tmp_path / "ckpt", add)
    with pytest.raises(CheckpointError, match=re.escape(f"{extra} in {path / WEIGHTS} has no place in the model")):
        _load(path)


def test_rotary_table_in_checkpoint_is_skipped(tiny_models, tmp_path):
    def add(tensors):
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    src = tiny_models["qwen2_moe"]
    _assert_matches_transformers(_load(_variant(src, tmp_path / "ckpt", add)), src)


def test_expert_parallel_rank_needs_only_its_experts(tiny_models, tmp_path):
    """Experts 0-3 live on rank 0, 4-7 on rank 1: a checkpoint without expert 5 only fails rank 1."""
    name = EXPERT_DOWN["qwen2_moe"]
    path = _variant(tiny_models["qwen2_moe"], tmp_path / "ckpt", _drop(name))
    _load(path, ParallelInfo(rank=0, world_size=2, expert_parallel=True))
    with pytest.raises(CheckpointError, match=re.escape(f"{name} is missing")):
        _load(path, ParallelInfo(rank=1, world_size=2, expert_parallel=True))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ep", [False, True], ids=["tp", "ep"])
@pytest.mark.parametrize("load_format", ["auto", "dummy"])
def test_each_rank_holds_its_part_of_the_one_process_model(tiny_models, family, ep, load_format):
    # ranks keep the separate shared expert (folding is one-process only): compare with that layout
    whole = _load(tiny_models[family], load_format=load_format, fold=False)
    full = dict(whole.named_parameters())
    for rank in range(2):
        parallel = ParallelInfo(rank=rank, world_size=2, expert_parallel=ep)
        part = _load(tiny_models[family], parallel, load_format)
        for name, p in part.named_parameters():
            want = local_part(name, full[name], whole.spec, parallel)
            if name.endswith((".w13", ".w2")):  # routed experts; united slots are filled later
                n = part.moe_layers()[0].num_local_experts
                p, want = p[:n], want[:n]
            torch.testing.assert_close(p, want, rtol=0, atol=0, msg=f"{family} rank {rank} {name}")


@pytest.fixture(scope="module")
def with_dense_layer(tiny_models, tmp_path_factory):
    """The tiny Qwen2-MoE with a dense MLP in layer 1 (`mlp_only_layers`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(tiny_models["qwen2_moe"]))
    cfg.mlp_only_layers = [1]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # as tests/tiny.py: weights large enough that routing differs per token
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.08)
    path = tmp_path_factory.mktemp("dense")
    model.save_pretrained(str(path))
    return path


def test_dense_layer_matches_transformers(with_dense_layer):
    assert "model.layers.1.mlp.gate_proj.weight" in load_file(str(with_dense_layer / WEIGHTS))
    _assert_matches_transformers(_load(with_dense_layer), with_dense_layer)


def test_missing_dense_up_proj_is_named(with_dense_layer, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    path = _variant(with_dense_layer, tmp_path / "ckpt", _drop(name))
    with pytest.raises(CheckpointError, match=re.escape(f"{name} is missing")):
        _load(path)
