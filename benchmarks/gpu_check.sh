#!/usr/bin/env bash
# One pass over everything that needs a GPU: the CUDA tests, the GPU benchmarks, and the resume / recipe
# tests that then run on CUDA. Each part is time-boxed and logged to LOGS (default: ./gpu-logs), so that a
# short lease still returns whatever finished.
#
#     bash benchmarks/gpu_check.sh [LOGS]
set -u
logs=${1:-gpu-logs}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
py=${PYTHON:-python3}

part() {  # part NAME SECONDS COMMAND...: run COMMAND under a time limit, log it, print its exit status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$logs/$name.log" 2>&1
    echo "$name: exit $? in $((SECONDS - start)) s"
}

{
    nvidia-smi -L
    $py -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
} >"$logs/environment.log" 2>&1
cat "$logs/environment.log"

part tests_gpu 150 $py -m pytest -q -p no:cacheprovider -m gpu tests/gpu -ra
part bench_moe 60 $py benchmarks/moe_block.py --device cuda --repeats 7 \
    --shapes 512x2048x4096 1024x4096x8192 2048x8192x16384
part bench_ssm 90 $py benchmarks/ssm_scan.py --device cuda --lengths 196 576 2304 --repeats 7 --peer-repeats 3
part bench_t2i 90 $py benchmarks/t2i_sampling.py --device cuda --hidden 576 --layers 30 --heads 9 \
    --kv-heads 3 --repeats 3
part bench_mac 60 $py benchmarks/mac_masking.py --device cuda --image-size 224 --repeats 5
part tests_on_cuda 150 $py -m pytest -q -p no:cacheprovider tests/train/test_resume.py tests/test_recipe_arm.py \
    tests/test_recipe_mars.py -ra
tail -n 3 "$logs"/tests_*.log
