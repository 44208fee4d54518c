#!/usr/bin/env bash
# The prepared GPU run (see benchmarks/gpu/README.md). On the lent machine: installs the wheels
# carried in .whl/ (those the image lacks; benchmarks/gpu/fetch_wheels.sh makes them) into
# /tmp/site, then runs every step of benchmarks/gpu/run.py under its time box.
#   bash benchmarks/gpu/run.sh [--dry-run] [--only STEPS] [--budget S] [--results-dir D] [--out D]
set -uo pipefail
export GPU_RUN_T0="${GPU_RUN_T0:-$(date +%s)}"  # run.py's budget counts from here
cd "$(dirname "$0")/../.."
py="${PYTHON:-python3}"
dry=0
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done
if [ "$dry" = 1 ]; then
  # The carried wheels are built for the image's Python 3.12; a dry run uses this environment's
  # packages (compat_check.sh installs the same versions into a venv of this Python).
  echo "run.sh: dry run: .whl/ is not installed; this environment's packages are used"
elif compgen -G ".whl/*.whl" > /dev/null; then
  site="${GPU_RUN_SITE:-/tmp/site}"
  echo "run.sh: installing $(ls .whl/*.whl | wc -l) carried wheels into $site"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || { echo "run.sh: installing the carried wheels failed" >&2; exit 3; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The package maps kernels/ and csrc/ to metapo_fast.kernels and metapo_fast.csrc (setup.py): a bare
# checkout on PYTHONPATH lacks them, so install it (editable, nothing fetched) where it is not yet.
if ! "$py" -c "import metapo_fast.kernels, metapo_fast.csrc" 2> /dev/null; then
  echo "run.sh: installing this checkout (pip install --no-deps --no-build-isolation --no-index -e .)"
  "$py" -m pip install -q --no-deps --no-build-isolation --no-index -e . \
    || { echo "run.sh: installing metapo_fast from this checkout failed" >&2; exit 3; }
fi
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m benchmarks.gpu.run "$@"
