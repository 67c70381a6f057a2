#!/usr/bin/env bash
# Set up (first run: ~3 minutes) and train. With no arguments: full MNIST with the documented
# defaults, into models/mnist. Any arguments go to `python -m train` (see --help).
#   ./train.sh
#   ./train.sh path/to/photos --pretrained --epochs 3 --out models/lotr
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
if [ -z "${MNIST_DIR:-}" ] && [ -d ../shared/data/mnist ]; then export MNIST_DIR=$PWD/../shared/data/mnist; fi
if [ $# -eq 0 ]; then set -- mnist --out models/mnist; fi
exec .venv/bin/python -m train "$@"
