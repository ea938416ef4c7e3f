# The user code image for Dagster's Helm chart (deploy/helm/values.yaml): the code server of the
# `matchall-dagster` code location, and every run pod the K8sRunLauncher starts from it.
#
#   docker build -t REGISTRY/matchall-dagster:0.1.0 .
#
# deploy/build_image.sh runs the same steps without a Docker engine (into a temporary folder) and
# proves the entry point serves the code location; keep the two in step (test_deploy.py checks).

# The project's Python (pyproject: requires-python >=3.11).
ARG PYTHON_VERSION=3.11
# Dagster's Kubernetes integration, at the release matching dagster==1.13.27 (pyproject): the run
# pods load the instance file the chart writes, whose run launcher is dagster_k8s.K8sRunLauncher.
ARG DAGSTER_K8S_VERSION=0.29.27

# -- build: the project as a wheel (no editable install, no dev extras, no tests) ---------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY matchall_dagster ./matchall_dagster
RUN python -m pip wheel --no-deps --wheel-dir /dist .

# -- runtime -------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm
ARG DAGSTER_K8S_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    DAGSTER_HOME=/opt/dagster/dagster_home

# A user of its own: the code server and the runs never run as root. 10001 is the uid the Helm
# values give to `runAsUser`. Nothing is kept on the image's disk: the memberships go to the
# PostgreSQL store (MATCHALL_STORE, deploy/helm/values.yaml).
RUN groupadd --system --gid 10001 matchall \
    && useradd --system --uid 10001 --gid matchall --home-dir /opt/dagster --no-create-home matchall \
    && mkdir -p /opt/dagster/dagster_home /opt/dagster/app \
    && chown -R matchall:matchall /opt/dagster

COPY --from=build /dist/ /tmp/dist/
RUN python -m venv /opt/venv \
    && pip install /tmp/dist/matchall_dagster-*.whl "dagster-k8s==${DAGSTER_K8S_VERSION}" \
    && rm -rf /tmp/dist

# An empty working folder: `dagster api grpc` puts the working folder on sys.path, and the
# package must come from the installed wheel only.
WORKDIR /opt/dagster/app
USER 10001:10001
EXPOSE 3030

# The chart passes its own arguments (`dagster api grpc -h 0.0.0.0 -p <port>` + the values'
# dagsterApiGrpcArgs); this default serves the same code location with `docker run`.
CMD ["dagster", "api", "grpc", "-h", "0.0.0.0", "-p", "3030", "-m", "matchall_dagster.definitions"]
