package simulator

import (
	"fmt"
	"slices"
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
	"enroll_p50":  func(s *Summary) float64 { return s.EnrollP50MS },
	"enroll_p99":  func(s *Summary) float64 { return s.EnrollP99MS },
	"ready_p50":   func(s *Summary) float64 { return s.ReadyP50MS },
	"ready_p99":   func(s *Summary) float64 { return s.ReadyP99MS },
	"loss":        func(s *Summary) float64 { return float64(s.Lost) },
	"duplicates":  func(s *Summary) float64 { return float64(s.Duplicated) },
	"connect_p50": func(s *Summary) float64 { return s.ReadyP50MS },
	"connect_p99": func(s *Summary) float64 { return s.ReadyP99MS },
	"errors":      func(s *Summary) float64 { return float64(sumCounts(s.Errors)) },
	"unconnected": func(s *Summary) float64 {
		return float64(s.Devices - s.Connected)
	},
	"leaks": func(s *Summary) float64 {
		var n int64
		for _, a := range s.Attacks {
			n += a.Leaked
		}
		return float64(n)
	},
	"attacks_failed": func(s *Summary) float64 {
		n := 0
		for _, a := range s.Attacks {
			if !a.OK {
				n++
			}
		}
		return float64(n)
	},
	"invalid": func(s *Summary) float64 {
		if s.Valid {
			return 0
		}
		return 1
	},
	"messages_per_s": func(s *Summary) float64 { return s.MessagesPerS },
}

func init() {
	// Every phase's percentiles: tcp_p99, fkx1_p50, e2e_p999, ...
	for _, p := range phaseOrder {
		for q, get := range map[string]func(PhaseStats) float64{
			"_p50": func(ps PhaseStats) float64 { return ps.P50MS }, "_p90": func(ps PhaseStats) float64 { return ps.P90MS },
			"_p99": func(ps PhaseStats) float64 { return ps.P99MS }, "_p999": func(ps PhaseStats) float64 { return ps.P999MS },
			"_max": func(ps PhaseStats) float64 { return ps.MaxMS },
		} {
			if _, ok := sloMetrics[p+q]; !ok {
				sloMetrics[p+q] = func(s *Summary) float64 { return get(s.Phases[p]) }
			}
		}
	}
}

// durationMetrics take a duration ("2s", "150ms") and compare in ms.
func durationMetric(m string) bool {
	for _, q := range []string{"_p50", "_p90", "_p99", "_p999", "_max"} {
		if strings.HasSuffix(m, q) {
			return true
		}
	}
	return false
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
			names := []string{}
			for n := range sloMetrics {
				if !durationMetric(n) || strings.HasPrefix(n, "connect_") || strings.HasPrefix(n, "ready_") || strings.HasPrefix(n, "enroll_") {
					names = append(names, n)
				}
			}
			slices.Sort(names)
			return nil, fmt.Errorf("SLO %q: unknown metric %q (known: %s, and PHASE_p50|p90|p99|p999|max for the phases %s)", part, metric,
				strings.Join(names, ", "), strings.Join(phaseOrder, ", "))
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

// SLOResult is one objective and what the run got.
type SLOResult struct {
	Objective, Got string
	Met            bool
}

// Evaluate checks every objective against the summary.
func Evaluate(s *Summary, slos []SLO) []SLOResult {
	var out []SLOResult
	for _, o := range slos {
		got := sloMetrics[o.Metric](s)
		ok := (o.Op == "<" && got < o.Value) || (o.Op == "<=" && got <= o.Value) || (o.Op == "=" && got == o.Value)
		unit := ""
		if durationMetric(o.Metric) {
			unit = " ms"
		}
		out = append(out, SLOResult{Objective: o.text, Got: fmt.Sprintf("%g%s", got, unit), Met: ok})
	}
	return out
}

// Check returns the objectives the summary missed, each with what it got.
func Check(s *Summary, slos []SLO) []string {
	var missed []string
	for _, r := range Evaluate(s, slos) {
		if !r.Met {
			missed = append(missed, fmt.Sprintf("%s: got %s", r.Objective, r.Got))
		}
	}
	return missed
}
