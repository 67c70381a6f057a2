#!/usr/bin/env bash
# Create .venv (if missing) and install the pinned requirements into it.
#   scripts/setup.sh          runtime only (training, serving)
#   scripts/setup.sh test     plus pytest, Playwright and Debian's Chromium for the browser test
# pip resolves torch/torchvision to the builds on disk where a cap is configured (see requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
req=requirements.txt
[ "${1:-}" = test ] && req=requirements-test.txt
# Skip the install when the requirements have not changed since the last one (a few seconds saved
# on every run; a fresh clone or an edited requirements file always installs).
stamp=.venv/.installed-$(cat requirements.txt "$req" | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -r "$req" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  touch "$stamp"
fi
if [ "${1:-}" = test ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || { echo "setup: could not install Debian's chromium (needed by tests/test_browser.py)" >&2; exit 1; }
  else
    echo "setup: the browser test needs Chromium: sudo apt-get install chromium" >&2; exit 1
  fi
fi
