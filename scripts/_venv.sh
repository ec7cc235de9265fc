# Sourced by scripts/run and scripts/test: create .venv and install tfharness into it if missing.
# EXTRAS picks the optional dependencies ("" or "dev").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.tfharness-installed${EXTRAS:+-$EXTRAS}"
# The test suite runs inside an installed venv and calls scripts with TFHARNESS_NO_SETUP=1: a
# test must never reinstall the environment it runs in.
if [ -n "${TFHARNESS_NO_SETUP:-}" ]; then
  return 0 2>/dev/null || exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "Creating $VENV ..." >&2
  "$PYTHON" -m venv "$VENV"
fi
# Installs the editable package with uv when it can (it resolves to the same releases as pip,
# in well under half pip's time: figures in benchmarks/results.md, "Test suite"), else with pip.
# uv gets pip's index URL and constraint files when pip is given them (uv reads no pip
# configuration of its own); TFHARNESS_INSTALLER=pip skips uv.
pip_setting() {  # pip's value for a setting: its environment variable, else its configuration
  local from_env="${!1:-}"
  echo "${from_env:-$("$VENV/bin/python" -m pip config get "global.$2" 2>/dev/null || true)}"
}
tfharness_install() {
  if [ "${TFHARNESS_INSTALLER:-uv}" = uv ] \
      && "$VENV/bin/python" -m pip install --quiet uv >&2; then
    local index constraints=()
    index="$(pip_setting PIP_INDEX_URL index-url)"
    for file in $(pip_setting PIP_CONSTRAINT constraint); do constraints+=(--constraint "$file"); done
    # Bytecode compiled as pip does: with PYTHONDONTWRITEBYTECODE set, as on this project's
    # machines, every process would otherwise compile TensorFlow's and MLflow's modules anew.
    if "$VENV/bin/uv" pip install --quiet --compile-bytecode --python "$VENV/bin/python" \
        ${index:+--index-url "$index"} ${constraints[@]+"${constraints[@]}"} -e "$1" >&2; then
      return 0
    fi
    echo "uv could not install it; installing with pip instead ..." >&2
  fi
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  "$VENV/bin/python" -m pip install --quiet -e "$1" >&2
}
# Without extras, an install with extras (scripts/test's dev venv) serves too.
if [ -z "${EXTRAS:-}" ]; then
  for stamp in "$VENV"/.tfharness-installed*; do
    if [ -f "$stamp" ] && [ ! "$ROOT/pyproject.toml" -nt "$stamp" ]; then STAMP="$stamp"; fi
  done
fi
# Reinstall when pyproject.toml changed since the last install.
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  echo "Installing tfharness${EXTRAS:+[$EXTRAS]} into $VENV ..." >&2
  tfharness_install "$ROOT${EXTRAS:+[$EXTRAS]}"
  touch "$STAMP"
fi
# tfharness is installed editable, so its modules are imported from src/. Where Python is told
# not to write bytecode caches (PYTHONDONTWRITEBYTECODE, set on this project's machines), every
# process would compile them again: compile them here (only the changed ones), so each run and
# each test's child process reads them compiled.
"$VENV/bin/python" -m compileall -q "$ROOT/src" >/dev/null || true
