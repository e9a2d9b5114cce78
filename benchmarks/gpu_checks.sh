#!/usr/bin/env bash
# The GPU checks, as one script for a lent device machine (it has torch, lightning,
# transformers and accelerate; mnist1d travels as a wheel in .whl/):
#
#   bash benchmarks/gpu_checks.sh OUTDIR [PART ...]
#
# PARTs: tests probe amp engine oom plan (default: all).
# Each part has its own time limit, so one slow part cannot eat the others. Results are
# copied by hand into benchmarks/results/gpu_*.md with the device named.
set -u
out=${1:-/tmp/gpu_checks}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MPLBACKEND=Agg
# batchlab runs from src/ without an install; importlib.metadata still wants its version
mkdir -p /tmp/site/batchlab-0.0.0.dist-info
printf 'Metadata-Version: 2.1\nName: batchlab\nVersion: %s\n' "$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)" \
    >/tmp/site/batchlab-0.0.0.dist-info/METADATA
export PYTHONPATH=$PYTHONPATH:/tmp/site
bl="python3 -m batchlab"
parts=${*:2}
parts=${parts:-tests probe amp engine oom plan}
want() { [[ " $parts " == *" $1 "* ]]; }
part() { echo; echo "=== $1 ($(date +%T))"; }

part device
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

want tests && {
part "gpu tests"
timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_train.py \
    tests/test_memory.py tests/test_noise.py tests/test_sharpness.py 2>&1 | tail -15
}

want probe && {
part "probe (throughput ladder) on cuda"
for t in mnist1d-cnn charlm; do
    timeout 60 $bl probe "$t" --device cuda --json "$out/probe_$t.json" --out "/tmp/plots_$t" 2>&1 | tail -40
done
}

want amp && {
part "train with amp on cuda"
timeout 40 $bl train charlm --device cuda --amp --max-steps 300 --json "$out/train_amp.json" 2>&1 | tail -12
}

want engine && {
part "engine overhead on cuda"
timeout 70 python3 benchmarks/engine_overhead.py --device cuda --steps 100 --windows 3 2>&1 | tail -12
}

want oom && {
part "real OOM: batchlab vs Lightning vs Accelerate"
timeout 200 python3 benchmarks/probe_cuda.py 2>&1 | tail -40
}
want oom-before && [ -f .before/step_memory.py ] && {
part "real OOM, before: measure/step_memory.py from .before/ (allocated peak only)"
rm -rf /tmp/before && cp -r src /tmp/before && cp .before/step_memory.py /tmp/before/batchlab/measure/
PYTHONPATH=/tmp/before:$PYTHONPATH timeout 120 python3 benchmarks/probe_cuda.py --tasks charlm:1GiB 2>&1 | tail -20
}

want plan && {
part "plan on cuda"
timeout 100 $bl plan mnist1d-cnn --device cuda --json "$out/plan_cnn.json" --out /tmp/plots_plan 2>&1 | tail -45
}
part done
