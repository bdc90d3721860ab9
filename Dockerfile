# marble-pl on a CUDA runtime image, entrypoint `marble` (LightningCLI).
#
#   docker build -t marble .
#   docker run --gpus all --rm \
#     -v "$HOME/.cache/huggingface:/cache/huggingface" -v "$PWD/runs:/workspace/runs" \
#     -v "$PWD/data:/workspace/data:ro" -e HF_TOKEN \
#     marble fit --config configs/sd35.yaml
#
# Base: PyTorch 2.13.0 built for CUDA 12.6 + cuDNN 9, i.e. the torch the project is developed on,
# matching the image's CUDA runtime. pyproject allows torch<2.15, so `pip install .` keeps this
# torch (and the image's matching torchvision) instead of pulling another build from PyPI.
# No secrets are baked in: pass HF_TOKEN (gated SD3.5 weights) with `-e HF_TOKEN` at run time.
FROM pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The unprivileged user that runs training. MARBLE_UID should match the owner of the host
# directories mounted on the volumes (`--build-arg MARBLE_UID=$(id -u)`). A base-image user
# that already holds that uid (Ubuntu 24.04's `ubuntu`) is removed first.
ARG MARBLE_UID=1000
RUN if existing="$(getent passwd "${MARBLE_UID}" | cut -d: -f1)" && [ -n "${existing}" ]; then \
        userdel --remove "${existing}"; \
    fi \
    && useradd --create-home --uid "${MARBLE_UID}" --user-group --shell /bin/bash marble \
    && mkdir -p /cache/huggingface /workspace/runs /workspace/data \
    && chown -R marble:marble /cache /workspace

# The package from the build context with torchjd's balancers (dependencies from PyPI; torch is
# already there).
COPY pyproject.toml README.md /tmp/marble-pl/
COPY marble_pl /tmp/marble-pl/marble_pl
COPY callbacks /tmp/marble-pl/callbacks
RUN pip install --no-cache-dir "/tmp/marble-pl[balancers]" \
    && rm -rf /tmp/marble-pl \
    && marble --help > /dev/null

WORKDIR /workspace
COPY --chown=marble:marble configs /workspace/configs

USER ${MARBLE_UID}

# Model weights (Hugging Face cache) and run outputs (TensorBoard logs, checkpoints, LoRA).
VOLUME ["/cache/huggingface", "/workspace/runs"]

ENTRYPOINT ["marble"]
CMD ["--help"]
