package report

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"image/png"
	"math"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// realistic is a 120 s run of 10000 devices that saturated its generator
// and missed one objective.
func realistic() *Report {
	r := &Report{
		Title:   "fleetkey simulator: 10000 devices",
		Started: time.Date(2025, 3, 14, 9, 26, 53, 0, time.UTC),
		Seconds: 120,
		Config: []KV{
			{"devices", "10000"}, {"rate", "500/s"}, {"schedule", "ramp:20s"},
			{"duration", "1m40s"}, {"interval", "1s"}, {"payload", "64 B"},
			{"suite", "1"}, {"gateway", "127.0.0.1:8883"}, {"identities", "fast"},
		},
		Summary: []KV{
			{"devices", "10,000"}, {"connected", "9,987"}, {"published", "912,345"},
			{"acked", "912,301"}, {"lost", "44"}, {"duplicated", "0"},
		},
		Valid:   false,
		Invalid: []string{"generator saturated: achieved 9,012 ops/s of 10,500 offered from t=90s (load generator CPU 100%)"},
		SLOs: []SLO{
			{Objective: "ready_p99<2s", Got: "1,234 ms", Met: true},
			{Objective: "loss=0", Got: "44", Met: false},
			{Objective: "unconnected=0", Got: "0", Met: true},
		},
		Errors: []Count{
			{"tls: handshake timeout", 123},
			{"connack: server unavailable", 45},
			{"dial tcp 127.0.0.1:8883: connect: connection refused", 12345},
			{"publish: ack timeout after 5s", 7},
		},
		Attacks: []Attack{
			{Name: "expired certificate", Tries: 12, Refused: 12, Reasons: "tls: expired certificate (x12)", OK: true},
			{Name: "revoked certificate", Tries: 12, Refused: 12, Reasons: "tls: revoked certificate (x12)", OK: true},
			{Name: "replayed fkx1 message", Tries: 50, Refused: 49, Reasons: "fkx1: replay (x49)", Leaked: 1},
			{Name: "device from another fleet", Tries: 10, Refused: 10, Reasons: "tls: unknown certificate authority (x10)", OK: true},
		},
	}
	s := &r.Series
	for i := range 120 {
		t := float64(i)
		conn := math.Min(t*500, 10000)
		if i >= 60 && i < 66 { // a gateway restart
			conn = 7000 + 500*float64(i-60)
		}
		offered := conn + 500*float64(boolInt(i < 20))
		achieved := offered * (0.98 + 0.02*math.Sin(t/3))
		if i >= 90 {
			achieved = 9000 + 50*math.Sin(t)
		}
		s.T = append(s.T, t)
		s.Connected = append(s.Connected, conn)
		s.Offered = append(s.Offered, offered)
		s.Achieved = append(s.Achieved, achieved)
	}
	phases := []struct {
		name     string
		p50, p99 float64
	}{
		{"tcp", 0.3, 2.1}, {"tls", 4.2, 25}, {"connack", 1.1, 8.5},
		{"fkx1", 2.5, 15}, {"first_ack", 3.3, 41}, {"e2e", 5.2, 130},
	}
	for k, ph := range phases {
		p := Phase{Name: ph.name, Count: 10000 + int64(k)*123456,
			P50: ph.p50, P90: ph.p99 * 0.5, P99: ph.p99, P999: ph.p99 * 2.5, Max: ph.p99 * 7.3}
		for i := range 120 {
			t := float64(i)
			w := 1 + 0.3*math.Sin(t/7+float64(k))
			if i >= 90 {
				w *= 3
			}
			pt := Point{T: t, P50: ph.p50 * w, P99: ph.p99 * w * (1 + 0.2*math.Cos(t/2))}
			if ph.name == "first_ack" && i >= 60 && i < 64 { // no samples
				pt.P50, pt.P99 = math.NaN(), math.NaN()
			}
			p.Over = append(p.Over, pt)
		}
		r.Phases = append(r.Phases, p)
	}
	// A phase that never happened: a row of dashes and a "no data" note.
	r.Phases = append(r.Phases, Phase{Name: "enroll"})
	return r
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// wantSVGs is how many plots realistic() draws: connections, rate, six
// phases (enroll has no data) and errors.
const wantSVGs = 2 + 6 + 1

func render(t *testing.T, r *Report) string {
	t.Helper()
	var b bytes.Buffer
	if err := Write(&b, r); err != nil {
		t.Fatalf("Write: %v", err)
	}
	return b.String()
}

// voidElements never have end tags.
var voidElements = map[string]bool{
	"area": true, "base": true, "br": true, "col": true, "embed": true, "hr": true, "img": true,
	"input": true, "link": true, "meta": true, "source": true, "track": true, "wbr": true,
}

var tagRE = regexp.MustCompile(`<(/?)([a-zA-Z][a-zA-Z0-9-]*)([^<>]*)>`)

// checkBalanced checks that every element is closed, in order; it is not a
// full HTML parser but catches the mistakes a template can make.
func checkBalanced(t *testing.T, doc string) {
	t.Helper()
	var stack []string
	for _, m := range tagRE.FindAllStringSubmatch(doc, -1) {
		closing, name, rest := m[1] == "/", strings.ToLower(m[2]), m[3]
		switch {
		case voidElements[name] && !closing:
		case strings.HasSuffix(rest, "/"):
		case !closing:
			stack = append(stack, name)
		case len(stack) == 0 || stack[len(stack)-1] != name:
			t.Fatalf("</%s> does not close the open element (open: %v)", name, stack)
		default:
			stack = stack[:len(stack)-1]
		}
	}
	if len(stack) != 0 {
		t.Fatalf("unclosed elements: %v", stack)
	}
	if n := strings.Count(doc, "<"); n != len(tagRE.FindAllString(doc, -1))+1 { // +1: <!DOCTYPE html>
		t.Errorf("%d '<' but %d tags: a stray '<' reached the page", n, len(tagRE.FindAllString(doc, -1)))
	}
}

// checkOffline fails if doc refers to anything outside itself.
func checkOffline(t *testing.T, doc string) {
	t.Helper()
	rest := strings.ReplaceAll(doc, `xmlns="http://www.w3.org/2000/svg"`, "")
	for _, bad := range []string{"http://", "https://", "//cdn", "@import", "url(", "<script", "<link"} {
		if strings.Contains(rest, bad) {
			i := strings.Index(rest, bad)
			t.Errorf("page refers outside itself (%q) near %q", bad, rest[max(0, i-60):min(len(rest), i+60)])
		}
	}
	for _, m := range tagRE.FindAllStringSubmatch(doc, -1) {
		if attrs := strings.ToLower(m[3]); strings.Contains(attrs, "src=") || strings.Contains(attrs, "href=") {
			t.Errorf("tag <%s%s> loads or links something", m[2], m[3])
		}
	}
}

var nonFiniteRE = regexp.MustCompile(`NaN|\bInf`)

func checkFinite(t *testing.T, doc string) {
	t.Helper()
	if m := nonFiniteRE.FindStringIndex(doc); m != nil {
		t.Errorf("page contains %q near %q", doc[m[0]:m[1]], doc[max(0, m[0]-80):min(len(doc), m[1]+40)])
	}
}

func TestRealistic(t *testing.T) {
	doc := render(t, realistic())
	checkBalanced(t, doc)
	checkOffline(t, doc)
	checkFinite(t, doc)
	if n, m := strings.Count(doc, "<svg"), strings.Count(doc, "</svg>"); n != wantSVGs || m != wantSVGs {
		t.Errorf("%d <svg> and %d </svg>, want %d", n, m, wantSVGs)
	}
	for _, want := range []string{
		"<title>fleetkey simulator: 10000 devices</title>",
		"INVALID RUN",
		"generator saturated: achieved 9,012 ops/s",
		`class="missed"`, "2 of 3 objectives met",
		"12,345",             // error count with separators
		"5.25 ms", "0.30 ms", // tcp p99.9 (2.1*2.5) and p50
		"enroll: no data",          // phase without per-second data
		"LEAKED", "3 of 4 refused", // attacks
		"Devices connected", "Offered vs achieved rate", "Errors by reason",
		"127.0.0.1:8883",
	} {
		if !strings.Contains(doc, want) {
			t.Errorf("page lacks %q", want)
		}
	}
	if len(doc) > 400_000 {
		t.Errorf("page is %d bytes; want it small", len(doc))
	}
}

func TestHostileStrings(t *testing.T) {
	const evil = `<script>alert(1)</script>`
	r := realistic()
	r.Title = evil
	r.Config = append(r.Config, KV{evil, evil})
	r.Summary = append(r.Summary, KV{evil, `"><img src=x onerror=alert(1)>`})
	r.Invalid = append(r.Invalid, evil)
	r.SLOs = append(r.SLOs, SLO{evil, evil, false})
	r.Phases[0].Name = evil
	r.Errors = append(r.Errors, Count{evil, 3})
	r.Attacks = append(r.Attacks, Attack{Name: evil, Reasons: evil})
	doc := render(t, r)
	checkBalanced(t, doc)
	checkOffline(t, doc)
	if strings.Contains(doc, "<script") || strings.Contains(doc, "<img") {
		t.Error("a hostile string reached the page unescaped")
	}
	if !strings.Contains(doc, "<title>&lt;script&gt;alert(1)&lt;/script&gt;</title>") {
		t.Error("the page title is not the escaped hostile title")
	}
	if n := strings.Count(doc, "&lt;script&gt;"); n < 8 {
		t.Errorf("escaped hostile string appears %d times, want at least 8", n)
	}
}

func TestEmpty(t *testing.T) {
	for name, r := range map[string]*Report{
		"zero":      {},
		"no series": {Title: "empty", Valid: true, Series: Series{T: []float64{0, 1, 2}}, Phases: []Phase{{Name: "tls"}}},
		"one point": {Title: "one", Valid: true, Series: Series{T: []float64{5}, Connected: []float64{3}, Offered: []float64{0}, Achieved: []float64{0}},
			Phases: []Phase{{Name: "tls", Count: 1, P50: 1, Over: []Point{{T: 5, P50: 1, P99: 1}}}}, Errors: []Count{{"x", 0}}},
	} {
		t.Run(name, func(t *testing.T) {
			doc := render(t, r)
			checkBalanced(t, doc)
			checkOffline(t, doc)
			checkFinite(t, doc)
			if n := strings.Count(doc, "no data"); name != "one point" && n < 2 {
				t.Errorf("%d \"no data\" notes, want at least 2", n)
			}
			if name == "zero" {
				if strings.Contains(doc, "<svg") {
					t.Error("empty report drew a plot")
				}
				for _, want := range []string{"INVALID RUN", "no reason was recorded", "no phases were measured", "no errors recorded", "no attack scenarios"} {
					if !strings.Contains(doc, want) {
						t.Errorf("page lacks %q", want)
					}
				}
			}
		})
	}
}

func TestNonFinite(t *testing.T) {
	nan, inf := math.NaN(), math.Inf(1)
	r := &Report{
		Title:   "broken numbers",
		Seconds: nan,
		Series: Series{
			T:         []float64{0, 1, 2, 3, inf, 5},
			Connected: []float64{nan, inf, -inf, 1e300, 4, 5},
			Offered:   []float64{nan, nan, nan, nan, nan, nan},
			Achieved:  []float64{-1, 0, 1, -2, 3, -1e308},
		},
		Phases: []Phase{
			{Name: "a", Count: 3, P50: nan, P90: inf, P99: -inf, P999: 0, Max: 1e308,
				Over: []Point{{0, nan, inf}, {1, 0, 0}, {2, -1, 1e-300}, {3, 1e300, 5}}},
			{Name: "b", Count: 1, Over: []Point{{nan, 1, 2}, {inf, 1, 2}}},
			{Name: "c", Count: 1, Over: []Point{{0, 0, 0}, {1, 0, 0}}},
		},
		Errors: []Count{{"neg", -5}, {"big", math.MaxInt64}, {"min", math.MinInt64}},
	}
	doc := render(t, r)
	checkBalanced(t, doc)
	checkFinite(t, doc)
}

func TestDownsample(t *testing.T) {
	r := &Report{Title: "long"}
	const n = 100_000
	for i := range n {
		r.Series.T = append(r.Series.T, float64(i))
		r.Series.Connected = append(r.Series.Connected, float64(i%1000))
		r.Series.Offered = append(r.Series.Offered, 10)
		r.Series.Achieved = append(r.Series.Achieved, 10)
	}
	r.Series.Connected[54321] = 1e6 // a spike must survive
	doc := render(t, r)
	checkFinite(t, doc)
	if len(doc) > 200_000 {
		t.Errorf("page is %d bytes for %d points; downsampling failed", len(doc), n)
	}
	if !strings.Contains(doc, ">1M<") {
		t.Error("the spike to 1M did not survive downsampling (no 1M tick)")
	}
	for _, d := range regexp.MustCompile(` d="M([^"]*)"`).FindAllStringSubmatch(doc, -1) {
		if k := strings.Count(d[1], "L") + 1; k > maxPoints+2 {
			t.Errorf("a line draws %d points, want at most %d", k, maxPoints)
		}
	}
}

func TestNil(t *testing.T) {
	var b bytes.Buffer
	if err := Write(&b, nil); err == nil || b.Len() != 0 {
		t.Errorf("Write(nil) = %v with %d bytes, want an error and nothing", err, b.Len())
	}
}

type failWriter struct{}

func (failWriter) Write([]byte) (int, error) { return 0, errors.New("disk full") }

func TestWriteError(t *testing.T) {
	if err := Write(failWriter{}, realistic()); err == nil {
		t.Error("Write to a failing writer returned nil")
	}
}

func TestFormat(t *testing.T) {
	for _, c := range []struct{ got, want string }{
		{fmtInt(0), "0"}, {fmtInt(999), "999"}, {fmtInt(1000), "1,000"}, {fmtInt(12345), "12,345"},
		{fmtInt(-1234567), "-1,234,567"}, {fmtInt(math.MinInt64), "-9,223,372,036,854,775,808"},
		{fmtMS(1.234), "1.23 ms"}, {fmtMS(0.05), "0.050 ms"}, {fmtMS(45.67), "45.7 ms"},
		{fmtMS(1234.4), "1,234 ms"}, {fmtMS(0), "0 ms"}, {fmtMS(math.NaN()), dash},
		{fmtTick(2500, 500), "2,500"}, {fmtTick(15000, 5000), "15k"}, {fmtTick(1.5e6, 5e5), "1.5M"},
		{fmtTick(0.5, 0.5), "0.5"}, {fmtTick(-1e-17, 0.1), "0.0"}, {fmtTick(2000, 1000), "2k"},
		{fmtClock(30, 10), "30s"}, {fmtClock(120, 60), "2m"}, {fmtClock(90, 30), "1m30s"}, {fmtClock(3600, 600), "1h"},
		{fmtSeconds(42.5), "42.5 s"}, {fmtSeconds(120), "120 s (2m0s)"},
		{fmtPercent(1, 3), "33%"}, {fmtPercent(1, 300), "0.3%"}, {fmtPercent(1, 0), dash},
	} {
		if c.got != c.want {
			t.Errorf("got %q, want %q", c.got, c.want)
		}
	}
}

// chromium finds a Chromium binary on PATH.
func chromium() (string, bool) {
	for _, name := range []string{"chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			return p, true
		}
	}
	return "", false
}

// runChromium runs Chromium headless with args, stdout to a file, within
// the deadline of ctx, and returns what it printed on stdout. Chromium's
// stderr is noisy (dbus, GPU); it is shown only when the run fails.
func runChromium(t *testing.T, ctx context.Context, bin, dir, name string, args ...string) []byte {
	t.Helper()
	// Files, not pipes: Chromium's helper processes inherit them and may
	// outlive it, which would hold up Wait on a pipe.
	stdout, err := os.Create(filepath.Join(dir, name+".stdout"))
	if err != nil {
		t.Fatal(err)
	}
	defer stdout.Close()
	stderr, err := os.Create(filepath.Join(dir, name+".stderr"))
	if err != nil {
		t.Fatal(err)
	}
	defer stderr.Close()
	base := []string{"--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
		"--user-data-dir=" + filepath.Join(dir, name+".profile")}
	cmd := exec.CommandContext(ctx, bin, append(base, args...)...)
	cmd.Stdout, cmd.Stderr = stdout, stderr
	cmd.WaitDelay = 5 * time.Second
	start := time.Now()
	err = cmd.Run()
	t.Logf("chromium %s took %v", name, time.Since(start).Round(time.Millisecond))
	if err != nil {
		noise, _ := os.ReadFile(stderr.Name())
		if len(noise) > 4000 {
			noise = noise[len(noise)-4000:]
		}
		t.Fatalf("chromium %s: %v (ctx: %v)\nstderr tail:\n%s", name, err, ctx.Err(), noise)
	}
	out, err := os.ReadFile(stdout.Name())
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestChromium renders the realistic report in headless Chromium: the
// page must lay out, take a screenshot that is not blank, and keep all its
// plots in the DOM. Set FLEETKEY_REPORT_SCREENSHOT=/path.png to keep the
// screenshot, FLEETKEY_REPORT_HTML=/path.html to keep the page.
func TestChromium(t *testing.T) {
	bin, ok := chromium()
	if !ok {
		t.Skip("chromium not installed: apt-get install chromium")
	}
	dir := t.TempDir()
	page := filepath.Join(dir, "report.html")
	r := realistic()
	if err := os.WriteFile(page, []byte(render(t, r)), 0o644); err != nil {
		t.Fatal(err)
	}
	if keep := os.Getenv("FLEETKEY_REPORT_HTML"); keep != "" {
		if err := os.WriteFile(keep, []byte(render(t, r)), 0o644); err != nil {
			t.Errorf("keeping page: %v", err)
		}
	}
	pageURL := (&url.URL{Scheme: "file", Path: page}).String()

	const width, height = 1280, 2400
	shot := filepath.Join(dir, "report.png")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	runChromium(t, ctx, bin, dir, "screenshot", "--hide-scrollbars",
		fmt.Sprintf("--window-size=%d,%d", width, height), "--screenshot="+shot, pageURL)
	data, err := os.ReadFile(shot)
	if err != nil {
		t.Fatalf("no screenshot: %v", err)
	}
	img, err := png.Decode(bytes.NewReader(data))
	if err != nil {
		t.Fatalf("screenshot is not a PNG: %v", err)
	}
	if b := img.Bounds(); b.Dx() != width || b.Dy() != height {
		t.Errorf("screenshot is %dx%d, want %dx%d", b.Dx(), b.Dy(), width, height)
	}
	colours := map[[4]uint32]bool{}
	b := img.Bounds()
	for y := b.Min.Y; y < b.Max.Y; y += 7 {
		for x := b.Min.X; x < b.Max.X; x += 7 {
			r, g, bl, a := img.At(x, y).RGBA()
			colours[[4]uint32{r, g, bl, a}] = true
		}
	}
	if len(colours) < 16 {
		t.Errorf("screenshot has %d distinct colours in its samples: blank or broken page", len(colours))
	}
	if keep := os.Getenv("FLEETKEY_REPORT_SCREENSHOT"); keep != "" {
		if err := os.WriteFile(keep, data, 0o644); err != nil {
			t.Errorf("keeping screenshot: %v", err)
		} else {
			t.Logf("screenshot kept at %s", keep)
		}
	}

	ctx, cancel = context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dom := string(runChromium(t, ctx, bin, dir, "dom", "--dump-dom", pageURL))
	if !strings.Contains(dom, r.Title) {
		t.Errorf("dumped DOM (%d bytes) lacks the title %q", len(dom), r.Title)
	}
	if n := strings.Count(dom, "<svg"); n != wantSVGs {
		t.Errorf("dumped DOM has %d <svg> elements, want %d", n, wantSVGs)
	}
}
