package simulator

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// An SLO is one objective a run must meet, such as "ready_p99<2s" or
// "loss=0" (--slo 'ready_p99<2s,loss=0').
type SLO struct {
	Metric string
	Op     string // <, <=, =
	Value  float64
	text   string
}

// sloMetrics are what an SLO may name, read off a Summary.
var sloMetrics = map[string]func(*Summary) float64{
	"enroll_p50": func(s *Summary) float64 { return s.EnrollP50MS },
	"enroll_p99": func(s *Summary) float64 { return s.EnrollP99MS },
	"ready_p50":  func(s *Summary) float64 { return s.ReadyP50MS },
	"ready_p99":  func(s *Summary) float64 { return s.ReadyP99MS },
	"loss":       func(s *Summary) float64 { return float64(s.Lost) },
	"duplicates": func(s *Summary) float64 { return float64(s.Duplicated) },
	"errors":     func(s *Summary) float64 { return float64(len(s.Errors)) },
	"unconnected": func(s *Summary) float64 {
		return float64(s.Devices - s.Connected)
	},
}

// durationMetrics take a duration ("2s", "150ms") and compare in ms.
func durationMetric(m string) bool {
	return strings.HasSuffix(m, "_p50") || strings.HasSuffix(m, "_p99")
}

// ParseSLOs reads a comma-separated list of objectives.
func ParseSLOs(spec string) ([]SLO, error) {
	var out []SLO
	for _, part := range strings.Split(spec, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		var op string
		for _, o := range []string{"<=", "<", "="} {
			if strings.Contains(part, o) {
				op = o
				break
			}
		}
		if op == "" {
			return nil, fmt.Errorf("SLO %q: want METRIC<VALUE, METRIC<=VALUE or METRIC=VALUE", part)
		}
		metric, value, _ := strings.Cut(part, op)
		metric, value = strings.TrimSpace(metric), strings.TrimSpace(value)
		if _, ok := sloMetrics[metric]; !ok {
			names := make([]string, 0, len(sloMetrics))
			for n := range sloMetrics {
				names = append(names, n)
			}
			return nil, fmt.Errorf("SLO %q: unknown metric %q (known: %s)", part, metric, strings.Join(names, ", "))
		}
		var v float64
		if durationMetric(metric) {
			d, err := time.ParseDuration(value)
			if err != nil || d < 0 {
				return nil, fmt.Errorf("SLO %q: %q is not a duration like 2s or 150ms", part, value)
			}
			v = float64(d) / float64(time.Millisecond)
		} else {
			n, err := strconv.ParseFloat(value, 64)
			if err != nil || n < 0 {
				return nil, fmt.Errorf("SLO %q: %q is not a count", part, value)
			}
			v = n
		}
		out = append(out, SLO{Metric: metric, Op: op, Value: v, text: part})
	}
	return out, nil
}

// Check returns the objectives the summary missed, each with what it got.
func Check(s *Summary, slos []SLO) []string {
	var missed []string
	for _, o := range slos {
		got := sloMetrics[o.Metric](s)
		ok := (o.Op == "<" && got < o.Value) || (o.Op == "<=" && got <= o.Value) || (o.Op == "=" && got == o.Value)
		if !ok {
			unit := ""
			if durationMetric(o.Metric) {
				unit = " ms"
			}
			missed = append(missed, fmt.Sprintf("%s: got %g%s", o.text, got, unit))
		}
	}
	return missed
}
