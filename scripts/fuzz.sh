#!/usr/bin/env bash
# Runs every fuzz target in the workspace for FUZZTIME (default 10s) each.
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime=${FUZZTIME:-10s}
grep -rHo --include='*_test.go' '^func Fuzz[A-Za-z0-9_]*' certs sessionkey provisioning gateway device-agent simulator |
	sed 's|/[^/]*_test.go:func | |' | sort -u |
	while read -r dir fn; do
		echo "== $fn in ./$dir"
		go test -run='^$' -fuzz="^$fn\$" -fuzztime="$fuzztime" "./$dir"
	done
