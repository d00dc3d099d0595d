package report

import (
	"cmp"
	"html"
	"math"
	"slices"
	"strconv"
	"strings"
)

// maxPoints bounds how many points one line of a plot draws; longer lines
// are downsampled keeping each bucket's minimum and maximum, so that
// spikes survive.
const maxPoints = 1000

// Colours shared by the page and its plots.
const (
	colBlue   = "#2563eb"
	colRed    = "#dc2626"
	colGreen  = "#059669"
	colGrey   = "#6b7280"
	colAxis   = "#374151"
	colGrid   = "#e5e7eb"
	colText   = "#111827"
	colMuted  = "#4b5563"
	charWidth = 6.6 // rough width of one character of 12px sans-serif text
)

// A line is one named series of a line plot.
type line struct {
	name  string
	color string
	dash  bool // dashed stroke
	fill  bool // shade the area under the line (linear scales only)
	x, y  []float64
}

// A linePlot is a line chart drawn as SVG.
type linePlot struct {
	title  string
	xLabel string
	yLabel string
	w, h   float64
	xTicks int  // roughly how many x ticks
	yTicks int  // roughly how many y ticks
	logY   bool // allow a log y axis when the data spans decades
	lines  []line
}

// esc escapes s for SVG text and attribute values.
func esc(s string) string { return html.EscapeString(s) }

// f1 formats a coordinate; non-finite values become 0 so that no NaN can
// reach the page.
func f1(v float64) string {
	if !finite(v) {
		return "0"
	}
	return strconv.FormatFloat(v, 'f', 1, 64)
}

// truncate shortens s to at most n runes, marking the cut with an ellipsis.
func truncate(s string, n int) string {
	r := []rune(s)
	if n < 1 {
		n = 1
	}
	if len(r) <= n {
		return s
	}
	return string(r[:n-1]) + "…"
}

// textWidth estimates the rendered width of s at the given font size.
func textWidth(s string, size float64) float64 {
	return float64(len([]rune(s))) * charWidth * size / 12
}

// pt is one point of a line.
type pt struct{ x, y float64 }

// points pairs x and y, dropping non-finite entries (a nil entry breaks the
// line there) and downsampling long lines.
func points(x, y []float64) [][]pt {
	n := min(len(x), len(y))
	var segs [][]pt
	var cur []pt
	for i := range n {
		xv, okx := clean(x[i])
		yv, oky := clean(y[i])
		if !okx || !oky {
			if len(cur) > 0 {
				segs = append(segs, cur)
				cur = nil
			}
			continue
		}
		cur = append(cur, pt{xv, yv})
	}
	if len(cur) > 0 {
		segs = append(segs, cur)
	}
	total := 0
	for _, s := range segs {
		total += len(s)
	}
	if total <= maxPoints {
		return segs
	}
	// Each bucket of k points contributes at most two: its minimum and
	// maximum, in their original order.
	k := int(math.Ceil(float64(total) / float64(maxPoints/2)))
	for i, s := range segs {
		segs[i] = minMax(s, k)
	}
	return segs
}

// minMax keeps the lowest and highest point of every k consecutive points.
func minMax(s []pt, k int) []pt {
	if k <= 1 || len(s) <= 2 {
		return s
	}
	out := make([]pt, 0, 2*(len(s)/k+1))
	for i := 0; i < len(s); i += k {
		b := s[i:min(i+k, len(s))]
		lo, hi := 0, 0
		for j, p := range b {
			if p.y < b[lo].y {
				lo = j
			}
			if p.y > b[hi].y {
				hi = j
			}
		}
		switch {
		case lo == hi:
			out = append(out, b[lo])
		case lo < hi:
			out = append(out, b[lo], b[hi])
		default:
			out = append(out, b[hi], b[lo])
		}
	}
	return out
}

// niceStep is a step of 1, 2 or 5 times a power of ten that cuts span into
// about n parts.
func niceStep(span float64, n int) float64 {
	if !(span > 0) || !finite(span) || n < 1 {
		return 1
	}
	raw := span / float64(n)
	mag := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 5} {
		if raw <= m*mag*1.0000001 {
			return m * mag
		}
	}
	return 10 * mag
}

// timeStep is like niceStep but prefers steps that read well on a clock.
func timeStep(span float64, n int) float64 {
	if !(span > 0) || !finite(span) || n < 1 {
		return 1
	}
	raw := span / float64(n)
	if raw < 1 {
		return niceStep(span, n)
	}
	for _, s := range []float64{1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400} {
		if raw <= s {
			return s
		}
	}
	return 86400 * niceStep(raw/86400, 1)
}

// ticks lists the multiples of step within [lo, hi].
func ticks(lo, hi, step float64) []float64 {
	if !(step > 0) || !finite(lo) || !finite(hi) || hi < lo {
		return nil
	}
	first := math.Ceil(lo/step - 1e-9)
	last := math.Floor(hi/step + 1e-9)
	if !finite(first) || !finite(last) || last-first > 100 {
		return nil
	}
	var out []float64
	for i := first; i <= last; i++ {
		out = append(out, i*step)
	}
	return out
}

// A scale maps data values to pixels along one axis.
type scale struct {
	lo, hi float64 // data domain
	a, b   float64 // pixel range (a at lo, b at hi)
	log    bool
}

func (s scale) at(v float64) float64 {
	var f float64
	if s.log {
		v = math.Max(v, s.lo)
		f = (math.Log10(v) - math.Log10(s.lo)) / (math.Log10(s.hi) - math.Log10(s.lo))
	} else {
		f = (v - s.lo) / (s.hi - s.lo)
	}
	if !finite(f) {
		f = 0
	}
	return s.a + f*(s.b-s.a)
}

// tick is one labelled position on an axis.
type tick struct {
	v     float64
	label string
	major bool
}

// linearY picks a zero-based (when possible) linear y domain and its ticks.
func linearY(ymin, ymax float64, n int) (lo, hi float64, ts []tick) {
	lo, hi = math.Min(0, ymin), math.Max(0, ymax)
	if hi-lo <= 0 {
		hi = lo + 1
	}
	step := niceStep(hi-lo, n)
	lo = math.Floor(lo/step) * step
	hi = math.Ceil(hi/step-1e-9) * step
	if hi <= lo {
		hi = lo + step
	}
	for _, v := range ticks(lo, hi, step) {
		ts = append(ts, tick{v, fmtTick(v, step), true})
	}
	return lo, hi, ts
}

// logY picks a decade-aligned log y domain for positive data and its
// ticks, for an axis height pixels tall.
func logY(minPos, maxPos, height float64) (lo, hi float64, ts []tick) {
	elo := int(math.Floor(math.Log10(minPos)))
	ehi := int(math.Ceil(math.Log10(maxPos)))
	if ehi <= elo {
		ehi = elo + 1
	}
	lo, hi = math.Pow10(elo), math.Pow10(ehi)
	// Label 2× and 5× a decade only when decades are tall enough for
	// three labels; else they get grid lines only.
	few := height/float64(ehi-elo) >= 60
	for e := elo; e <= ehi; e++ {
		d := math.Pow10(e)
		ts = append(ts, tick{d, fmtTick(d, d), true})
		if e == ehi {
			break
		}
		for _, m := range []float64{2, 5} {
			v := m * d
			label := ""
			if few {
				label = fmtTick(v, d)
			}
			ts = append(ts, tick{v, label, false})
		}
	}
	return lo, hi, ts
}

// svg renders the plot, or returns ok=false when there is nothing to draw.
func (p linePlot) svg() (out string, ok bool) {
	type drawn struct {
		line
		segs [][]pt
	}
	var ls []drawn
	xmin, xmax := math.Inf(1), math.Inf(-1)
	ymin, ymax := math.Inf(1), math.Inf(-1)
	minPos, maxPos := math.Inf(1), math.Inf(-1)
	for _, l := range p.lines {
		segs := points(l.x, l.y)
		if len(segs) == 0 {
			continue
		}
		ls = append(ls, drawn{l, segs})
		for _, s := range segs {
			for _, q := range s {
				xmin, xmax = math.Min(xmin, q.x), math.Max(xmax, q.x)
				ymin, ymax = math.Min(ymin, q.y), math.Max(ymax, q.y)
				if q.y > 0 {
					minPos, maxPos = math.Min(minPos, q.y), math.Max(maxPos, q.y)
				}
			}
		}
	}
	if len(ls) == 0 {
		return "", false
	}

	const ml, mr, mt, mb = 64.0, 18.0, 40.0, 44.0
	x0, x1, y0, y1 := ml, p.w-mr, mt, p.h-mb

	// x: the data's own range, ticks on round times.
	if xmax <= xmin {
		xmin, xmax = xmin-0.5, xmax+0.5
	}
	xs := scale{lo: xmin, hi: xmax, a: x0, b: x1}
	xstep := timeStep(xmax-xmin, max(p.xTicks, 2))
	var xts []tick
	for _, v := range ticks(xmin, xmax, xstep) {
		xts = append(xts, tick{v, fmtClock(v, xstep), true})
	}

	// y: log when the data is positive and spans decades, else linear.
	ys := scale{a: y1, b: y0}
	var yts []tick
	if p.logY && ymin > 0 && maxPos/minPos >= 20 {
		ys.log = true
		ys.lo, ys.hi, yts = logY(minPos, maxPos, y1-y0)
	} else {
		ys.lo, ys.hi, yts = linearY(ymin, ymax, max(p.yTicks, 2))
	}

	var b strings.Builder
	b.WriteString(`<svg xmlns="http://www.w3.org/2000/svg" class="plot" viewBox="0 0 ` + f1(p.w) + ` ` + f1(p.h) +
		`" role="img" aria-label="` + esc(p.title) + `" font-family="inherit" font-size="12">`)
	b.WriteString(`<title>` + esc(p.title) + `</title>`)

	// Grid and tick labels.
	for _, t := range yts {
		y := ys.at(t.v)
		col := colGrid
		if !t.major {
			col = "#f3f4f6"
		}
		b.WriteString(`<line x1="` + f1(x0) + `" x2="` + f1(x1) + `" y1="` + f1(y) + `" y2="` + f1(y) + `" stroke="` + col + `"/>`)
		if t.label != "" {
			b.WriteString(`<text x="` + f1(x0-6) + `" y="` + f1(y+4) + `" text-anchor="end" fill="` + colMuted + `" font-size="11">` + esc(t.label) + `</text>`)
		}
	}
	for _, t := range xts {
		x := xs.at(t.v)
		b.WriteString(`<line x1="` + f1(x) + `" x2="` + f1(x) + `" y1="` + f1(y0) + `" y2="` + f1(y1) + `" stroke="` + colGrid + `"/>`)
		b.WriteString(`<line x1="` + f1(x) + `" x2="` + f1(x) + `" y1="` + f1(y1) + `" y2="` + f1(y1+4) + `" stroke="` + colAxis + `"/>`)
		b.WriteString(`<text x="` + f1(x) + `" y="` + f1(y1+17) + `" text-anchor="middle" fill="` + colMuted + `" font-size="11">` + esc(t.label) + `</text>`)
	}

	// Lines.
	for _, l := range ls {
		for _, s := range l.segs {
			if len(s) == 1 {
				b.WriteString(`<circle cx="` + f1(xs.at(s[0].x)) + `" cy="` + f1(ys.at(s[0].y)) + `" r="2.5" fill="` + l.color + `"/>`)
				continue
			}
			var d strings.Builder
			for i, q := range s {
				if i == 0 {
					d.WriteString("M")
				} else {
					d.WriteString("L")
				}
				d.WriteString(f1(xs.at(q.x)) + " " + f1(ys.at(q.y)))
			}
			if l.fill && !ys.log {
				base := ys.at(math.Max(ys.lo, math.Min(0, ys.hi)))
				area := d.String() + "L" + f1(xs.at(s[len(s)-1].x)) + " " + f1(base) + "L" + f1(xs.at(s[0].x)) + " " + f1(base) + "Z"
				b.WriteString(`<path d="` + area + `" fill="` + l.color + `" fill-opacity="0.12" stroke="none"/>`)
			}
			dash := ""
			if l.dash {
				dash = ` stroke-dasharray="6 4"`
			}
			b.WriteString(`<path d="` + d.String() + `" fill="none" stroke="` + l.color + `" stroke-width="1.8" stroke-linejoin="round" stroke-linecap="round"` + dash + `/>`)
		}
	}

	// Axes.
	b.WriteString(`<line x1="` + f1(x0) + `" x2="` + f1(x0) + `" y1="` + f1(y0) + `" y2="` + f1(y1) + `" stroke="` + colAxis + `"/>`)
	b.WriteString(`<line x1="` + f1(x0) + `" x2="` + f1(x1) + `" y1="` + f1(y1) + `" y2="` + f1(y1) + `" stroke="` + colAxis + `"/>`)
	b.WriteString(`<text x="` + f1((x0+x1)/2) + `" y="` + f1(p.h-8) + `" text-anchor="middle" fill="` + colText + `">` + esc(p.xLabel) + `</text>`)
	ylabel := p.yLabel
	if ys.log {
		ylabel += " (log)"
	}
	b.WriteString(`<text transform="translate(14 ` + f1((y0+y1)/2) + `) rotate(-90)" text-anchor="middle" fill="` + colText + `">` + esc(ylabel) + `</text>`)

	// Legend, right-aligned on the title row; the title gets what is left.
	names := make([]string, len(ls))
	colors := make([]string, len(ls))
	dashes := make([]bool, len(ls))
	for i, l := range ls {
		names[i], colors[i], dashes[i] = l.name, l.color, l.dash
	}
	legendW := writeLegend(&b, p.w-mr, 20, names, colors, dashes)
	// 14px bold text runs wider than textWidth's estimate: allow 30% more.
	room := int((p.w - mr - legendW - 32 - 8) / (charWidth * 14 / 12 * 1.3))
	b.WriteString(`<text x="8" y="24" font-size="14" font-weight="600" fill="` + colText + `">` + esc(truncate(p.title, room)) + `</text>`)
	b.WriteString(`</svg>`)
	return b.String(), true
}

// writeLegend draws legend entries ending at x right, centred on y, and
// returns the width used.
func writeLegend(b *strings.Builder, right, y float64, names, colors []string, dashes []bool) float64 {
	x := right
	for i := len(names) - 1; i >= 0; i-- {
		name := truncate(names[i], 28)
		tw := textWidth(name, 12)
		x -= tw
		b.WriteString(`<text x="` + f1(x) + `" y="` + f1(y+4) + `" fill="` + colText + `">` + esc(name) + `</text>`)
		x -= 26
		dash := ""
		if dashes[i] {
			dash = ` stroke-dasharray="6 4"`
		}
		b.WriteString(`<line x1="` + f1(x) + `" x2="` + f1(x+20) + `" y1="` + f1(y) + `" y2="` + f1(y) + `" stroke="` + colors[i] + `" stroke-width="3"` + dash + `/>`)
		x -= 16
	}
	return right - x - 16
}

// maxBars is how many reasons the error chart shows; the rest are summed.
const maxBars = 15

// barChart renders counts as a horizontal bar chart, largest first, or
// returns ok=false when there is nothing to draw.
func barChart(title string, counts []Count, w float64) (out string, ok bool) {
	cs := slices.Clone(counts)
	slices.SortStableFunc(cs, func(a, b Count) int { return cmp.Compare(b.Count, a.Count) })
	if len(cs) == 0 {
		return "", false
	}
	if len(cs) > maxBars {
		var rest int64
		for _, c := range cs[maxBars-1:] {
			rest += max(c.Count, 0)
		}
		n := len(cs) - (maxBars - 1)
		cs = append(cs[:maxBars-1:maxBars-1], Count{Reason: "(" + fmtInt(int64(n)) + " other reasons)", Count: rest})
	}
	var top int64
	longest := 0
	for _, c := range cs {
		top = max(top, c.Count)
		longest = max(longest, len([]rune(c.Reason)))
	}
	labelChars := min(longest, 48)
	const mt, mb, mr, row = 40.0, 40.0, 70.0, 26.0
	ml := math.Max(90, float64(labelChars)*charWidth+20)
	h := mt + row*float64(len(cs)) + mb
	x0, x1 := ml, w-mr
	y0, y1 := mt, mt+row*float64(len(cs))

	hi := float64(max(top, 1))
	step := math.Max(1, niceStep(hi, 6))
	hi = math.Ceil(hi/step-1e-9) * step
	xs := scale{lo: 0, hi: hi, a: x0, b: x1}

	var b strings.Builder
	b.WriteString(`<svg xmlns="http://www.w3.org/2000/svg" class="plot" viewBox="0 0 ` + f1(w) + ` ` + f1(h) +
		`" role="img" aria-label="` + esc(title) + `" font-family="inherit" font-size="12">`)
	b.WriteString(`<title>` + esc(title) + `</title>`)
	for _, v := range ticks(0, hi, step) {
		x := xs.at(v)
		b.WriteString(`<line x1="` + f1(x) + `" x2="` + f1(x) + `" y1="` + f1(y0) + `" y2="` + f1(y1) + `" stroke="` + colGrid + `"/>`)
		b.WriteString(`<text x="` + f1(x) + `" y="` + f1(y1+17) + `" text-anchor="middle" fill="` + colMuted + `" font-size="11">` + esc(fmtTick(v, step)) + `</text>`)
	}
	for i, c := range cs {
		y := y0 + row*float64(i)
		bw := xs.at(float64(max(c.Count, 0))) - x0
		if c.Count > 0 {
			bw = math.Max(bw, 1)
		}
		b.WriteString(`<g><title>` + esc(c.Reason) + `: ` + esc(fmtInt(c.Count)) + `</title>`)
		b.WriteString(`<rect x="` + f1(x0) + `" y="` + f1(y+4) + `" width="` + f1(bw) + `" height="` + f1(row-8) + `" fill="` + colRed + `" fill-opacity="0.8"/>`)
		b.WriteString(`<text x="` + f1(x0-8) + `" y="` + f1(y+row/2+4) + `" text-anchor="end" fill="` + colText + `">` + esc(truncate(c.Reason, labelChars)) + `</text>`)
		b.WriteString(`<text x="` + f1(x0+bw+6) + `" y="` + f1(y+row/2+4) + `" fill="` + colText + `" font-weight="600">` + esc(fmtInt(c.Count)) + `</text>`)
		b.WriteString(`</g>`)
	}
	b.WriteString(`<line x1="` + f1(x0) + `" x2="` + f1(x0) + `" y1="` + f1(y0) + `" y2="` + f1(y1) + `" stroke="` + colAxis + `"/>`)
	b.WriteString(`<line x1="` + f1(x0) + `" x2="` + f1(x1) + `" y1="` + f1(y1) + `" y2="` + f1(y1) + `" stroke="` + colAxis + `"/>`)
	b.WriteString(`<text x="` + f1((x0+x1)/2) + `" y="` + f1(h-6) + `" text-anchor="middle" fill="` + colText + `">occurrences</text>`)
	// Legend: a swatch for the bars.
	lg := "errors by reason"
	lx := w - mr - textWidth(lg, 12)
	b.WriteString(`<rect x="` + f1(lx-26) + `" y="13" width="20" height="12" fill="` + colRed + `" fill-opacity="0.8"/>`)
	b.WriteString(`<text x="` + f1(lx) + `" y="24" fill="` + colText + `">` + lg + `</text>`)
	b.WriteString(`<text x="8" y="24" font-size="14" font-weight="600" fill="` + colText + `">` + esc(title) + `</text>`)
	b.WriteString(`</svg>`)
	return b.String(), true
}
