#!/bin/sh
# Runs a libFuzzer target briefly over a committed corpus. New inputs go to a scratch
# directory (libFuzzer writes into its first corpus argument), so the committed one stays
# as it is. Usage: smoke.sh FUZZER CORPUS_DIR [RUNS]
set -eu
fuzzer=$1
corpus=$2
runs=${3:-2000}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# libFuzzer reports a crash with exit status 77 by default, which meson reads as "skipped":
# make every finding a failure.
"$fuzzer" -runs="$runs" -max_total_time=240 -rss_limit_mb=2048 -error_exitcode=1 -timeout_exitcode=1 \
  "$scratch" "$corpus"
