#!/usr/bin/env bash
# The GPU verification kit, run on the GPU machine (H200, CUDA 13 driver, torch, no package index) by every device call
# that `python3 benchmarks/gpu_kit.py prepare` prints: the same command each time, another part of the kit carried.
# Each call unpacks what has arrived into $SITE (on PYTHONPATH). The first also installs llava-rt (editable, as for
# development) and starts building the benchmark's checkpoint and bundle in the background (CPU work, done while the
# other parts travel). The call that completes the kit checks that onnxruntime runs on the GPU, then runs
#   1. the tests marked gpu (CUDA greedy tokens against the CPU's, fp16 drift, on the tiny checkpoints), and
#   2. llava-bench --device cuda: transformers fp16 (SDPA, inference_mode) against llava-rt fp32 and fp16,
# each once per machine, within LIMIT seconds; logs and results go to $OUT. Called again on the same machine (nothing
# carried), it goes on with what is left.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=/tmp/site WORK=/tmp/llava-rt-gpu LIMIT=540 BENCH_SECONDS=230
BENCH=(--preset llava-onevision-qwen2-0.5b-ov --precision fp32,fp16 --workdir "$WORK/bench")
: "${OUT:?the device machine sets OUT}"
mkdir -p "$WORK"
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1
# onnxruntime-gpu loads CUDA 13 and cuDNN from the image's nvidia-* packages (torch's)
LD_LIBRARY_PATH=$(python3 -c 'import glob, nvidia; print(*(d for p in nvidia.__path__ for d in glob.glob(p + "/*/lib")), sep=":")')
export LD_LIBRARY_PATH

status=0
python3 benchmarks/gpu_kit.py receive "$SITE" || status=$?
((status == 0 || status == 3)) || exit "$status"
if [[ ! -f $WORK/installed ]]; then # the kit's setuptools builds it (the image's may predate pyproject's license field)
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
  touch "$WORK/installed"
  setsid -f bash -c "python3 -m llava_rt.benchmarks.cli ${BENCH[*]} --build-only >$WORK/build.log 2>&1; echo \$? >$WORK/build.rc" \
    </dev/null >/dev/null 2>&1
  echo "gpu_check: llava-rt installed; building the benchmark's checkpoint and bundle in the background"
fi
((status == 0)) || exit 0

failed=()
step() { # step NAME SECONDS COMMAND...: run once per machine, output to $OUT/NAME.log and $WORK/NAME.log
  local name=$1 seconds=$2
  shift 2
  [[ -f $WORK/$name.done ]] && { cp "$WORK/$name.log" "$OUT/"; return; }
  echo "== $name (at most ${seconds}s)"
  timeout "$seconds" "$@" 2>&1 | tee "$WORK/$name.log" || failed+=("$name")
  touch "$WORK/$name.done"
  cp "$WORK/$name.log" "$OUT/"
}

# onnxruntime on the GPU before torch is imported (torch would load the CUDA libraries the torch-free runtime needs)
step environment 120 python3 - <<'EOF'
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

tensors = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [4]) for name in "xy"]
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "smoke", tensors[:1], tensors[1:])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
assert session.get_providers()[0] == "CUDAExecutionProvider", f"onnxruntime did not start CUDA: {session.get_providers()}"
assert session.run(None, {"x": np.array([-1, 2, -3, 4], np.float32)})[0].tolist() == [0, 2, 0, 4]
print(f"onnxruntime {ort.__version__} ({ort.__file__}) runs on {session.get_providers()[0]}")
import cupy, torch, transformers

print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}, transformers {transformers.__version__}, cupy {cupy.__version__}")
EOF
[[ ${#failed[@]} -eq 0 ]] || { rm "$WORK/environment.done"; exit 1; }
# only the files holding gpu tests: others may import what the machine lacks (PyAV)
mapfile -t gpu_tests < <(grep -l 'mark\.gpu' tests/test_*.py)
step pytest-gpu $((LIMIT - BENCH_SECONDS - SECONDS)) python3 -m pytest -m gpu -rP -p no:cacheprovider "${gpu_tests[@]}"

echo "== waiting for the benchmark's bundle (build.log)"
while [[ ! -f $WORK/build.rc ]] && ((SECONDS < LIMIT - BENCH_SECONDS)); do sleep 5; done
cp "$WORK/build.log" "$OUT/" 2>/dev/null || true
if [[ ! -f $WORK/build.rc ]]; then
  echo "gpu_check: the bundle is still being built; call again with the same command and no carry to run the benchmark"
  failed+=(build-unfinished)
elif [[ $(cat "$WORK/build.rc") != 0 ]]; then
  failed+=(build)
else
  step bench $((LIMIT - SECONDS)) python3 -m llava_rt.benchmarks.cli "${BENCH[@]}" --device cuda \
    --json "$WORK/bench.json" --chart "$WORK/bench.png"
  cp "$WORK"/bench.json "$WORK"/bench.png "$OUT/" 2>/dev/null || true
fi
grep -h -E "^(cuda fp32|fp16 drift)" "$OUT/pytest-gpu.log" || true
echo "gpu_check: done in ${SECONDS}s; failed: ${failed[*]:-nothing}"
((${#failed[@]} == 0))
