#!/usr/bin/env bash
# The test command: sets up the venv (first time only) and runs the suite.
#   bash tests/run.sh                              everything
#   bash tests/run.sh --fast                       the fast tier (-m "fast and not slow": unit tests, no pool, no runs)
#   bash tests/run.sh tests/test_zo.py -k numsplit other arguments go to pytest as they are; without a test path
#                                                  among them, pytest runs tests/
set -eo pipefail
. "$(dirname "$0")/../scriptskd/env.sh"
args=()
where=(tests)
for a in "$@"; do
  if [ "$a" = "--fast" ]; then
    args+=(-m "fast and not slow")
  else
    args+=("$a")
    case "$a" in -*) ;; *) if [ -e "${a%%::*}" ]; then where=(); fi ;; esac
  fi
done
exec python -m pytest -q "${where[@]}" "${args[@]}"
