#!/usr/bin/env bash
# The GPU benchmark, exactly as run for docs/PERFORMANCE.md. From the repository root, on a CUDA machine
# with python3 + torch (CUDA) + numpy + opencv, no network needed:
#
#     bash bench/gpu_bench.sh [quick]
#     STEPS="tests builtin-40s-1246 profile" bash bench/gpu_bench.sh   # only these parts (names below)
#     STEPS="w2l-10s-720-x4 x4-variants" bash bench/gpu_bench.sh       # the 4-at-once row and its levers
#
# Needs, next to the code (both ignored by git, see docs/PERFORMANCE.md "Repeating the GPU benchmark"):
#   .benchdata/avatar.jpg, .benchdata/kennedy_speech_16k.wav   the shared fixtures (or LIPSYNC_FIXTURES=DIR)
#   .benchdata/head/lipsync                                    the code before (git archive <commit> lipsync;
#                                                              docs/PERFORMANCE.md names the commit of each run)
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
  if [ -n "$xz" ]; then  # on PATH: the benchmarks without a service (bench_frames.py) find it there
    mkdir -p /tmp/ffbin
    python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open('/tmp/ffbin/ffmpeg', 'wb'))" "$xz"
    chmod +x /tmp/ffbin/ffmpeg
    export PATH=/tmp/ffbin:$PATH
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

# want NAME: is part NAME asked for (STEPS unset: every part)
want() { [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" $1 "* ]]; }

BOX=420,137,885,602
RUNS=3
[ "$QUICK" = quick ] && RUNS=1

want tests && echo "== 0. GpuFrames and the built-in engine on the GPU = the CPU path (tests on CUDA) ==" &&
python3 -m pytest -q -p no:cacheprovider tests/test_gpu_frames.py tests/test_builtin_on_device.py 2>&1 | tail -3 | tee "$OUT/test_gpu_frames.txt"

want ops && echo "== 0b. remap_linear and i420 on the GPU: round 3's code vs this tree's (same bits) ==" &&
python3 bench/bench_gpu_ops.py 2>&1 | tee "$OUT/ops.txt"
want frames && echo "== 1. frames without a model: CPU vs GPU, equality; encoders and layouts (40.7 s at 1084x1246) ==" &&
python3 bench/bench_frames.py --height 1246 --seconds 40.7 --encoders x264,openh264 --layouts 1x0,16x1,8x2 --runs 1 \
  2>&1 | tee "$OUT/frames.txt"
want codecs && echo "== 1b. the encoders' CPU time, size and quality (10 s at 1084x1246, one thread each) ==" &&
python3 bench/bench_codecs.py --height 1246 --seconds 10 2>&1 | tee "$OUT/codecs.txt"

# One random-weights checkpoint for every run (published weights run at the same speed); made by
# this tree, so the tree before (--tree) is measured on the very same file.
CKPT=${TMPDIR:-/tmp}/wav2lip-random.pth
python3 -c "import sys; from lipsync.engines.wav2lip.model import save_random_checkpoint; save_random_checkpoint(sys.argv[1], seed=0)" "$CKPT"
common="--checkpoint $CKPT --device cuda --runs $RUNS --face-box $BOX"
# row NAME ARGS...: the issue's row, before (the tree in .benchdata/head) then after, one after the other
row() {
  name=$1; shift
  want "$name" || return 0
  for label in before after; do
    tree=""; [ $label = before ] && tree="--tree .benchdata/head"
    [ $label = before ] && [ ! -d .benchdata/head/lipsync ] && continue
    echo "-- $name [$label]"
    python3 bench/bench_pipeline.py $common "$@" $tree --label "$name $label" --json "$OUT/$name-$label.json" 2>&1 \
      | grep -v -i warning | tee "$OUT/$name-$label.txt"
  done
}
echo "== 2. the issue's rows, before / after =="
row w2l-40s-1246 --engine wav2lip --seconds 40.7 --max-height 1246
row builtin-40s-1246 --engine builtin --seconds 40.7 --max-height 1246
row w2l-10s-720-x4 --engine wav2lip --seconds 10 --max-height 720 --concurrency 4
row w2l-10s-720-stream --engine wav2lip --seconds 10 --max-height 720 --stream

# The 4-at-once row's levers, after: fewer segment encoders per request, openh264 with CAVLC (a copy
# of this tree with only the entropy coder changed), and the round's timeline.
if want x4-variants; then
  x4="$common --engine wav2lip --seconds 10 --max-height 720 --concurrency 4"
  variants="workers4 workers3 cavlc"
  rm -rf /tmp/cavlc-tree && mkdir -p /tmp/cavlc-tree && cp -r lipsync /tmp/cavlc-tree/ &&
    sed -i 's/"-coder", "cabac"/"-coder", "cavlc"/' /tmp/cavlc-tree/lipsync/media/video.py &&
    grep -q '"-coder", "cavlc"' /tmp/cavlc-tree/lipsync/media/video.py ||
    { echo "x4-variants: no CAVLC copy made (h264_options changed?): that variant is skipped" >&2
      variants="workers4 workers3"; }
  for variant in $variants; do
    echo "== 2b. 4 requests at once, after, $variant =="
    case $variant in
      workers*) run="env ENCODE_WORKERS=${variant#workers} python3 bench/bench_pipeline.py $x4" ;;
      cavlc) run="python3 bench/bench_pipeline.py $x4 --tree /tmp/cavlc-tree" ;;
    esac
    $run --label "x4 $variant" 2>&1 | grep -v -i warning | tee "$OUT/x4-$variant.txt"
  done
  echo "== 2c. when each stage of 4 requests at once runs (after) =="
  python3 bench/bench_pipeline.py $x4 --runs 1 --timeline 2>&1 | grep -v -i warning | tee "$OUT/x4-timeline.txt"
fi

want timeline && echo "== 3. when each stage of one request runs (40.7 s, 1084x1246, Wav2Lip, after) ==" &&
python3 bench/bench_pipeline.py $common --engine wav2lip --seconds 40.7 --max-height 1246 --runs 1 --timeline 2>&1 \
  | grep -v -i warning | tee "$OUT/timeline.txt"
for engine in ${PROFILE_ENGINES:-wav2lip builtin}; do
  want profile && echo "== 4. the GPU's kernels in one request (40.7 s, 1084x1246, $engine, after) ==" &&
  python3 bench/bench_pipeline.py $common --engine $engine --seconds 40.7 --max-height 1246 --runs 1 --torch-profile 2>&1 \
    | grep -v -i warning | tee "$OUT/torch-profile-$engine.txt"
done

echo; echo "================ summary ================"
cat "$OUT/machine.txt" "$OUT/test_gpu_frames.txt" "$OUT/ops.txt" "$OUT/frames.txt" "$OUT/codecs.txt" 2>/dev/null
for f in "$OUT"/torch-profile-*.txt; do
  [ -f "$f" ] && grep -h -E "^engine:|  total|Self CUDA time total" "$f" | sed "s|^|$(basename "$f" .txt): |"
done
for f in "$OUT"/*-before.txt "$OUT"/*-after.txt "$OUT"/x4-*.txt; do
  [ -f "$f" ] && grep -h -E "^engine:|  total|lipsync|composite|  encode|first_frame|at once|CPU per" "$f" | sed "s|^|$(basename "$f" .txt): |"
done
