#!/usr/bin/env bash
# Installs what the real-browser tests (tests/test_browser.py, marker `browser`) need:
# Debian's chromium and the Playwright Python package. Playwright drives the system browser
# through its executable path; `playwright install` (a browser download) is never run.
set -euo pipefail
if ! command -v chromium >/dev/null; then
  if command -v apt-get >/dev/null; then
    (apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)) >/dev/null
  else
    echo "no apt-get: install chromium by hand; the browser tests will be skipped" >&2
  fi
fi
python -m pip install -q "playwright>=1.45"
echo "browser installed: $(command -v chromium || echo none)"
