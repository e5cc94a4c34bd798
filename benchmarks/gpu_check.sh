#!/usr/bin/env bash
# One pass over everything that needs a GPU: the CUDA tests, one recipe stage in bf16, tokens/s and MFU of
# a 0.5B-parameter LM SFT step, the GPU benchmarks (with mamba-ssm's scan as a peer when it is installed),
# and the resume / recipe tests that then run on CUDA. Each part is time-boxed and logged to LOGS (default:
# ./gpu-logs), so that a short lease still returns whatever finished.
#
#     bash benchmarks/gpu_check.sh [LOGS]
#     bash benchmarks/gpu_check.sh --dry-run [LOGS]   # the same parts on the CPU with tiny sizes (tested)
set -u
dry=0
if [ "${1:-}" = "--dry-run" ]; then
    dry=1
    shift
fi
logs=${1:-gpu-logs}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
py=${PYTHON:-python3}
failed=0

part() {  # part NAME SECONDS COMMAND...: run COMMAND under a time limit, log it, print its exit status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$logs/$name.log" 2>&1
    local status=$?
    echo "$name: exit $status in $((SECONDS - start)) s"
    [ "$status" = 0 ] || failed=1
}

{
    [ "$dry" = 1 ] || nvidia-smi -L
    $py -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
} >"$logs/environment.log" 2>&1
cat "$logs/environment.log"

if [ "$dry" = 1 ]; then
    dev=cpu
    part lm_mfu 120 $py benchmarks/lm_step_mfu.py --dry-run --peak-tflops 1 --json "$logs/lm_mfu.json"
    part recipe_bf16 300 $py -m mmfactory.cli run lm/tiny --output "$logs/run-bf16" train.precision=bf16 \
        train.max_steps=3 stages.sft.options.eval.generate=2 train.log_every=1
    part bench_moe 120 $py benchmarks/moe_block.py --device $dev --repeats 1 --threads 1 --shapes 64x64x128
    part bench_ssm 120 $py benchmarks/ssm_scan.py --device $dev --lengths 16 --batch 2 --d-model 16 --repeats 1 \
        --peer-repeats 1
    part bench_t2i 120 $py benchmarks/t2i_sampling.py --device $dev --grid 4 --batch 2 --prompt 8 --hidden 32 \
        --layers 1 --heads 2 --kv-heads 1 --vocab 256 --codes 32 --repeats 1 --threads 1
    part bench_mac 120 $py benchmarks/mac_masking.py --device $dev --image-size 32 --frames 2 --hidden 64 \
        --layers 1 --text-layers 1 --batch 2 --repeats 1 --threads 1
else
    part tests_gpu 150 $py -m pytest -q -p no:cacheprovider -m gpu tests/gpu -ra
    part lm_mfu 240 $py benchmarks/lm_step_mfu.py --device cuda --json "$logs/lm_mfu.json"
    part recipe_bf16 300 $py -m mmfactory.cli run lm/tiny --output "$logs/run-bf16" train.precision=bf16
    part bench_moe 60 $py benchmarks/moe_block.py --device cuda --repeats 7 \
        --shapes 512x2048x4096 1024x4096x8192 2048x8192x16384
    part bench_ssm 90 $py benchmarks/ssm_scan.py --device cuda --lengths 196 576 2304 --repeats 7 --peer-repeats 3
    part bench_t2i 90 $py benchmarks/t2i_sampling.py --device cuda --hidden 576 --layers 30 --heads 9 \
        --kv-heads 3 --repeats 3
    part bench_mac 60 $py benchmarks/mac_masking.py --device cuda --image-size 224 --repeats 5
    part tests_on_cuda 150 $py -m pytest -q -p no:cacheprovider tests/train/test_resume.py tests/test_recipe_arm.py \
        tests/test_recipe_mars.py -ra
    tail -n 3 "$logs"/tests_*.log
fi
tail -n 1 "$logs/lm_mfu.log"
exit $failed
