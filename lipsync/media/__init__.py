"""Sound, pictures and containers: 16 kHz speech and mel windows (``audio``), frames and the MP4
writer (``video``), the ffmpeg binary (``ffmpeg``), image headers and decoding (``images``)."""
