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
"$fuzzer" -runs="$runs" -max_total_time=240 -rss_limit_mb=2048 "$scratch" "$corpus"
