#!/usr/bin/env bash
# The test command: sets up the venv (first time only) and runs the whole suite.
set -eo pipefail
. "$(dirname "$0")/../scriptskd/env.sh"
exec python -m pytest -q tests "$@"
