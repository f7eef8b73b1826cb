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
# the pins are written once, in pyproject.toml's [tool.deepyard.pins]
COPY --chown=ray:users pyproject.toml README.md ./
RUN pip install --no-cache-dir "$(python -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["tool"]["deepyard"]["pins"]["torch"])')" --index-url ${TORCH_INDEX}
COPY --chown=ray:users src ./src
RUN pip install --no-cache-dir ".[cluster]" \
 && pip install --no-cache-dir --no-deps $(python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["tool"]["deepyard"]["pins"]["no_deps"])')
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users serving ./serving
ENV DEEPYARD_HOME=/tmp/deepyard
