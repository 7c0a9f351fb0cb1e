#!/usr/bin/env bash
# What the CI job runs for one target (the workflow calls it; run it locally the same way):
#   bash examples/ci/build.sh TARGET
# Replays edgeq.lock (no measuring on the CI runner), checks the artifact, and fails the job on a missed budget.
set -uo pipefail
cd "$(dirname "$0")"
target="${1:?usage: build.sh TARGET}"
edgeq="${EDGEQ:-edgeq}"

"$edgeq" build edgeq.toml --locked -t "$target"
code=$?
case "$code" in
    0) ;;
    3) echo "edgeq: $target missed its budget (exit 3): the artifact is in build/$target for inspection" >&2
       exit 3 ;;
    2) echo "edgeq: the lock does not match the inputs, options or tools; rebuild on the measuring machine with" \
            "'edgeq build' (or --locked --relock) and commit edgeq.lock" >&2
       exit 2 ;;
    *) exit "$code" ;;
esac
"$edgeq" verify "build/$target"
