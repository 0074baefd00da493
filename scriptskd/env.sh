# Sourced by the demo and test commands: make (once) and activate the project's venv.
# The venv lives outside the checkout so fresh clones (CI) reuse it; it is rebuilt
# whenever requirements.txt changes. Override the location with BIDF_VENV.
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIDF_VENV="${BIDF_VENV:-$HOME/.cache/bidf-mkd/venv}"
_stamp="$BIDF_VENV/.requirements.sha256"
_want="$(sha256sum "$_root/requirements.txt" | cut -d' ' -f1)"
if [ ! -x "$BIDF_VENV/bin/python" ] || [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
  echo "[setup] installing requirements into $BIDF_VENV (first time: a few minutes)"
  python3 -m venv "$BIDF_VENV" || return 1 2>/dev/null || exit 1
  "$BIDF_VENV/bin/pip" install -q --disable-pip-version-check -r "$_root/requirements.txt" \
    || { echo "[setup] pip install failed; see the messages above" >&2; return 1 2>/dev/null || exit 1; }
  echo "$_want" > "$_stamp"
fi
# Idle OpenMP threads that spin make every op crawl on a busy small CPU (measured: a conv4
# API took 212 s instead of 30 s at load 5 on 2 cores); passive waiting costs nothing on a quiet one.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
# shellcheck disable=SC1091
. "$BIDF_VENV/bin/activate"
cd "$_root" || exit 1
