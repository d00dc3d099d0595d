# Turns `go test -bench -benchmem -count=N` output into one table of
# medians. A benchmark named X/floor is the comparison for its siblings
# X/...: their row shows the ratio of their median time to the floor's.
function median(list,    n, a, i, j, t) {
	n = split(list, a, " ")
	for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > t + 0; j--) a[j + 1] = a[j]; a[j + 1] = t }
	return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
/^pkg: / { pkg = $2; sub(/^fleetkey\.dev\//, "", pkg) }
/^Benchmark/ && / ns\/op/ {
	name = $1; sub(/-[0-9]+$/, "", name); sub(/^Benchmark/, "", name)
	key = pkg " " name
	if (!(key in seen)) { seen[key] = 1; order[++count] = key }
	for (i = 2; i <= NF; i++) {
		if ($i == "ns/op") ns[key] = ns[key] " " $(i - 1)
		if ($i == "B/op") bytes[key] = bytes[key] " " $(i - 1)
		if ($i == "allocs/op") allocs[key] = allocs[key] " " $(i - 1)
		if (i > 3 && $i !~ /^(ns\/op|B\/op|allocs\/op)$/ && $(i - 1) ~ /^[0-9.e+-]+$/ && $i !~ /^[0-9.e+-]+$/) {
			u = key SUBSEP $i
			if (!(u in xvals)) { xunits[key] = xunits[key] " " $i }
			xvals[u] = xvals[u] " " $(i - 1)
		}
	}
	runs[key]++
}
END {
	if (count == 0) { print "no benchmarks ran"; exit 1 }
	printf "%-20s %-42s %14s %12s %10s %9s %9s  %s\n", "package", "benchmark", "median ns/op", "ops/s", "B/op", "allocs", "vs floor", "runs"
	for (k = 1; k <= count; k++) {
		key = order[k]; split(key, p, " ")
		m = median(ns[key]); ratio = "-"
		base = p[2]; sub(/\/[^\/]+$/, "", base)
		floorkey = p[1] " " base "/floor"
		if (base != p[2] && (floorkey in seen) && floorkey != key) ratio = sprintf("%.2fx", m / median(ns[floorkey]))
		x = ""
		nu = split(xunits[key], us, " ")
		for (j = 1; j <= nu; j++) x = x sprintf("  %s=%g", us[j], median(xvals[key SUBSEP us[j]]))
		printf "%-20s %-42s %14.0f %12.1f %10.0f %9.0f %9s  %d%s\n", p[1], p[2], m, (m > 0 ? 1e9 / m : 0), median(bytes[key]), median(allocs[key]), ratio, runs[key], x
	}
}
