// Package report renders what a fleetkey simulator run measured as one
// self-contained HTML page: tables, and plots drawn as inline SVG. The page
// loads nothing from anywhere (no scripts, fonts or style sheets), so it
// opens offline and can be attached to a ticket or archived as is.
package report

import (
	"bytes"
	"cmp"
	"errors"
	"html/template"
	"io"
	"slices"
	"time"
)

// Report is what one run measured, ready to render.
type Report struct {
	Title   string // e.g. "fleetkey simulator: 10000 devices"
	Started time.Time
	Seconds float64  // run length
	Config  []KV     // the run's settings, shown as a table
	Summary []KV     // headline figures (devices, connected, published, acked, lost...)
	Valid   bool     // false when the generator saturated
	Invalid []string // why the run is invalid (shown prominently in red when !Valid)
	SLOs    []SLO    // objectives and whether met
	Phases  []Phase  // one per measured phase: tcp, tls, connack, fkx1, first_ack, e2e ...
	Series  Series   // per-second time series
	Errors  []Count  // errors by reason
	Attacks []Attack // attack scenarios and what the system did
}

// KV is one row of a two-column table.
type KV struct{ Key, Value string }

// SLO is one objective, what the run got, and whether that met it.
type SLO struct {
	Objective, Got string
	Met            bool
}

// Count is how often one error reason occurred.
type Count struct {
	Reason string
	Count  int64
}

// Phase holds overall percentiles (milliseconds) and per-second percentiles
// over time for one measured phase of a device's life.
type Phase struct {
	Name                     string
	Count                    int64
	P50, P90, P99, P999, Max float64 // ms
	Over                     []Point // per-second: T seconds since start, P50/P99 ms
}

// Point is one second of a phase: T seconds since start, P50/P99 in ms.
// A NaN percentile (no samples that second) leaves a gap in the plot.
type Point struct{ T, P50, P99 float64 }

// Series is the run's per-second time series. The columns may be shorter
// than T (or empty); only the common length is plotted.
type Series struct {
	T         []float64 // seconds since start, one per second
	Connected []float64 // devices connected at T
	Offered   []float64 // operations/s the schedule intended (connects + publishes)
	Achieved  []float64 // operations/s that completed
}

// Attack is one attack scenario and what the system did about it.
type Attack struct {
	Name    string // e.g. "expired certificate"
	Tries   int64
	Refused int64
	Reasons string // what the system said, e.g. "tls: expired certificate (x12)"
	Leaked  int64  // attempts that got through (must be 0)
	OK      bool
}

// Plot sizes, in SVG user units (the plots scale to the page width).
const (
	wideW, wideH   = 1000.0, 300.0
	smallW, smallH = 360.0, 230.0
)

// Write renders r as one self-contained HTML page. Nothing is written when
// rendering fails.
func Write(w io.Writer, r *Report) error {
	if r == nil {
		return errors.New("report: nil Report")
	}
	var buf bytes.Buffer
	if err := page.Execute(&buf, build(r)); err != nil {
		return err
	}
	_, err := w.Write(buf.Bytes())
	return err
}

// view is what the template reads: the report plus everything derived.
type view struct {
	R         *Report
	Started   string
	Duration  string
	SLOsMet   int
	Connected template.HTML // plots; empty when there is no data
	Rate      template.HTML
	Phases    []phaseView
	AnyOver   bool // some phase has per-second data
	ErrorBars template.HTML
	Errors    []errorRow
	ErrTotal  string
	Attacks   []attackView
	AttacksOK int
}

type phaseView struct {
	Name                     string
	Count                    string
	Empty                    bool // no samples at all
	P50, P90, P99, P999, Max string
	Plot                     template.HTML // empty when no per-second data
}

type errorRow struct {
	Reason, Count, Share string
}

type attackView struct {
	Attack
	Tries, Refused, Leaked string
	Pass                   bool // OK and nothing leaked
}

func build(r *Report) *view {
	v := &view{
		R:        r,
		Started:  fmtTime(r.Started),
		Duration: fmtSeconds(r.Seconds),
	}
	for _, s := range r.SLOs {
		if s.Met {
			v.SLOsMet++
		}
	}

	s := r.Series
	if svg, ok := (linePlot{
		title: "Devices connected", xLabel: "time since start", yLabel: "devices",
		w: wideW, h: wideH, xTicks: 10, yTicks: 5,
		lines: []line{{name: "connected", color: colBlue, fill: true, x: s.T, y: s.Connected}},
	}).svg(); ok {
		v.Connected = template.HTML(svg)
	}
	if svg, ok := (linePlot{
		title: "Offered vs achieved rate", xLabel: "time since start", yLabel: "operations/s",
		w: wideW, h: wideH, xTicks: 10, yTicks: 5,
		lines: []line{
			{name: "offered (schedule)", color: colGrey, dash: true, x: s.T, y: s.Offered},
			{name: "achieved", color: colGreen, x: s.T, y: s.Achieved},
		},
	}).svg(); ok {
		v.Rate = template.HTML(svg)
	}

	for _, p := range r.Phases {
		pv := phaseView{
			Name:  p.Name,
			Count: fmtInt(p.Count),
			Empty: p.Count <= 0,
			P50:   fmtMS(p.P50), P90: fmtMS(p.P90), P99: fmtMS(p.P99), P999: fmtMS(p.P999), Max: fmtMS(p.Max),
		}
		if pv.Empty {
			pv.P50, pv.P90, pv.P99, pv.P999, pv.Max = dash, dash, dash, dash, dash
		}
		t := make([]float64, len(p.Over))
		p50 := make([]float64, len(p.Over))
		p99 := make([]float64, len(p.Over))
		for i, q := range p.Over {
			t[i], p50[i], p99[i] = q.T, q.P50, q.P99
		}
		if svg, ok := (linePlot{
			title: p.Name, xLabel: "time since start", yLabel: "ms",
			w: smallW, h: smallH, xTicks: 4, yTicks: 4, logY: true,
			lines: []line{
				{name: "p50", color: colBlue, x: t, y: p50},
				{name: "p99", color: colRed, x: t, y: p99},
			},
		}).svg(); ok {
			pv.Plot = template.HTML(svg)
			v.AnyOver = true
		}
		v.Phases = append(v.Phases, pv)
	}

	var total int64
	for _, c := range r.Errors {
		total += max(c.Count, 0)
	}
	v.ErrTotal = fmtInt(total)
	if total > 0 {
		if svg, ok := barChart("Errors by reason", r.Errors, wideW); ok {
			v.ErrorBars = template.HTML(svg)
		}
	}
	errs := slices.Clone(r.Errors)
	slices.SortStableFunc(errs, func(a, b Count) int { return cmp.Compare(b.Count, a.Count) })
	for _, c := range errs {
		v.Errors = append(v.Errors, errorRow{c.Reason, fmtInt(c.Count), fmtPercent(max(c.Count, 0), total)})
	}

	for _, a := range r.Attacks {
		av := attackView{
			Attack: a,
			Tries:  fmtInt(a.Tries), Refused: fmtInt(a.Refused), Leaked: fmtInt(a.Leaked),
			Pass: a.OK && a.Leaked == 0,
		}
		if av.Pass {
			v.AttacksOK++
		}
		v.Attacks = append(v.Attacks, av)
	}
	return v
}

var page = template.Must(template.New("report").Parse(pageHTML))

const pageHTML = `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="fleetkey simulator report">
<title>{{.R.Title}}</title>
<style>
:root { --fg:#111827; --muted:#4b5563; --line:#e5e7eb; --bg:#ffffff; --panel:#f9fafb;
  --ok:#047857; --okbg:#ecfdf5; --bad:#b91c1c; --badbg:#fef2f2; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", "DejaVu Sans", "Liberation Sans", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 40px; }
h1 { font-size: 24px; margin: 0 0 4px; overflow-wrap: anywhere; }
h2 { font-size: 18px; margin: 0 0 10px; }
h3 { font-size: 14px; margin: 0 0 6px; }
section { margin: 22px 0; }
.meta { color: var(--muted); margin: 0; }
.badge { display:inline-block; padding: 1px 8px; border-radius: 999px; font-weight: 600; font-size: 12px; vertical-align: 2px; }
.badge.ok { color: var(--ok); background: var(--okbg); border: 1px solid #a7f3d0; }
.badge.bad { color: var(--bad); background: var(--badbg); border: 1px solid #fecaca; }
.invalid { border: 2px solid var(--bad); background: var(--badbg); color: var(--bad); border-radius: 8px; padding: 12px 18px; }
.invalid h2 { color: var(--bad); margin-bottom: 4px; }
.invalid ul { margin: 4px 0 0; padding-left: 20px; }
.invalid li { font-weight: 600; overflow-wrap: anywhere; }
.cols { display: grid; grid-template-columns: 1fr 1fr; gap: 24px; align-items: start; }
.cols > section { margin: 0; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 5px 10px; border-bottom: 1px solid var(--line); vertical-align: top; overflow-wrap: anywhere; }
th { background: var(--panel); font-weight: 600; color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .03em; }
td.num, th.num { text-align: right; white-space: nowrap; }
table.kv td:first-child { color: var(--muted); width: 40%; }
table.kv td:last-child { font-weight: 600; }
tr.met td.status, td.pass { color: var(--ok); font-weight: 700; }
tr.missed td.status, td.fail { color: var(--bad); font-weight: 700; }
tr.missed { background: var(--badbg); }
tr.leak { background: var(--badbg); }
td.leaked { color: var(--bad); font-weight: 700; }
.plot { display: block; width: 100%; height: auto; }
figure { margin: 0 0 12px; padding: 8px; border: 1px solid var(--line); border-radius: 8px; background: #fff; }
.small { display: grid; grid-template-columns: repeat(3, 1fr); gap: 12px; margin-top: 12px; }
.small figure { margin: 0; }
.nodata { color: var(--muted); font-style: italic; padding: 18px; border: 1px dashed #d1d5db; border-radius: 8px; background: var(--panel); text-align: center; }
.small .nodata { padding: 8px; margin: 0; display: flex; align-items: center; justify-content: center; min-height: 80px; }
.note { color: var(--muted); font-size: 12px; }
footer { color: var(--muted); font-size: 12px; margin-top: 28px; border-top: 1px solid var(--line); padding-top: 8px; }
@media (max-width: 800px) { .cols { grid-template-columns: 1fr; } .small { grid-template-columns: 1fr; } }
@media print { main { max-width: none; } figure, table { break-inside: avoid; } }
</style>
</head>
<body>
<main>
<header>
<h1>{{.R.Title}}</h1>
<p class="meta">Started {{.Started}} · ran {{.Duration}} ·
{{if .R.Valid}}<span class="badge ok">valid run</span>{{else}}<span class="badge bad">INVALID RUN</span>{{end}}
{{with .R.SLOs}} · <span class="badge {{if eq $.SLOsMet (len .)}}ok{{else}}bad{{end}}">{{$.SLOsMet}} of {{len .}} objectives met</span>{{end}}</p>
</header>

{{if not .R.Valid}}
<section class="invalid" id="invalid">
<h2>This run is invalid: its numbers do not describe the system under test</h2>
<ul>
{{range .R.Invalid}}<li>{{.}}</li>
{{else}}<li>no reason was recorded</li>
{{end}}</ul>
</section>
{{end}}

<div class="cols">
<section id="summary">
<h2>Summary</h2>
{{if .R.Summary}}<table class="kv"><tbody>
{{range .R.Summary}}<tr><td>{{.Key}}</td><td>{{.Value}}</td></tr>
{{end}}</tbody></table>
{{else}}<p class="nodata">no data: no summary figures recorded</p>{{end}}
</section>
<section id="slos">
<h2>Objectives</h2>
{{if .R.SLOs}}<table><thead><tr><th>objective</th><th>got</th><th>status</th></tr></thead><tbody>
{{range .R.SLOs}}<tr class="{{if .Met}}met{{else}}missed{{end}}"><td>{{.Objective}}</td><td>{{.Got}}</td><td class="status">{{if .Met}}✔ met{{else}}✘ missed{{end}}</td></tr>
{{end}}</tbody></table>
{{else}}<p class="nodata">no objectives were set</p>{{end}}
</section>
</div>

<section id="connections">
<h2>Connections</h2>
{{if .Connected}}<figure>{{.Connected}}</figure>
{{else}}<p class="nodata">no data: no connection time series recorded</p>{{end}}
</section>

<section id="rate">
<h2>Load: offered vs achieved</h2>
{{if .Rate}}<figure>{{.Rate}}</figure>
<p class="note">Offered is what the schedule intended (connects + publishes per second); achieved is what completed. A gap means the system, or the generator, fell behind.</p>
{{else}}<p class="nodata">no data: no rate time series recorded</p>{{end}}
</section>

<section id="phases">
<h2>Latency by phase</h2>
{{if .Phases}}<table><thead><tr><th>phase</th><th class="num">count</th><th class="num">p50</th><th class="num">p90</th><th class="num">p99</th><th class="num">p99.9</th><th class="num">max</th></tr></thead><tbody>
{{range .Phases}}<tr><td>{{.Name}}</td><td class="num">{{.Count}}</td><td class="num">{{.P50}}</td><td class="num">{{.P90}}</td><td class="num">{{.P99}}</td><td class="num">{{.P999}}</td><td class="num">{{.Max}}</td></tr>
{{end}}</tbody></table>
<p class="note">Latencies are measured from each device's intended start, so time spent waiting to be served counts.</p>
<h3>p50 and p99 per second</h3>
<div class="small">
{{range .Phases}}{{if .Plot}}<figure>{{.Plot}}</figure>
{{else}}<p class="nodata">{{.Name}}: no data</p>
{{end}}{{end}}</div>
{{else}}<p class="nodata">no data: no phases were measured</p>{{end}}
</section>

<section id="errors">
<h2>Errors ({{.ErrTotal}})</h2>
{{if .Errors}}{{if .ErrorBars}}<figure>{{.ErrorBars}}</figure>{{end}}
<table><thead><tr><th>reason</th><th class="num">count</th><th class="num">share</th></tr></thead><tbody>
{{range .Errors}}<tr><td>{{.Reason}}</td><td class="num">{{.Count}}</td><td class="num">{{.Share}}</td></tr>
{{end}}</tbody></table>
{{else}}<p class="nodata">no errors recorded</p>{{end}}
</section>

<section id="attacks">
<h2>Attacks{{with .R.Attacks}} ({{$.AttacksOK}} of {{len .}} refused cleanly){{end}}</h2>
{{if .Attacks}}<table><thead><tr><th>scenario</th><th class="num">tries</th><th class="num">refused</th><th class="num">leaked</th><th>what the system said</th><th>result</th></tr></thead><tbody>
{{range .Attacks}}<tr{{if not .Pass}} class="leak"{{end}}><td>{{.Name}}</td><td class="num">{{.Tries}}</td><td class="num">{{.Refused}}</td><td class="num{{if gt .Attack.Leaked 0}} leaked{{end}}">{{.Leaked}}</td><td>{{.Reasons}}</td>{{if .Pass}}<td class="pass">✔ OK</td>{{else}}<td class="fail">✘ {{if gt .Attack.Leaked 0}}LEAKED{{else}}FAILED{{end}}</td>{{end}}</tr>
{{end}}</tbody></table>
{{else}}<p class="nodata">no attack scenarios were run</p>{{end}}
</section>

<section id="config">
<h2>Configuration</h2>
{{if .R.Config}}<table class="kv"><tbody>
{{range .R.Config}}<tr><td>{{.Key}}</td><td>{{.Value}}</td></tr>
{{end}}</tbody></table>
{{else}}<p class="nodata">no data: no settings recorded</p>{{end}}
</section>

<footer>fleetkey simulator report · self-contained: no scripts, no external resources</footer>
</main>
</body>
</html>
`
