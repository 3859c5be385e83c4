#!/usr/bin/env bash
# Driver for one call on the GPU machine: install carried wheels, run the named parts with
# time limits, compact their raw output (benchmarks/compact_raw.py) and pack it into
# $OUT/<tag>.tgz, since the machine returns at most a few files.
#   bash benchmarks/device_run.sh TAG PART[,PART...] [extra headline flags]
# Parts: tests (GPU tests of the engine and kernels), engine (bench_engine stages in
# $ENGINE_STAGES, more flags in $ENGINE_EXTRA, an older package tree in $ENGINE_TREE), kernels (fused MoE tile sweep at $KERNEL_TOKENS; KERNEL_EXTRA=--crowded
# for the tau = 0 case), install (that table into brownout/kernels/configs for the later
# parts), attention (the decode attention tile sweep, installed for the later parts), topk (the fused router top-k vs the torch ops), skinny (the decode-size linear
# kernel vs cuBLAS; BROWNOUT_SKINNY_GEMM=0 with the engine part times the step without it), align (the small and sorted aligns vs
# the atomics one; BROWNOUT_SMALL_ALIGN=0 / BROWNOUT_SORT_ALIGN=0 with the engine part time the step without them; BROWNOUT_PDL=0
# without programmatic dependent launch), headline (benchmarks/headline.py),
# sweep (headline rate sweep, needs $CALIBRATION). Wheels in .whl/ (fastapi, uvicorn, pydantic...) for the server; the trace in
# .gpu_data/ (a copy of ../shared/data/traces, never committed).
# The tarball is transport only, never committed. Back on the development machine, each part's
# folder in it goes to its experiment's raw folder, e.g. for a headline run:
#   python benchmarks/compact_raw.py TAG.tgz benchmarks/results/headline/raw/headline_<gpu>_runN --part hl
#   python benchmarks/headline_steps.py benchmarks/results/headline/raw/headline_<gpu>_runN \
#     --out benchmarks/results/headline/headline_<gpu>_runN_steps.json
# then the summary (hl/headline.json) becomes headline/headline_<gpu>_runN.json and
# `python benchmarks/make_tables.py` renders its table (benchmarks/results/README.md).
set -uo pipefail
tag=$1; parts=$2; shift 2
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
work=/tmp/run-$tag; mkdir -p "$work"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv > "$work/gpu.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> "$work/gpu.txt"
pack() {  # the compact form when compaction works, everything otherwise
  if python3 benchmarks/compact_raw.py "$work" "$work.compact"; then
    tar czf "$OUT/$tag.tgz" -C "$work.compact" .
  else
    tar czf "$OUT/$tag.tgz" -C "$work" .
  fi
}
trap pack EXIT
for part in ${parts//,/ }; do
  echo "=== $part $(date +%T)"
  case $part in
    tests)
      # $TESTS: a subset instead of the whole list (pytest node ids, space-separated)
      timeout ${TESTS_S:-240} python3 -m pytest -q -p no:cacheprovider --maxfail=5 ${TESTS:-tests/engine/test_gpu.py \
        tests/kernels/test_step_graphs.py tests/kernels/test_paged_attention.py \
        tests/kernels/test_routing_triton.py tests/kernels/test_skinny_gemm.py tests/kernels/test_norm_rope.py \
        tests/kernels/test_fused_moe.py::test_align_groups_every_assignment_once \
        tests/kernels/test_fused_moe.py::test_fused_moe_with_the_small_align_matches_the_reference \
        tests/kernels/test_fused_moe.py::test_fused_moe_with_the_sorted_align_matches_the_reference \
        tests/kernels/test_fused_moe.py::test_align_dispatch_at_the_boundaries \
        tests/kernels/test_fused_moe.py::test_the_down_gemm_runs_two_launches_after_the_align \
        tests/kernels/test_fused_moe.py::test_fixed_shared_slots_give_the_aligned_output_bit_for_bit \
        tests/kernels/test_fused_moe.py::test_align_skips_ids_past_its_slots \
        tests/kernels/test_pdl.py} \
        2>&1 | tail -30 | tee "$work/tests.txt" ;;
    engine)  # ENGINE_TREE: a folder holding an older `brownout` package to time instead
      pp=$PYTHONPATH; [ -n "${ENGINE_TREE:-}" ] && pp=$PWD/$ENGINE_TREE:$PYTHONPATH
      PYTHONPATH=$pp timeout ${ENGINE_S:-300} python3 benchmarks/bench_engine.py --out "$work/engine" \
        --stages "${ENGINE_STAGES:-prefill,profile}" ${ENGINE_EXTRA:-} 2>&1 | tee "$work/engine.log" | tail -40 ;;
    kernels)
      timeout ${KERNELS_S:-300} python3 benchmarks/bench_kernels.py --out "$work/kernels" --skip-attention \
        --tokens "${KERNEL_TOKENS:-1,16,64,128,256,512,1024,2048}" --budget-s ${KERNEL_BUDGET_S:-200} \
        ${KERNEL_EXTRA:-} 2>&1 \
        | tee "$work/kernels.log" | tail -25 ;;
    align)  # the fused MoE's register-only align against the atomics kernel, inside CUDA graphs
      timeout ${ALIGN_S:-120} python3 benchmarks/bench_align.py --out "$work/align" 2>&1 \
        | tee "$work/align.log" | tail -20 ;;
    skinny)  # the decode-size linear kernel against cuBLAS, and its tile sweep
      timeout ${SKINNY_S:-240} python3 benchmarks/bench_skinny.py --out "$work/skinny" 2>&1 \
        | tee "$work/skinny.log" | tail -30 ;;
    attention)  # the decode attention tile sweep; its table goes into brownout/kernels/configs
      timeout ${ATTN_S:-300} python3 benchmarks/bench_attention.py --out "$work/attention" \
        --budget-s ${ATTN_BUDGET_S:-180} 2>&1 | tee "$work/attention.log" | tail -12
      cp -v "$work"/attention/attention_NVIDIA*.json brownout/kernels/configs/ ;;
    topk)  # the one-launch router top-k against the torch ops, inside CUDA graphs
      timeout ${TOPK_S:-120} python3 benchmarks/bench_routing_topk.py --out "$work/topk" 2>&1 \
        | tee "$work/topk.log" | tail -20 ;;
    install)  # the table the kernels part just wrote, for the parts after it in this call
      for f in "$work"/kernels/*.json; do
        [ "$(basename "$f")" = kernels_raw.json ] || cp -v "$f" brownout/kernels/configs/
      done ;;
    headline)
      timeout ${HEADLINE_S:-540} python3 benchmarks/headline.py --out "$work/hl" \
        --trace .gpu_data/azure_llm_2023_conv.csv "$@" 2>&1 | grep -v "HTTP/1.1" > "$work/headline.log"
      tail -5 "$work/headline.log" ;;
    sweep)
      timeout ${SWEEP_S:-540} python3 benchmarks/headline.py --out "$work/sweep" --sweep-only \
        --calibration "${CALIBRATION}" --trace .gpu_data/azure_llm_2023_conv.csv "$@" 2>&1 \
        | grep -v "HTTP/1.1" > "$work/sweep.log"
      tail -5 "$work/sweep.log" ;;
  esac
done
