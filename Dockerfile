# CPU image by default. For NVIDIA GPUs build with a CUDA torch, e.g.
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t talking-avatar .
#   docker run --gpus all -p 3000:3000 -v $PWD/checkpoints:/app/checkpoints talking-avatar
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PORT=3000

# The libraries OpenCV needs, and nginx for the production stack (make serve: nginx in front of
# two gunicorns, lipsync/server/stack.py). No Debian ffmpeg: it would be found first, and it lacks
# openh264, the faster H.264 encoder (VIDEO_ENCODER=auto); pip's imageio-ffmpeg brings x264 and openh264.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 nginx \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt .
RUN pip install --extra-index-url "$TORCH_INDEX" -r requirements.txt

COPY . .
RUN pip install --no-deps -e .
RUN mkdir -p outputs checkpoints .cache
EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:3000/api/health').status != 200)"
CMD ["python", "-m", "lipsync.server.stack"]
