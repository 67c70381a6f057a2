#!/usr/bin/env bash
# Set up (first run: ~3 minutes, plus Chromium) and run every test, the slow full-MNIST ones
# included. Extra arguments go to pytest, e.g. ./test.sh -m "not slow" -x
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh test
if [ -z "${MNIST_DIR:-}" ] && [ -d ../shared/data/mnist ]; then export MNIST_DIR=$PWD/../shared/data/mnist; fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
