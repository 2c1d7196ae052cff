#!/usr/bin/env bash
# The GPU benchmark, exactly as run for docs/PERFORMANCE.md. From the repository root, on a CUDA machine
# with python3 + torch (CUDA) + numpy + opencv, no network needed:
#
#     bash bench/gpu_bench.sh [quick]
#
# Needs, next to the code (both ignored by git, see docs/PERFORMANCE.md "Repeating the GPU benchmark"):
#   .benchdata/avatar.jpg, .benchdata/kennedy_speech_16k.wav   the shared fixtures (or LIPSYNC_FIXTURES=DIR)
#   .benchdata/head/lipsync                                    the code before (git archive <commit> lipsync)
#   ffmpeg on PATH, or FFMPEG_BINARY, or .whl/ffmpeg-*.xz (imageio-ffmpeg's binary, xz-compressed),
#   or .whl/imageio_ffmpeg-*.whl
# Writes logs and JSON to $OUT (default bench-results/). Prints the tables last.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results}
mkdir -p "$OUT"
QUICK=${1:-}
export PYTHONUNBUFFERED=1
export LIPSYNC_FIXTURES=${LIPSYNC_FIXTURES:-.benchdata}
# The service loads a TTS provider at start: point it at a (never contacted) HTTP one, and keep the
# web app's rate-limit settings from needing their package.
export TTS_PROVIDER=http TTS_API_URL=http://127.0.0.1:9 RATE_LIMIT=off RATE_LIMIT_READ=off
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1

if [ -z "${FFMPEG_BINARY:-}" ] && ! command -v ffmpeg >/dev/null; then
  xz=$(ls .whl/ffmpeg-*.xz 2>/dev/null | head -1)
  whl=$(ls .whl/imageio_ffmpeg-*.whl 2>/dev/null | head -1)
  if [ -n "$xz" ]; then
    python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open('/tmp/ffmpeg', 'wb'))" "$xz"
    chmod +x /tmp/ffmpeg
    export FFMPEG_BINARY=/tmp/ffmpeg
  elif [ -n "$whl" ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site "$whl" && export PYTHONPATH=/tmp/site
  else
    echo "no ffmpeg: install one or put imageio-ffmpeg's wheel in .whl/" >&2; exit 1
  fi
fi

{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw --format=csv,noheader
  nproc; python3 -c "import torch, cv2, numpy; print('torch', torch.__version__, 'cv2', cv2.__version__, 'numpy', numpy.__version__)"
  ${FFMPEG_BINARY:-ffmpeg} -hide_banner -version | head -1
} 2>&1 | tee "$OUT/machine.txt"

BOX=420,137,885,602
ROUNDS=20; RUNS=5; SECONDS_=10
[ "$QUICK" = quick ] && ROUNDS=5 && RUNS=2

echo "== 1. generator and engine (fp32 reference, fp16, CUDA graphs, mouth-only) =="
python3 bench/bench_wav2lip.py --device cuda --rounds $ROUNDS --json "$OUT/wav2lip_gpu.json" 2>&1 \
  | grep -v -i warning | tee "$OUT/wav2lip_gpu.txt"

echo "== 2. composite + encode alone (no model) =="
python3 bench/bench_encode.py --seconds $SECONDS_ --presets veryfast,ultrafast --tunes none,zerolatency \
  --threads 0,8 --parallel 1,4 --runs 3 2>&1 | tee "$OUT/encode.txt"

echo "== 3. whole request: 10 s of speech -> MP4, 720p, before / after, 1 and 4 at once =="
# One random-weights checkpoint for every run (published weights run at the same speed); made by
# this tree, so an older tree under --tree can be measured on the very same file.
CKPT=${TMPDIR:-/tmp}/wav2lip-random.pth
python3 -c "import sys; from lipsync.engines.wav2lip.model import save_random_checkpoint; save_random_checkpoint(sys.argv[1], seed=0)" "$CKPT"
common="--engine wav2lip --checkpoint $CKPT --device cuda --seconds $SECONDS_ --runs $RUNS --face-box $BOX"
if [ -d .benchdata/head/lipsync ]; then
  python3 bench/bench_pipeline.py $common --tree .benchdata/head --concurrency 4 --label before \
    --json "$OUT/pipeline_before.json" 2>&1 | grep -v -i warning | tee "$OUT/pipeline_before.txt"
fi
python3 bench/bench_pipeline.py $common --concurrency 4 --label after \
  --json "$OUT/pipeline_after.json" 2>&1 | grep -v -i warning | tee "$OUT/pipeline_after.txt"
python3 bench/bench_pipeline.py $common --concurrency 4 --mouth-only --label after-mouth \
  --json "$OUT/pipeline_after_mouth.json" 2>&1 | grep -v -i warning | tee "$OUT/pipeline_after_mouth.txt"
python3 bench/bench_pipeline.py $common --concurrency 4 --precision fp32 --label after-fp32 \
  --json "$OUT/pipeline_after_fp32.json" 2>&1 | grep -v -i warning | tee "$OUT/pipeline_after_fp32.txt"
python3 bench/bench_pipeline.py $common --concurrency 4 --mouth-only --preset superfast --label after-mouth-superfast \
  --json "$OUT/pipeline_after_superfast.json" 2>&1 | grep -v -i warning | tee "$OUT/pipeline_after_superfast.txt"

echo; echo "================ summary ================" | tee "$OUT/summary.txt"
cat "$OUT/machine.txt"
sed -n '/^generator/,$p' "$OUT/wav2lip_gpu.txt"
cat "$OUT/encode.txt"
for f in "$OUT"/pipeline_*.txt; do grep -E "machine|engine:|total|lipsync|composite|encode |real-time|at once|fastest" "$f"; done
