# Sourced by the demo, scenario and test commands: use the active Python environment when it
# already has torch and torchvision (a virtualenv or conda env you activated: nothing is
# installed); otherwise make (once) and activate the project's venv, rebuilt whenever
# requirements.txt changes. Its location: BIDF_VENV (default ~/.cache/bidf-mkd/venv; none: the python
# on PATH as it is).
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] && python -c "import torch, torchvision" >/dev/null 2>&1; then
  : # the activated environment has what the project needs
elif [ "${BIDF_VENV:-}" = none ]; then
  # the python on PATH as it is (e.g. a GPU image with its own torch and no network)
  python -c "import torch, torchvision" >/dev/null 2>&1 \
    || { echo "[setup] BIDF_VENV=none but $(command -v python || echo python) cannot import torch and torchvision" >&2
         return 1 2>/dev/null || exit 1; }
else
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
  # shellcheck disable=SC1091
  . "$BIDF_VENV/bin/activate"
fi
# Idle OpenMP threads that spin make every op crawl on a busy small CPU; passive waiting costs
# nothing on a quiet one (bench/RESULTS.md).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
cd "$_root" || exit 1
# How the scenario and pretraining scripts launch their entry point: python, or torchrun over NPROC
# processes of this machine (NPROC=4 bash scriptskd/ss.sh; docs/distributed.md).
BIDF_LAUNCH=(python)
if [ "${NPROC:-1}" -gt 1 ]; then
  BIDF_LAUNCH=(python -m torch.distributed.run --standalone --nproc_per_node "$NPROC")
fi
