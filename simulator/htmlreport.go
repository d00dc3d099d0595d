package simulator

import (
	"bytes"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"sort"
	"strings"

	"fleetkey.dev/simulator/report"
)

// Brief is the summary without its time series, for a terminal.
func (s *Summary) Brief() *Summary {
	b := *s
	b.Series = Series{}
	b.Phases = map[string]PhaseStats{}
	for k, p := range s.Phases {
		p.Over = nil
		b.Phases[k] = p
	}
	return &b
}

// WriteReport writes the run's self-contained HTML report to path.
func WriteReport(path string, sum *Summary, cfg *RunConfig, slos []SLO) error {
	var buf bytes.Buffer
	if err := report.Write(&buf, reportOf(sum, cfg, slos)); err != nil {
		return fmt.Errorf("rendering the report: %w", err)
	}
	return os.WriteFile(path, buf.Bytes(), 0o644)
}

func reportOf(sum *Summary, cfg *RunConfig, slos []SLO) *report.Report {
	r := &report.Report{
		Title:   fmt.Sprintf("fleetkey simulator: %d devices, target %s", sum.Devices, sum.Target),
		Started: sum.Started, Seconds: sum.Seconds, Valid: sum.Valid, Invalid: sum.Invalid,
	}
	kv := func(list *[]report.KV, k string, v any) {
		*list = append(*list, report.KV{Key: k, Value: fmt.Sprint(v)})
	}
	identities := "enroll (EST)"
	if cfg.Identities != nil {
		identities = "fast (minted from the fleet CA)"
	}
	kv(&r.Config, "gateway", cfg.Gateway)
	kv(&r.Config, "target", cfg.Target)
	kv(&r.Config, "devices", cfg.Devices)
	kv(&r.Config, "arrival rate", fmt.Sprintf("%g/s", cfg.Rate))
	kv(&r.Config, "max handshakes in flight", cfg.MaxHandshakes)
	kv(&r.Config, "identities", identities)
	size := fmt.Sprintf("%d B", max(cfg.Payload, bodyHeader))
	if cfg.Template != "" {
		size = "template " + cfg.Template
	}
	kv(&r.Config, "telemetry", fmt.Sprintf("every %s, %s, QoS %d, channels %s, for %s", cfg.Interval, size, map[bool]int{false: 1, true: 0}[cfg.AtMostOnce], cfg.Channel, cfg.Duration))
	if cfg.Target == TargetFleetkey {
		kv(&r.Config, "fkx1", fmt.Sprintf("suite %d, epoch every %s, generation every %s", cfg.Suite, orDefault(cfg.Rotation.EpochEvery.String(), "1h"), orDefault(cfg.Rotation.GenerationEvery.String(), "10m")))
	}
	if cfg.CommandRate > 0 {
		kv(&r.Config, "commands", fmt.Sprintf("%g/s", cfg.CommandRate))
	}
	for _, f := range sum.Faults {
		kv(&r.Config, "fault", f)
	}
	kv(&r.Summary, "devices ready", fmt.Sprintf("%d of %d", sum.Connected, sum.Devices))
	kv(&r.Summary, "connections made", sum.Connects)
	if cfg.Target == TargetFleetkey {
		kv(&r.Summary, "fkx1 handshakes", sum.Handshakes)
	}
	kv(&r.Summary, "connects/s (arrival phase)", fmt.Sprintf("%.1f", sum.ConnectsPerS))
	kv(&r.Summary, "records published", sum.Published)
	kv(&r.Summary, "records acknowledged", sum.Acked)
	if cfg.Service != nil {
		kv(&r.Summary, "records received by the service", sum.Received)
	}
	if cfg.Sink != "" {
		kv(&r.Summary, "records in the gateway's sink", sum.InSink)
	}
	kv(&r.Summary, "messages/s", fmt.Sprintf("%.1f", sum.MessagesPerS))
	kv(&r.Summary, "lost", sum.Lost)
	kv(&r.Summary, "duplicated", sum.Duplicated)
	if sum.Commands > 0 {
		kv(&r.Summary, "commands received", sum.Commands)
	}
	kv(&r.Summary, "simulator RSS peak", fmt.Sprintf("%.1f MB (%.1f KB per device)%s", sum.RSSPeakMB, sum.RSSPerDeviceKB, inProcess(sum)))
	for _, p := range sum.Problems {
		kv(&r.Summary, "problem", p)
	}
	for _, o := range Evaluate(sum, slos) {
		r.SLOs = append(r.SLOs, report.SLO{Objective: o.Objective, Got: o.Got, Met: o.Met})
	}
	for _, name := range phaseOrder {
		p, ok := sum.Phases[name]
		if !ok {
			continue
		}
		ph := report.Phase{Name: phaseTitle[name], Count: p.Count, P50: p.P50MS, P90: p.P90MS, P99: p.P99MS, P999: p.P999MS, Max: p.MaxMS}
		for _, pt := range p.Over {
			ph.Over = append(ph.Over, report.Point{T: pt.T, P50: pt.P50MS, P99: pt.P99MS})
		}
		r.Phases = append(r.Phases, ph)
	}
	r.Series = report.Series{T: sum.Series.T, Connected: sum.Series.Connected, Offered: sum.Series.Offered, Achieved: sum.Series.Achieved}
	for reason, n := range sum.Errors {
		r.Errors = append(r.Errors, report.Count{Reason: reason, Count: n})
	}
	sort.Slice(r.Errors, func(i, j int) bool { return r.Errors[i].Count > r.Errors[j].Count })
	for _, a := range sum.Attacks {
		var seen []string
		for _, k := range slices.Sorted(maps.Keys(a.Seen)) {
			seen = append(seen, fmt.Sprintf("%s (x%d)", k, a.Seen[k]))
		}
		for _, k := range slices.Sorted(maps.Keys(a.Gateway)) {
			seen = append(seen, fmt.Sprintf("gateway %s (x%d)", k, a.Gateway[k]))
		}
		r.Attacks = append(r.Attacks, report.Attack{Name: a.Name, Tries: a.Tries, Refused: a.Refused, Leaked: a.Leaked, OK: a.OK,
			Reasons: strings.Join(seen, "; ") + " — " + a.Verdict})
	}
	return r
}

var phaseTitle = map[string]string{
	PhaseEnroll: "enroll (EST)", PhaseTCP: "tcp connected", PhaseTLS: "tls done", PhaseConnack: "connack", PhaseFKX1: "fkx1 keys ready",
	PhaseFirstAck: "first ack", PhaseAck: "publish → ack", PhaseE2E: "end to end", PhaseCommand: "command to device",
	PhaseRevoked: "revoked → out", PhaseLag: "schedule lag (generator)",
}

func inProcess(sum *Summary) string {
	if sum.StackInProcess {
		return ", the stack in the same process included"
	}
	return ""
}

func orDefault(s, def string) string {
	if s == "0s" || s == "" {
		return def
	}
	return s
}

// WriteText writes the summary for a terminal: the headline figures, the
// phases, errors, faults and attacks.
func WriteText(w io.Writer, sum *Summary) {
	valid := "valid"
	if !sum.Valid {
		valid = "INVALID: " + strings.Join(sum.Invalid, "; ")
	}
	fmt.Fprintf(w, "%d devices (%s), %d ready, %d connections, %d fkx1 handshakes, %.0f s, run %s\n",
		sum.Devices, sum.Target, sum.Connected, sum.Connects, sum.Handshakes, sum.Seconds, valid)
	fmt.Fprintf(w, "records: %d published, %d acknowledged, %d received by the service, %d in the sink; %d lost, %d duplicated; %.1f msg/s\n",
		sum.Published, sum.Acked, sum.Received, sum.InSink, sum.Lost, sum.Duplicated, sum.MessagesPerS)
	if sum.Commands > 0 {
		fmt.Fprintf(w, "commands: %d received by devices\n", sum.Commands)
	}
	fmt.Fprintf(w, "simulator RSS peak %.0f MB (%.1f KB per device)%s\n", sum.RSSPeakMB, sum.RSSPerDeviceKB, inProcess(sum))
	fmt.Fprintf(w, "%-26s %9s %10s %10s %10s %10s\n", "phase (ms, from intended)", "count", "p50", "p99", "p99.9", "max")
	for _, name := range phaseOrder {
		if p, ok := sum.Phases[name]; ok {
			fmt.Fprintf(w, "%-26s %9d %10.2f %10.2f %10.2f %10.2f\n", phaseTitle[name], p.Count, p.P50MS, p.P99MS, p.P999MS, p.MaxMS)
		}
	}
	for _, k := range slices.Sorted(maps.Keys(sum.Errors)) {
		fmt.Fprintf(w, "error  %6d  %s\n", sum.Errors[k], k)
	}
	for _, f := range sum.Faults {
		fmt.Fprintf(w, "fault  %s\n", f)
	}
	for _, a := range sum.Attacks {
		ok := "refused"
		if !a.OK {
			ok = "FAILED"
		}
		var gw []string
		for _, k := range slices.Sorted(maps.Keys(a.Gateway)) {
			gw = append(gw, fmt.Sprintf("%s x%d", k, a.Gateway[k]))
		}
		fmt.Fprintf(w, "attack %-18s %s: %s (gateway: %s)\n", a.Name, ok, a.Verdict, strings.Join(gw, ", "))
	}
	for _, n := range sum.Notes {
		fmt.Fprintf(w, "note   %s\n", n)
	}
	for _, p := range sum.Problems {
		fmt.Fprintf(w, "PROBLEM %s\n", p)
	}
}
