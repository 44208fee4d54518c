#!/usr/bin/env bash
# Proves on CPU that the prepared GPU run works on the lent image's stack (torch 2.11, triton 3.6,
# transformers 5.17, huggingface_hub 1.33; benchmarks/gpu/image.txt) with the carried packages
# (benchmarks/gpu/wheels.txt, same versions, built for this Python): builds that venv, then runs
# `benchmarks/gpu/run.sh --dry-run` in it and checks that every step ended ok and wrote its files.
#
#   bash benchmarks/gpu/compat_check.sh            # the dry run (CI runs this)
#   bash benchmarks/gpu/compat_check.sh --tests    # also the kernel tests under triton 3.6's interpreter
#
# The venv is $COMPAT_VENV (default $TMPDIR/metapo-fast-compat-venv); it is reused while image.txt
# and wheels.txt are unchanged. Needs a package index (torch 2.11's CUDA 13 build from PyPI: it
# runs on CPU, and it is what the image holds).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
here="$root/benchmarks/gpu"
venv="${COMPAT_VENV:-${TMPDIR:-/tmp}/metapo-fast-compat-venv}"
stamp=$(cat "$here/image.txt" "$here/wheels.txt" "$0" | sha256sum | cut -c1-16)
run_tests=0
[ "${1:-}" = "--tests" ] && run_tests=1

if [ ! -f "$venv/.stamp" ] || [ "$(cat "$venv/.stamp")" != "$stamp" ]; then
  echo "compat_check: building $venv (torch 2.11 stack; about 3 minutes)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip 2> >(grep -v "^WARNING: Location" >&2)
  "$venv/bin/python" -m pip install -q -r "$here/image.txt" 2> >(grep -v "^WARNING: Location" >&2)
  carried=$(grep -v '^\s*#' "$here/wheels.txt" | sed 's/#.*//' | awk 'NF {print $1}')
  ds=$(echo "$carried" | grep '^deepspeed==' || true)
  # --no-deps: exactly the carried set on top of the image set, as on the GPU machine
  echo "$carried" | grep -v '^deepspeed==' | xargs "$venv/bin/python" -m pip install -q --no-deps 2> >(grep -v "^WARNING: Location" >&2)
  if [ -n "$ds" ]; then  # deepspeed is a source archive: built as fetch_wheels.sh builds it
    DS_BUILD_OPS=0 "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation "$ds" 2> >(grep -v "^WARNING: Location" >&2)
  fi
  echo "$stamp" > "$venv/.stamp"
fi
"$venv/bin/python" - <<'PY'
import torch, triton, transformers
print(f"compat_check: torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}")
assert torch.__version__.startswith("2.11."), torch.__version__
assert triton.__version__.startswith("3.6."), triton.__version__
PY

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
set +e
PYTHON="$venv/bin/python" bash "$here/run.sh" --dry-run --results-dir "$out/results" --out "$out/out"
rc=$?
set -e
"$venv/bin/python" - "$out" "$rc" <<'PY'
import os, sys, tarfile
out, rc = sys.argv[1], int(sys.argv[2])
summary = open(os.path.join(out, "results", "gpu_run_dryrun.md")).read()
rows = [l.split("|")[1:-1] for l in summary.splitlines() if l.startswith("| ") and not l.startswith("| step")]
bad = [r[0].strip() for r in rows if not r[1].strip().startswith("ok")]
missing = [f for r in rows for f in r[3].split(",") if f.strip() and not os.path.exists(os.path.join(out, "results", f.strip()))]
names = set(tarfile.open(os.path.join(out, "out", "gpu_results.tar.gz")).getnames())
steps = {r[0].strip() for r in rows}
want = {"env", "tests", "fused_loss", "tracker", "meta", "e2e"}
if rc or bad or missing or steps != want or not {"fused_loss_dryrun.md", "e2e_dryrun.md"} <= names:
    print(summary)
    log = open(os.path.join(out, "results", "gpu_run_dryrun.log")).read().splitlines()
    print("\n".join(l for l in log if not l.startswith("WARNING: Location"))[-6000:])
    sys.exit(f"compat_check: the dry run failed on the torch 2.11 stack: exit {rc}, steps not ok {bad}, "
             f"files missing {missing}, steps run {sorted(steps)}")
print(f"compat_check: the dry run passed on the torch 2.11 stack ({len(rows)} steps ok)")
PY
if [ "$run_tests" = 1 ]; then
  # triton 3.6's interpreter calls int() on 1-element arrays, an error from numpy 2.4 on; the GPU
  # never runs the interpreter, so only this CPU check needs the older numpy.
  "$venv/bin/python" -m pip install -q "numpy<2.4" 2> >(grep -v "^WARNING: Location" >&2)
  (cd "$root" && "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_sm90_compile.py tests/test_lce_epilogue.py \
    tests/test_tracker_api.py tests/test_fused_loss.py tests/test_liger.py)
  rm -f "$venv/.stamp"  # numpy changed: rebuild next time
fi
