package simulator

import (
	"bufio"
	"context"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"fleetkey.dev/device-agent/agent"
	"fleetkey.dev/sessionkey"
)

// RunConfig is one simulated fleet run.
type RunConfig struct {
	// Devices to simulate, started on an open-model schedule of Rate per
	// second (each device's intended start is i/Rate after the first).
	Devices int
	Rate    float64
	// Schedule, if set, replaces the constant rate (ParseSchedule).
	Schedule Schedule
	// MaxHandshakes caps devices between their start and their first
	// epoch (enrollment, TLS, fkx1); 0 is no cap. Waiting for a place
	// counts in their latency.
	MaxHandshakes int
	// Duration of the telemetry phase; each device publishes a record of
	// Payload bytes every Interval.
	Duration, Interval time.Duration
	Payload            int
	Suite              sessionkey.Suite
	Rotation           sessionkey.Rotation
	// The stack: provisioning (EST) and the gateway.
	Provisioning, Gateway string
	RootCAs               *x509.CertPool
	Token                 string
	// Sink, if set, is the gateway's telemetry file: the run checks that
	// every acknowledged record is in it exactly once.
	Sink string
	// Dir holds the devices' state directories.
	Dir string
	// Identities, if set (one per device, from Fleet.Mint), replace
	// enrollment: the devices connect with them at once.
	Identities []*agent.Credentials
	// Faults happen during the run, at their time after its start.
	Faults []Fault
	// Progress, if set, gets a line a second.
	Progress io.Writer
	Log      *slog.Logger
}

// Fault is something done to the system in the middle of a run.
type Fault struct {
	Name string
	At   time.Duration
	Do   func() error
}

// Summary is what a run measured. Latencies are from each device's
// intended start, so time spent waiting to be served counts.
type Summary struct {
	Devices     int     `json:"devices"`
	Enrolled    int     `json:"enrolled"`
	Connected   int     `json:"connected"`
	Handshakes  int64   `json:"handshakes"`
	Published   int64   `json:"published"`
	Acked       int64   `json:"acked"`
	InSink      int64   `json:"in_sink"`
	Lost        int64   `json:"lost"`
	Duplicated  int64   `json:"duplicated"`
	EnrollP50MS float64 `json:"enroll_p50_ms"`
	EnrollP99MS float64 `json:"enroll_p99_ms"`
	// ReadyP50/P99: from intended start to the first fkx1 epoch
	// (enrollment, TLS, CONNECT, handshake).
	ReadyP50MS float64  `json:"ready_p50_ms"`
	ReadyP99MS float64  `json:"ready_p99_ms"`
	Errors     []string `json:"errors,omitempty"`
	Faults     []string `json:"faults,omitempty"`
	Seconds    float64  `json:"seconds"`
}

type deviceRun struct {
	id       string
	enrolled time.Duration
	ready    time.Duration
	agent    *agent.Agent
	err      error
}

// Run enrolls and runs the fleet and returns its summary.
func Run(ctx context.Context, cfg RunConfig) (*Summary, error) {
	if cfg.Devices <= 0 || cfg.Rate <= 0 || cfg.Interval <= 0 {
		return nil, fmt.Errorf("devices, rate and interval must be positive")
	}
	if cfg.Identities != nil && len(cfg.Identities) != cfg.Devices {
		return nil, fmt.Errorf("%d identities for %d devices", len(cfg.Identities), cfg.Devices)
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	start := time.Now()
	runs := make([]*deviceRun, cfg.Devices)
	var published, enrolled, ready atomic.Int64
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sched := cfg.Schedule
	if sched == nil {
		sched, _ = ParseSchedule("constant", cfg.Rate)
	}
	var slots chan struct{}
	if cfg.MaxHandshakes > 0 {
		slots = make(chan struct{}, cfg.MaxHandshakes)
	}
	stopPub := start.Add(sched(cfg.Devices-1) + cfg.Duration)
	var wg sync.WaitGroup
	agentsDone := make(chan struct{})
	var agentWG sync.WaitGroup
	progress := time.NewTicker(time.Second)
	defer progress.Stop()
	go func() {
		for {
			select {
			case <-agentsDone:
				return
			case <-progress.C:
				if cfg.Progress != nil {
					fmt.Fprintf(cfg.Progress, "\r%5.0fs  enrolled %d/%d  ready %d  published %d", time.Since(start).Seconds(), enrolled.Load(), cfg.Devices, ready.Load(), published.Load())
				}
			}
		}
	}()
	var faultMu sync.Mutex
	var faultLog []string
	for _, f := range cfg.Faults {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if !sleepUntil(ctx, start.Add(f.At)) {
				return
			}
			err := f.Do()
			faultMu.Lock()
			defer faultMu.Unlock()
			if err != nil {
				faultLog = append(faultLog, fmt.Sprintf("%s at %s: failed: %v", f.Name, f.At, err))
			} else {
				faultLog = append(faultLog, fmt.Sprintf("%s at %s", f.Name, f.At))
			}
		}()
	}
	for i := range runs {
		intended := start.Add(sched(i))
		r := &deviceRun{id: deviceID(i)}
		runs[i] = r
		wg.Add(1)
		go func() {
			defer wg.Done()
			if !sleepUntil(ctx, intended) {
				return
			}
			var release func()
			if slots != nil {
				select {
				case slots <- struct{}{}:
				case <-ctx.Done():
					return
				}
				var once sync.Once
				release = func() { once.Do(func() { <-slots }) }
				defer release()
			}
			ac := agent.Config{Gateway: cfg.Gateway, Suite: cfg.Suite, Rotation: cfg.Rotation, Log: cfg.Log.With("device", r.id)}
			if cfg.Identities != nil {
				ac.Credentials, ac.DeviceID = cfg.Identities[i], r.id
			} else {
				st := &agent.State{Dir: filepath.Join(cfg.Dir, r.id)}
				if _, err := st.Enroll(ctx, agent.EnrollOptions{Provisioning: cfg.Provisioning, RootCAs: cfg.RootCAs, Token: cfg.Token, ID: r.id}); err != nil {
					r.err = fmt.Errorf("enroll %s: %w", r.id, err)
					return
				}
				ac.State = st
			}
			r.enrolled = time.Since(intended)
			enrolled.Add(1)
			var once sync.Once
			ac.OnEpoch = func(sessionkey.KID) {
				once.Do(func() {
					r.ready = time.Since(intended)
					ready.Add(1)
					if release != nil {
						release()
					}
				})
			}
			a, err := agent.New(ac)
			if err != nil {
				r.err = err
				return
			}
			r.agent = a
			agentWG.Add(1)
			go func() { defer agentWG.Done(); _ = a.Run(ctx) }()
			body := make([]byte, cfg.Payload)
			t := time.NewTicker(cfg.Interval)
			defer t.Stop()
			for time.Now().Before(stopPub) {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
				copy(body, fmt.Sprintf(`{"n":%d}`, published.Load()))
				if _, err := a.Publish(ctx, "telemetry", body); err != nil {
					r.err = err
					return
				}
				published.Add(1)
			}
			// Drain: wait until the gateway has acknowledged everything.
			deadline := time.NewTimer(30 * time.Second)
			defer deadline.Stop()
			for a.Outbox().Len() > 0 {
				select {
				case <-a.Outbox().Changed():
				case <-deadline.C:
					r.err = fmt.Errorf("%s: %d records not acknowledged 30 s after the run", r.id, a.Outbox().Len())
					return
				case <-ctx.Done():
					return
				}
			}
		}()
	}
	wg.Wait()
	cancel()
	agentWG.Wait()
	close(agentsDone)
	if cfg.Progress != nil {
		fmt.Fprintln(cfg.Progress)
	}
	sum := &Summary{Devices: cfg.Devices, Published: published.Load(), Seconds: time.Since(start).Seconds(), Faults: faultLog}
	var enrolls, readies []time.Duration
	for _, r := range runs {
		if r.err != nil {
			sum.Errors = append(sum.Errors, r.err.Error())
		}
		if r.enrolled > 0 {
			sum.Enrolled++
			enrolls = append(enrolls, r.enrolled)
		}
		if r.ready > 0 {
			sum.Connected++
			readies = append(readies, r.ready)
		}
		if r.agent != nil {
			sum.Acked += r.agent.Acked()
			sum.Handshakes += r.agent.Stats().Handshakes.Load()
		}
	}
	sum.EnrollP50MS, sum.EnrollP99MS = percentile(enrolls, 50), percentile(enrolls, 99)
	sum.ReadyP50MS, sum.ReadyP99MS = percentile(readies, 50), percentile(readies, 99)
	if cfg.Sink != "" {
		if err := checkSink(cfg.Sink, sum); err != nil {
			return sum, err
		}
	}
	return sum, nil
}

func sleepUntil(ctx context.Context, t time.Time) bool {
	d := time.Until(t)
	if d <= 0 {
		return ctx.Err() == nil
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-timer.C:
		return true
	}
}

func percentile(ds []time.Duration, p int) float64 {
	if len(ds) == 0 {
		return 0
	}
	slices.Sort(ds)
	i := (len(ds)*p + 99) / 100
	return float64(ds[max(i-1, 0)].Microseconds()) / 1000
}

// checkSink counts the sink's records of the simulated devices: each
// acknowledged record must be there once.
func checkSink(path string, sum *Summary) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	seen := map[[2]any]bool{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var l struct {
			Device   string `json:"device"`
			RecordID uint64 `json:"record_id"`
		}
		if json.Unmarshal(sc.Bytes(), &l) != nil || len(l.Device) < 4 || l.Device[:4] != "sim-" {
			continue
		}
		k := [2]any{l.Device, l.RecordID}
		if seen[k] {
			sum.Duplicated++
		}
		seen[k] = true
	}
	sum.InSink = int64(len(seen))
	sum.Lost = max(sum.Published-sum.InSink, 0)
	return sc.Err()
}
