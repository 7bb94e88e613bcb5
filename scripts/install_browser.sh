#!/usr/bin/env bash
# Installs what the real-browser tests (tests/test_browser.py, marker `browser`) need:
# Debian's chromium and the Playwright Python package. Playwright drives the system browser
# through its executable path; `playwright install` (a browser download) is never run.
set -euo pipefail
if ! command -v chromium >/dev/null; then
  # shellcheck source=scripts/apt.sh
  . "$(dirname "$0")/apt.sh"
  apt_install chromium
fi
python -m pip install -q "playwright>=1.45"
echo "browser installed: $(command -v chromium || echo none)"
