package report

import (
	"math"
	"strconv"
	"strings"
	"time"
)

// dash stands for a number that is missing or not finite.
const dash = "–"

// finite reports whether v is a usable number.
func finite(v float64) bool { return !math.IsNaN(v) && !math.IsInf(v, 0) }

// limit is the largest magnitude plotted; beyond it values are clamped so
// that scale arithmetic cannot overflow.
const limit = 1e15

// clean returns v clamped to ±limit and whether it was finite at all.
func clean(v float64) (float64, bool) {
	if !finite(v) {
		return 0, false
	}
	return math.Max(-limit, math.Min(limit, v)), true
}

// fmtInt formats n with thousands separators: 12345 -> "12,345".
func fmtInt(n int64) string {
	s := strconv.FormatInt(n, 10)
	neg := strings.HasPrefix(s, "-")
	if neg {
		s = s[1:]
	}
	var b strings.Builder
	if neg {
		b.WriteByte('-')
	}
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}

// fmtNum formats a float for people: thousands separators for large
// values, a few significant digits for small ones.
func fmtNum(v float64) string {
	if !finite(v) {
		return dash
	}
	a := math.Abs(v)
	switch {
	case a >= 100 && a < 1e18:
		return fmtInt(int64(math.Round(v)))
	case a >= 100:
		return strconv.FormatFloat(v, 'g', 3, 64)
	case a >= 10:
		return trimZeros(strconv.FormatFloat(v, 'f', 1, 64))
	case a >= 0.1 || a == 0:
		return trimZeros(strconv.FormatFloat(v, 'f', 2, 64))
	default:
		return strconv.FormatFloat(v, 'g', 2, 64)
	}
}

// fmtMS formats a latency in milliseconds: "1.23 ms", "45.6 ms", "1,234 ms".
func fmtMS(v float64) string {
	if !finite(v) {
		return dash
	}
	a := math.Abs(v)
	switch {
	case a == 0:
		return "0 ms"
	case a < 0.1:
		return strconv.FormatFloat(v, 'f', 3, 64) + " ms"
	case a < 10:
		return strconv.FormatFloat(v, 'f', 2, 64) + " ms"
	case a < 100:
		return strconv.FormatFloat(v, 'f', 1, 64) + " ms"
	default:
		return fmtNum(v) + " ms"
	}
}

// trimZeros drops trailing zeros after a decimal point: "2.50" -> "2.5".
func trimZeros(s string) string {
	if !strings.Contains(s, ".") {
		return s
	}
	s = strings.TrimRight(s, "0")
	return strings.TrimSuffix(s, ".")
}

// decimals is how many decimals a tick step needs.
func decimals(step float64) int {
	if step <= 0 || !finite(step) {
		return 0
	}
	d := int(math.Ceil(-math.Log10(step) - 1e-9))
	return max(0, min(d, 6))
}

// fmtTick formats an axis value compactly, given the distance to the next
// tick: 0, 0.5, 20, 2,500, 15k, 1.5M.
func fmtTick(v, step float64) string {
	if !finite(v) {
		return ""
	}
	if math.Abs(v) < math.Abs(step)*1e-9 {
		v = 0
	}
	a := math.Abs(v)
	switch {
	case a >= 1e9:
		return trimZeros(strconv.FormatFloat(v/1e9, 'f', decimals(step/1e9), 64)) + "G"
	case a >= 1e6:
		return trimZeros(strconv.FormatFloat(v/1e6, 'f', decimals(step/1e6), 64)) + "M"
	case a >= 1e4 || (a >= 1e3 && step >= 1e3):
		return trimZeros(strconv.FormatFloat(v/1e3, 'f', decimals(step/1e3), 64)) + "k"
	case a >= 1e3:
		return fmtInt(int64(math.Round(v)))
	default:
		return strconv.FormatFloat(v, 'f', decimals(step), 64)
	}
}

// fmtClock formats seconds since start for a time axis: 30s, 2m, 1m30s, 1h.
func fmtClock(sec, step float64) string {
	if !finite(sec) {
		return ""
	}
	if step < 1 || math.Abs(sec) < 60 {
		return fmtTick(sec, step) + "s"
	}
	neg := sec < 0
	s := int64(math.Round(math.Abs(sec)))
	h, m, ss := s/3600, s/60%60, s%60
	var b strings.Builder
	if neg {
		b.WriteByte('-')
	}
	if h > 0 {
		b.WriteString(strconv.FormatInt(h, 10) + "h")
	}
	if m > 0 {
		b.WriteString(strconv.FormatInt(m, 10) + "m")
	}
	if ss > 0 {
		b.WriteString(strconv.FormatInt(ss, 10) + "s")
	}
	return b.String()
}

// fmtSeconds formats a run length: "42.5 s", "120 s (2m0s)".
func fmtSeconds(sec float64) string {
	if !finite(sec) || sec < 0 {
		return dash
	}
	if sec < 60 {
		return trimZeros(strconv.FormatFloat(sec, 'f', 1, 64)) + " s"
	}
	d := time.Duration(math.Round(sec)) * time.Second
	return fmtNum(math.Round(sec)) + " s (" + d.String() + ")"
}

// fmtTime formats the start of a run, or a dash when unknown.
func fmtTime(t time.Time) string {
	if t.IsZero() {
		return dash
	}
	return t.Format("2006-01-02 15:04:05 MST")
}

// fmtPercent formats part/whole as a percentage.
func fmtPercent(part, whole int64) string {
	if whole <= 0 {
		return dash
	}
	p := 100 * float64(part) / float64(whole)
	switch {
	case p >= 10:
		return strconv.FormatFloat(p, 'f', 0, 64) + "%"
	default:
		return strconv.FormatFloat(p, 'f', 1, 64) + "%"
	}
}
