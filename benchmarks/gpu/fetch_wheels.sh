#!/usr/bin/env bash
# Download (here, where pip reaches an index) the wheels the prepared GPU run needs that the lent
# H200 image lacks: exactly the packages of benchmarks/gpu/wheels.txt, built for the image's
# Python 3.12 on manylinux x86_64, into .whl/ at the repository root (ignored by git; name it in
# the device call's `carry`). deepspeed ships only as a source archive: it is built here into a
# pure-Python wheel (its CUDA ops compile just in time there). Prints the total size and fails if
# the wheels plus the tracked tree would pass the 64 MiB a device call may carry.
#
#   bash benchmarks/gpu/fetch_wheels.sh            # into .whl/ (replaces what is there)
#   WHEEL_DIR=/tmp/w bash benchmarks/gpu/fetch_wheels.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
list="$root/benchmarks/gpu/wheels.txt"
dest="${WHEEL_DIR:-$root/.whl}"
py="${PYTHON:-python3}"
limit=$((64 * 1024 * 1024))

pkgs=$(grep -v '^\s*#' "$list" | sed 's/#.*//' | awk 'NF {print $1}')
rm -rf "$dest"; mkdir -p "$dest"
binary=()
for p in $pkgs; do
  case "$p" in deepspeed==*) ds="$p" ;; *) binary+=("$p") ;; esac
done

echo "fetch_wheels: ${#binary[@]} wheels for cp312 manylinux x86_64 -> $dest"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "${binary[@]}" 2> >(grep -v "^WARNING: Location" >&2)

if [ -n "${ds:-}" ]; then
  echo "fetch_wheels: building $ds into a pure-Python wheel (DS_BUILD_OPS=0; needs torch here)"
  src=$(mktemp -d)
  "$py" -m pip download -q --no-deps --no-binary=:all: -d "$src" "$ds" 2> >(grep -v "^WARNING: Location" >&2)
  DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$dest" "$src"/*.tar.gz
  rm -rf "$src"
fi

# the device receives the working tree without .git: the results name the commit from this file
(cd "$root" && echo "$(git rev-parse --short HEAD)$(git status --porcelain --untracked-files=no | grep -q . && echo +uncommitted)") > "$dest/COMMIT"
n=$(ls "$dest"/*.whl | wc -l)
want=$(echo "$pkgs" | wc -l)
if [ "$n" -ne "$want" ]; then
  echo "fetch_wheels: expected $want wheels (one per line of $list), got $n:" >&2; ls "$dest" >&2; exit 1
fi
wheels=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
tree=$(cd "$root" && git ls-files -z | xargs -0 du -cb 2>/dev/null | awk '/total$/ {s += $1} END {print s + 0}')
ls -la "$dest"
printf 'fetch_wheels: %d wheels, %.1f MiB; tracked tree %.1f MiB; together %.1f MiB of the 64 MiB a call carries\n' \
  "$n" "$(echo "$wheels / 1048576" | bc -l)" "$(echo "$tree / 1048576" | bc -l)" "$(echo "($wheels + $tree) / 1048576" | bc -l)"
if [ $((wheels + tree)) -ge $limit ]; then
  echo "fetch_wheels: over the 64 MiB limit" >&2; exit 1
fi
