package simulator

import (
	"fmt"
	"maps"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	hdr "github.com/HdrHistogram/hdrhistogram-go"
)

// Phases a run measures. Connect phases are from the device's intended
// start to the end of the phase (so "tls" includes TCP, and the wait for
// a handshake place); ack and e2e are from a record's intended send time.
const (
	PhaseTCP      = "tcp"
	PhaseTLS      = "tls"
	PhaseConnack  = "connack"
	PhaseFKX1     = "fkx1"
	PhaseFirstAck = "first_ack"
	PhaseAck      = "ack"
	PhaseE2E      = "e2e"
	PhaseEnroll   = "enroll"
	// PhaseCommand is a command's trip from the service's intended send
	// time to the device; PhaseRevoked from a revocation to the device's
	// connection being closed by the gateway.
	PhaseCommand = "command"
	PhaseRevoked = "revoked_out"
	// PhaseLag is the generator's own lateness: how long after its
	// intended time an operation began. It judges the run, not the system.
	PhaseLag = "schedule_lag"
)

var phaseOrder = []string{PhaseEnroll, PhaseTCP, PhaseTLS, PhaseConnack, PhaseFKX1, PhaseFirstAck, PhaseAck, PhaseE2E, PhaseCommand, PhaseRevoked, PhaseLag}

// phase is an HdrHistogram of one phase for the whole run, and one for the
// current second that the sampler reads and resets.
type phase struct {
	mu     sync.Mutex
	total  *hdr.Histogram
	window *hdr.Histogram
	points []PhasePoint
	// first and last are when the phase's first and last measurement
	// were taken (rates over a phase's span: bench-peers).
	first, last time.Time
}

// PhasePoint is one second of a phase.
type PhasePoint struct {
	T     float64 `json:"t"`
	P50MS float64 `json:"p50_ms"`
	P99MS float64 `json:"p99_ms"`
}

// PhaseStats are a phase's percentiles over the run, in milliseconds.
type PhaseStats struct {
	Count  int64        `json:"count"`
	P50MS  float64      `json:"p50_ms"`
	P90MS  float64      `json:"p90_ms"`
	P99MS  float64      `json:"p99_ms"`
	P999MS float64      `json:"p999_ms"`
	MaxMS  float64      `json:"max_ms"`
	Over   []PhasePoint `json:"over_time,omitempty"`
	// FirstS and LastS are when the first and the last measurement were
	// taken, in seconds after the run's start.
	FirstS float64 `json:"first_s,omitempty"`
	LastS  float64 `json:"last_s,omitempty"`
}

// Latencies from 1 µs to 10 min, 3 significant digits.
func newHist() *hdr.Histogram { return hdr.New(1, int64(10*time.Minute/time.Microsecond), 3) }

// meter collects a run's measurements; it is safe for concurrent use.
type meter struct {
	start  time.Time
	phases map[string]*phase

	errMu  sync.Mutex
	errors map[string]int64

	connected                      atomic.Int64
	offered, achieved              atomic.Int64 // operations in the current second
	published, acked, received     atomic.Int64
	connects, handshakes, commands atomic.Int64
	revokedDropped, outboxDropped  atomic.Int64

	seriesMu sync.Mutex
	series   Series
	selfCPU  []float64 // the sampler's, cores per second
}

// Series are per-second samples of a run.
type Series struct {
	T         []float64 `json:"t"`
	Connected []float64 `json:"connected"`
	Offered   []float64 `json:"offered_per_s"`
	Achieved  []float64 `json:"achieved_per_s"`
	CPU       []float64 `json:"box_cpu"`
}

func newMeter(start time.Time) *meter {
	m := &meter{start: start, phases: map[string]*phase{}, errors: map[string]int64{}}
	for _, p := range phaseOrder {
		m.phases[p] = &phase{total: newHist(), window: newHist()}
	}
	return m
}

// record adds a latency to phase p.
func (m *meter) record(p string, d time.Duration) {
	ph := m.phases[p]
	// Clamped to the histogram's range (10 min): a longer wait still
	// counts, at the top, rather than being dropped.
	us := min(max(d.Microseconds(), 1), int64(10*time.Minute/time.Microsecond))
	now := time.Now()
	ph.mu.Lock()
	_ = ph.total.RecordValue(us)
	_ = ph.window.RecordValue(us)
	if ph.first.IsZero() || now.Before(ph.first) {
		ph.first = now
	}
	if now.After(ph.last) {
		ph.last = now
	}
	ph.mu.Unlock()
}

// fail counts an error by reason.
func (m *meter) fail(reason string) {
	m.errMu.Lock()
	m.errors[reason]++
	m.errMu.Unlock()
}

func (m *meter) errorCounts() map[string]int64 {
	m.errMu.Lock()
	defer m.errMu.Unlock()
	return maps.Clone(m.errors)
}

// sample closes the current second: each phase's window percentiles, the
// connection count, offered and achieved operations, the box's CPU.
func (m *meter) sample(now time.Time, cpu float64) {
	t := now.Sub(m.start).Seconds()
	for _, ph := range m.phases {
		ph.mu.Lock()
		if ph.window.TotalCount() > 0 {
			ph.points = append(ph.points, PhasePoint{T: t, P50MS: ms(ph.window.ValueAtQuantile(50)), P99MS: ms(ph.window.ValueAtQuantile(99))})
			ph.window.Reset()
		}
		ph.mu.Unlock()
	}
	m.seriesMu.Lock()
	m.series.T = append(m.series.T, t)
	m.series.Connected = append(m.series.Connected, float64(m.connected.Load()))
	m.series.Offered = append(m.series.Offered, float64(m.offered.Swap(0)))
	m.series.Achieved = append(m.series.Achieved, float64(m.achieved.Swap(0)))
	m.series.CPU = append(m.series.CPU, cpu)
	m.seriesMu.Unlock()
}

func ms(us int64) float64 { return float64(us) / 1000 }

// stats returns every phase that saw something.
func (m *meter) stats() map[string]PhaseStats {
	out := map[string]PhaseStats{}
	for name, ph := range m.phases {
		ph.mu.Lock()
		h := ph.total
		if h.TotalCount() > 0 {
			out[name] = PhaseStats{Count: h.TotalCount(), P50MS: ms(h.ValueAtQuantile(50)), P90MS: ms(h.ValueAtQuantile(90)),
				P99MS: ms(h.ValueAtQuantile(99)), P999MS: ms(h.ValueAtQuantile(99.9)), MaxMS: ms(h.Max()), Over: slices.Clone(ph.points),
				FirstS: ph.first.Sub(m.start).Seconds(), LastS: ph.last.Sub(m.start).Seconds()}
		}
		ph.mu.Unlock()
	}
	return out
}

func (m *meter) seriesCopy() Series {
	m.seriesMu.Lock()
	defer m.seriesMu.Unlock()
	s := m.series
	return Series{T: slices.Clone(s.T), Connected: slices.Clone(s.Connected), Offered: slices.Clone(s.Offered), Achieved: slices.Clone(s.Achieved), CPU: slices.Clone(s.CPU)}
}

// cpuMeter reads the box's CPU (/proc/stat) and the process's own
// (getrusage) between samples.
type cpuMeter struct {
	busy, total uint64
	self        time.Duration
	at          time.Time
}

func newCPUMeter() *cpuMeter {
	c := &cpuMeter{at: time.Now()}
	c.busy, c.total = procStat()
	c.self = selfCPU()
	return c
}

// sample returns the box's busy fraction (0 to 1) and the process's CPU in
// cores (0 to GOMAXPROCS) since the last sample.
func (c *cpuMeter) sample() (box, self float64) {
	busy, total := procStat()
	s, now := selfCPU(), time.Now()
	if total > c.total {
		box = float64(busy-c.busy) / float64(total-c.total)
	}
	if wall := now.Sub(c.at); wall > 0 {
		self = float64(s-c.self) / float64(wall)
	}
	c.busy, c.total, c.self, c.at = busy, total, s, now
	return box, self
}

func procStat() (busy, total uint64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	for i := 1; i < len(f); i++ {
		n, _ := strconv.ParseUint(f[i], 10, 64)
		total += n
		if i != 4 && i != 5 { // idle, iowait
			busy += n
		}
	}
	return busy, total
}

func selfCPU() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// The generator's self-check. Latencies are taken from intended times, so
// a late generator does not hide waiting; but a generator that cannot keep
// its own schedule measures itself, not the system.
const (
	maxLagP99     = time.Second
	maxSelfCPU    = 0.9  // of all cores
	maxSaturated  = 0.25 // of the run's seconds
	minSaturation = 5    // seconds, before the CPU rule applies
)

// judge sets sum.Valid and says why not.
func (m *meter) judge(sum *Summary) {
	sum.Valid = true
	if lag, ok := sum.Phases[PhaseLag]; ok && lag.P99MS > float64(maxLagP99/time.Millisecond) {
		sum.Valid = false
		sum.Invalid = append(sum.Invalid, fmt.Sprintf("the generator fell behind its schedule: schedule lag p99 %.0f ms (limit %s)", lag.P99MS, maxLagP99))
	}
	cores := float64(runtime.GOMAXPROCS(0))
	hot := 0
	for _, c := range m.selfCPU {
		if c >= maxSelfCPU*cores {
			hot++
		}
	}
	if len(m.selfCPU) >= minSaturation && float64(hot) > maxSaturated*float64(len(m.selfCPU)) {
		sum.Valid = false
		sum.Invalid = append(sum.Invalid, fmt.Sprintf("the simulator's process used over %.0f%% of all %d cores for %d of %d seconds (with --local this includes the stack it hosts)",
			maxSelfCPU*100, int(cores), hot, len(m.selfCPU)))
	}
}
