package simulator

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"

	"fleetkey.dev/certs/pkidir"
	"fleetkey.dev/certs/trust"
	"fleetkey.dev/device-agent/agent"
	gwserver "fleetkey.dev/gateway/server"
	"fleetkey.dev/simulator/peers"
)

// The brokers that bench-peers compares, each in a process of its own.
const (
	// BenchFleetkeyFKX1 is the fleetkey gateway as served: mTLS and fkx1,
	// every record opened and stored (fsync'd, group commit) before its
	// PUBACK.
	BenchFleetkeyFKX1 = "fleetkey-fkx1"
	// BenchFleetkeyMQTT is the gateway with plaintext_telemetry: fkx1 off,
	// records relayed as they are (the simulator's --target mqtt).
	BenchFleetkeyMQTT = "fleetkey-mqtt"
	// BenchMochi is bare mochi-mqtt with mTLS (peers.MochiMain).
	BenchMochi = "mochi"
	// BenchMosquitto is Mosquitto 2 with mTLS (peers.StartMosquitto).
	BenchMosquitto = "mosquitto"
)

// BenchTargets are all the targets, in their default order.
var BenchTargets = []string{BenchFleetkeyFKX1, BenchFleetkeyMQTT, BenchMochi, BenchMosquitto}

// BenchConfig is one bench-peers run: the same connect storm and the same
// throughput load against each target, Rounds times, each time against a
// fresh broker process.
type BenchConfig struct {
	// Dir holds the PKI, the identity cache (unless IdentityCache is set)
	// and a directory per round and target (broker config, log, sink).
	Dir           string
	IdentityCache string
	Targets       []string
	Rounds        int
	// The connect storm: Devices started at Rate a second (open model),
	// at most MaxHandshakes between start and ready (0: no cap).
	Devices       int
	Rate          float64
	MaxHandshakes int
	// The throughput load: ThroughputDevices each publishing Payload bytes
	// every Interval for Duration, at QoS 1 and then at QoS 0.
	ThroughputDevices  int
	Interval, Duration time.Duration
	Payload            int
	// KDFIterations for the new PKI's CA keys (0: pkidir's default).
	KDFIterations int
	// Child makes the command of a child process: sub is "peer-mochi"
	// (peers.MochiMain), "peer-gateway" (PeerGatewayMain) or
	// "peer-service" (PeerServiceMain).
	Child func(sub string, args ...string) *exec.Cmd
	// Progress, if set, gets a line per target and round.
	Progress io.Writer
	// Profile makes each fleetkey gateway write a CPU profile, cpu.pprof,
	// into its run's directory under Dir (for go tool pprof).
	Profile bool
}

// BenchFigures are what bench-peers compares. Rates are per second;
// ConnectP99MS is from the intended start to ready (CONNACK, or the first
// fkx1 epoch for fleetkey-fkx1); KB are RSS per connected device.
type BenchFigures struct {
	ConnectsPerS  float64 `json:"connects_per_s"`
	ConnectP99MS  float64 `json:"connect_p99_ms"`
	BrokerKBPerDv float64 `json:"broker_kb_per_device"`
	SimKBPerDv    float64 `json:"sim_kb_per_device"`
	QoS1PerS      float64 `json:"qos1_msgs_per_s"`
	// QoS1DeliveredPerS is the records the service received a second at
	// QoS 1, and QoS1LostPct the records published at QoS 1 that did not
	// reach it (fleetkey-fkx1: the sink), in percent.
	QoS1DeliveredPerS float64 `json:"qos1_delivered_per_s"`
	QoS1LostPct       float64 `json:"qos1_lost_pct"`
	QoS0PerS          float64 `json:"qos0_msgs_per_s"`
	// CPU time (user and system) of the broker's process: per device
	// made ready in the storm, and per record published at each QoS. On a
	// machine the generator shares, these say more than the rates do.
	BrokerCPUPerConnectMS float64 `json:"broker_cpu_per_connect_ms"`
	BrokerCPUPerQoS1US    float64 `json:"broker_cpu_per_qos1_record_us"`
	BrokerCPUPerQoS0US    float64 `json:"broker_cpu_per_qos0_record_us"`
}

// BenchSample is one target in one round.
type BenchSample struct {
	Target string `json:"target"`
	Round  int    `json:"round"`
	BenchFigures
	// The storm.
	Connected         int     `json:"connected"`
	Devices           int     `json:"devices"`
	StormSeconds      float64 `json:"storm_seconds"` // first intended start to last ready
	BrokerRSSBeforeMB float64 `json:"broker_rss_before_mb"`
	BrokerRSSPeakMB   float64 `json:"broker_rss_peak_mb"`
	SimRSSBeforeMB    float64 `json:"sim_rss_before_mb"`
	SimRSSPeakMB      float64 `json:"sim_rss_peak_mb"`
	// The throughput runs: what was published, acknowledged, received by
	// the service (fleetkey-fkx1: also stored in the sink); lost is
	// acknowledged but never delivered (QoS 1: must be 0), unacked not
	// acknowledged when the run ended (the broker fell behind).
	QoS1Published int64   `json:"qos1_published"`
	QoS1Acked     int64   `json:"qos1_acked"`
	QoS1Received  int64   `json:"qos1_received"`
	QoS1InSink    int64   `json:"qos1_in_sink,omitempty"`
	QoS1Lost      int64   `json:"qos1_lost"`
	QoS1Unacked   int64   `json:"qos1_unacked"`
	QoS1Dup       int64   `json:"qos1_duplicated"`
	QoS1AckP99MS  float64 `json:"qos1_ack_p99_ms"`
	QoS0Published int64   `json:"qos0_published"`
	QoS0Received  int64   `json:"qos0_received"`
	// CPU seconds (user and system) of the broker's process and of the
	// simulator's in each run.
	BrokerCPUStormS float64 `json:"broker_cpu_storm_s"`
	BrokerCPUQoS1S  float64 `json:"broker_cpu_qos1_s"`
	BrokerCPUQoS0S  float64 `json:"broker_cpu_qos0_s"`
	SimCPUStormS    float64 `json:"sim_cpu_storm_s"`
	SimCPUQoS1S     float64 `json:"sim_cpu_qos1_s"`
	SimCPUQoS0S     float64 `json:"sim_cpu_qos0_s"`
	// Problems are the runs' own (loss, devices never ready, an invalid
	// generator) and Err a failure that left figures out.
	Problems []string `json:"problems,omitempty"`
	Err      string   `json:"error,omitempty"`
	// The runs' summaries, without their time series.
	Storm *Summary `json:"storm,omitempty"`
	QoS1  *Summary `json:"qos1,omitempty"`
	QoS0  *Summary `json:"qos0,omitempty"`
}

// BenchResult is a whole bench-peers run.
type BenchResult struct {
	Started time.Time `json:"started"`
	Config  struct {
		Devices           int     `json:"devices"`
		Rate              float64 `json:"rate"`
		MaxHandshakes     int     `json:"max_handshakes"`
		ThroughputDevices int     `json:"throughput_devices"`
		Interval          string  `json:"interval"`
		Duration          string  `json:"duration"`
		Payload           int     `json:"payload"`
		Rounds            int     `json:"rounds"`
	} `json:"config"`
	Targets  []string                `json:"targets"`
	Versions map[string]string       `json:"versions"`
	Skipped  map[string]string       `json:"skipped,omitempty"`
	Baseline string                  `json:"baseline"`
	Medians  map[string]BenchFigures `json:"medians"`
	Samples  []*BenchSample          `json:"samples"`
	Notes    []string                `json:"notes"`
}

func (c *BenchConfig) defaults() error {
	if c.Rounds == 0 {
		c.Rounds = 3
	}
	if c.Devices == 0 {
		c.Devices = 2000
	}
	if c.Rate == 0 {
		c.Rate = 2000
	}
	if c.ThroughputDevices == 0 {
		c.ThroughputDevices = 200
	}
	if c.Interval == 0 {
		c.Interval = 4 * time.Millisecond
	}
	if c.Duration == 0 {
		c.Duration = 5 * time.Second
	}
	if c.Payload == 0 {
		c.Payload = 64
	}
	if len(c.Targets) == 0 {
		c.Targets = BenchTargets
	}
	switch {
	case c.Dir == "":
		return errors.New("bench-peers: a directory is required")
	case c.Child == nil:
		return errors.New("bench-peers: Child is required")
	case c.Rounds < 1 || c.Devices < 1 || c.ThroughputDevices < 1 || c.Rate <= 0 || c.Interval <= 0 || c.Duration <= 0 || c.MaxHandshakes < 0:
		return errors.New("bench-peers: rounds, devices, throughput devices, rate, interval and duration must be positive")
	case c.Devices > 100_000 || c.ThroughputDevices > 100_000 || c.Payload < bodyHeader || c.Payload > 60_000:
		return fmt.Errorf("bench-peers: at most 100000 devices, payload %d to 60000 bytes", bodyHeader)
	}
	seen := map[string]bool{}
	for _, t := range c.Targets {
		if !slices.Contains(BenchTargets, t) {
			return fmt.Errorf("bench-peers: unknown target %q (want %s)", t, strings.Join(BenchTargets, ", "))
		}
		if seen[t] {
			return fmt.Errorf("bench-peers: target %q twice", t)
		}
		seen[t] = true
	}
	return nil
}

// bench is a run's shared state: the PKI's files and the identities.
type bench struct {
	cfg     BenchConfig
	pki     string
	files   peers.TLSFiles
	bundle  *trust.Bundle
	roots   *x509.CertPool
	service tls.Certificate
	ids     []*agent.Credentials
}

// RunBench runs bench-peers: a PKI (made in Dir/pki, or the one already
// there), identities minted from it (cached), then per round and target a
// fresh broker process, a connect storm and the throughput load at QoS 1
// and at QoS 0. Targets are taken in a different order each round (rotated)
// so that no broker always runs first or last on a noisy machine. A target
// that fails in a round is recorded with its error and the run goes on;
// mosquitto missing is a note, not an error.
func RunBench(ctx context.Context, cfg BenchConfig) (*BenchResult, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	b := &bench{cfg: cfg, pki: filepath.Join(cfg.Dir, "pki")}
	if err := b.setup(); err != nil {
		return nil, err
	}
	res := &BenchResult{Started: time.Now(), Versions: map[string]string{}, Skipped: map[string]string{}, Medians: map[string]BenchFigures{}}
	rc := &res.Config
	rc.Devices, rc.Rate, rc.MaxHandshakes, rc.ThroughputDevices = cfg.Devices, cfg.Rate, cfg.MaxHandshakes, cfg.ThroughputDevices
	rc.Interval, rc.Duration, rc.Payload, rc.Rounds = cfg.Interval.String(), cfg.Duration.String(), cfg.Payload, cfg.Rounds
	res.Versions[BenchMochi] = mqtt.Version
	res.Versions[BenchFleetkeyFKX1] = "this tree (on mochi " + mqtt.Version + ")"
	res.Versions[BenchFleetkeyMQTT] = res.Versions[BenchFleetkeyFKX1]
	targets := slices.Clone(cfg.Targets)
	for round := 1; round <= cfg.Rounds; round++ {
		order := append(slices.Clone(targets[(round-1)%len(targets):]), targets[:(round-1)%len(targets)]...)
		for _, t := range order {
			if _, skip := res.Skipped[t]; skip {
				continue
			}
			if err := ctx.Err(); err != nil {
				return res, err
			}
			s, version, err := b.runTarget(ctx, t, round)
			if errors.Is(err, peers.ErrNotInstalled) {
				res.Skipped[t] = err.Error()
				b.progress("%s: skipped: %v\n", t, err)
				continue
			}
			if version != "" {
				res.Versions[t] = version
			}
			if err != nil {
				s.Err = err.Error()
			}
			res.Samples = append(res.Samples, s)
			b.progress("round %d/%d %s\n", round, cfg.Rounds, s.line())
		}
	}
	for _, t := range targets {
		if _, skip := res.Skipped[t]; !skip {
			res.Targets = append(res.Targets, t)
			res.Medians[t] = medians(res.Samples, t)
		}
	}
	for _, base := range []string{BenchMosquitto, BenchMochi} {
		if slices.Contains(res.Targets, base) {
			res.Baseline = base
			break
		}
	}
	res.Notes = b.notes(res)
	return res, ctx.Err()
}

func (b *bench) progress(format string, args ...any) {
	if b.cfg.Progress != nil {
		fmt.Fprintf(b.cfg.Progress, format, args...)
	}
}

// setup makes (or reuses) the PKI and the identities.
func (b *bench) setup() error {
	if _, err := os.Stat(filepath.Join(b.pki, pkidir.BundleFile)); errors.Is(err, os.ErrNotExist) {
		if _, err := pkidir.Init(b.pki, pkidir.InitOptions{TrustDomain: "fleet.local", Options: pkidir.Options{KDFIterations: b.cfg.KDFIterations}}); err != nil {
			return fmt.Errorf("making the fleet PKI: %w", err)
		}
	}
	fleet, err := OpenFleet(b.pki)
	if err != nil {
		return err
	}
	b.bundle = fleet.Bundle()
	// The devices trust the issuing CA directly, as trust.Bundle does:
	// re-checking the root's P-384 signature at every handshake (about
	// 1.4 ms) would spend the cores the brokers need on the generator.
	b.roots = x509.NewCertPool()
	for _, c := range b.bundle.Issuing() {
		b.roots.AddCert(c)
	}
	if b.service, err = tls.LoadX509KeyPair(filepath.Join(b.pki, "service.crt"), filepath.Join(b.pki, "service.key")); err != nil {
		return err
	}
	// The brokers verify client certificates against the bundle (root and
	// issuing CA) and present the gateway's certificate (SAN 127.0.0.1).
	b.files = peers.TLSFiles{CAFile: filepath.Join(b.pki, pkidir.BundleFile), CertFile: filepath.Join(b.pki, "gateway.crt"), KeyFile: filepath.Join(b.pki, "gateway.key")}
	cache := b.cfg.IdentityCache
	if cache == "" {
		cache = filepath.Join(b.cfg.Dir, "identities")
	}
	start := time.Now()
	ids, minted, loaded, err := fleet.MintCached(cache, max(b.cfg.Devices, b.cfg.ThroughputDevices))
	if err != nil {
		return err
	}
	b.ids = ids
	b.progress("identities: %d minted, %d loaded from %s, in %s\n", minted, loaded, cache, time.Since(start).Round(time.Millisecond))
	return nil
}

// startPeer starts target t's broker in a process of its own, with its
// files in dir.
func (b *bench) startPeer(ctx context.Context, t, dir string) (*peers.Peer, error) {
	switch t {
	case BenchMosquitto:
		return peers.StartMosquitto(ctx, dir, b.files)
	case BenchMochi:
		addr := filepath.Join(dir, "mochi.addr")
		cmd := b.cfg.Child("peer-mochi", "--ca", b.files.CAFile, "--cert", b.files.CertFile, "--key", b.files.KeyFile, "--listen", "127.0.0.1:0", "--addr-file", addr)
		return peers.StartProcess(ctx, t, addr, cmd)
	default:
		addr := filepath.Join(dir, "gateway.addr")
		args := []string{"--pki", b.pki, "--sink", filepath.Join(dir, "telemetry.jsonl"), "--addr-file", addr}
		if t == BenchFleetkeyMQTT {
			args = append(args, "--plaintext")
		}
		if b.cfg.Profile {
			args = append(args, "--cpuprofile", filepath.Join(dir, "cpu.pprof"))
		}
		return peers.StartProcess(ctx, t, addr, b.cfg.Child("peer-gateway", args...))
	}
}

// runTarget measures target t once: the storm, then QoS 1, then QoS 0,
// each against a fresh broker process, so that nothing one run left
// behind (a backlog, a service session with messages in flight) reaches
// the next.
func (b *bench) runTarget(ctx context.Context, t string, round int) (*BenchSample, string, error) {
	s := &BenchSample{Target: t, Round: round, Devices: b.cfg.Devices}
	var version string
	for _, phase := range []string{"storm", "qos1", "qos0"} {
		dir := filepath.Join(b.cfg.Dir, fmt.Sprintf("round%d-%s-%s", round, t, phase))
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return s, version, err
		}
		p, err := b.startPeer(ctx, t, dir)
		if err != nil {
			return s, version, err
		}
		version = p.Version
		base := RunConfig{Gateway: p.Addr, RootCAs: b.roots, Bundle: b.bundle, Payload: b.cfg.Payload, Rate: b.cfg.Rate,
			MaxHandshakes: b.cfg.MaxHandshakes, Dir: filepath.Join(dir, "devices"), Target: TargetMQTT}
		if t == BenchFleetkeyFKX1 {
			base.Target, base.Sink = TargetFleetkey, filepath.Join(dir, "telemetry.jsonl")
		}
		switch phase {
		case "storm":
			err = b.storm(ctx, p, base, s)
		default:
			err = b.throughput(ctx, p, base, t, phase == "qos0", s)
		}
		if serr := p.Stop(); serr != nil && err == nil {
			err = fmt.Errorf("stopping the broker: %w", serr)
		}
		os.Remove(filepath.Join(dir, "telemetry.jsonl"))
		if err != nil {
			return s, version, fmt.Errorf("%s: %w", map[string]string{"storm": "connect storm", "qos1": "QoS 1", "qos0": "QoS 0"}[phase], err)
		}
	}
	return s, version, nil
}

// rssPeak samples the RSS of pids every 20 ms until stop is called, which
// returns each one's peak.
func rssPeak(pids ...int) (stop func() []int64) {
	peaks := make([]atomic.Int64, len(pids))
	sample := func() {
		for i, pid := range pids {
			if r, err := peers.RSS(pid); err == nil && r > peaks[i].Load() {
				peaks[i].Store(r)
			}
		}
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for {
			sample()
			select {
			case <-done:
				return
			case <-t.C:
			}
		}
	})
	return func() []int64 {
		close(done)
		wg.Wait()
		sample()
		out := make([]int64, len(pids))
		for i := range peaks {
			out[i] = peaks[i].Load()
		}
		return out
	}
}

// storm connects Devices devices at Rate and measures how fast they became
// ready and what their connections cost the broker and the simulator.
// Each device publishes one record (QoS 1) once ready, so that the run
// ends when every device has been served.
func (b *bench) storm(ctx context.Context, p *peers.Peer, base RunConfig, s *BenchSample) error {
	cfg := base
	cfg.Devices, cfg.Identities = b.cfg.Devices, b.ids[:b.cfg.Devices]
	cfg.Duration, cfg.Interval = time.Millisecond, 10*time.Second
	debug.FreeOSMemory()
	brokerBefore, err := p.RSS()
	if err != nil {
		return err
	}
	simBefore, err := peers.RSS(os.Getpid())
	if err != nil {
		return err
	}
	stop := rssPeak(p.PID, os.Getpid())
	brokerCPU, simCPU := procCPU(p.PID), selfCPU()
	sum, err := Run(ctx, cfg)
	peaks := stop()
	s.BrokerCPUStormS, s.SimCPUStormS = (procCPU(p.PID) - brokerCPU).Seconds(), (selfCPU() - simCPU).Seconds()
	if err != nil {
		return err
	}
	if err := alive(p); err != nil {
		return err
	}
	s.Storm = sum.Brief()
	s.Connected = sum.Connected
	s.BrokerRSSBeforeMB, s.BrokerRSSPeakMB = mb(brokerBefore), mb(peaks[0])
	s.SimRSSBeforeMB, s.SimRSSPeakMB = mb(simBefore), mb(peaks[1])
	ready := PhaseConnack
	if cfg.Target == TargetFleetkey {
		ready = PhaseFKX1
	}
	if ph, ok := sum.Phases[ready]; ok && ph.LastS > 0 {
		// From the first device's intended start (the run's start) to the
		// last device ready.
		s.StormSeconds = ph.LastS
		s.ConnectsPerS = float64(sum.Connected) / ph.LastS
	}
	s.ConnectP99MS = sum.ReadyP99MS
	if sum.Connected > 0 {
		s.BrokerKBPerDv = float64(max(peaks[0]-brokerBefore, 0)) / 1024 / float64(sum.Connected)
		s.SimKBPerDv = float64(max(peaks[1]-simBefore, 0)) / 1024 / float64(sum.Connected)
		s.BrokerCPUPerConnectMS = s.BrokerCPUStormS * 1000 / float64(sum.Connected)
	}
	s.Problems = append(s.Problems, runProblems("storm", sum.Valid, sum.Invalid, sum.Problems)...)
	return nil
}

// throughput runs ThroughputDevices devices publishing for Duration with
// the service subscribed. The rate is what was acknowledged (QoS 1) or
// received by the service (QoS 0) over the span from the first to the
// last: a broker that falls behind is measured at the pace it kept, not at
// the offered one.
func (b *bench) throughput(ctx context.Context, p *peers.Peer, base RunConfig, t string, qos0 bool, s *BenchSample) error {
	cfg := base
	n := b.cfg.ThroughputDevices
	cfg.Devices, cfg.Identities = n, b.ids[:n]
	cfg.Duration, cfg.Interval, cfg.AtMostOnce = b.cfg.Duration, b.cfg.Interval, qos0
	cfg.Service = &b.service
	cfg.ServiceCmd = func(args ...string) *exec.Cmd {
		return b.cfg.Child("peer-service", append([]string{"--pki", b.pki}, args...)...)
	}
	if t == BenchFleetkeyMQTT {
		cfg.ServiceTopic = "fleet/telemetry/+/telemetry"
	}
	// Run waits up to 30 s after the load for every record to be
	// acknowledged and received; a broker that drops deliveries never gets
	// there. benchDrain is enough for any that keeps up.
	arrival := time.Duration(float64(n-1) / cfg.Rate * float64(time.Second))
	rctx, cancel := context.WithTimeout(ctx, arrival+cfg.Duration+benchDrain)
	brokerCPU, simCPU := procCPU(p.PID), selfCPU()
	sum, err := Run(rctx, cfg)
	cancel()
	brokerCPU, simCPU = procCPU(p.PID)-brokerCPU, selfCPU()-simCPU
	if err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := alive(p); err != nil {
		return err
	}
	rate := func(phase string) float64 {
		ph, ok := sum.Phases[phase]
		if !ok || ph.Count < 2 || ph.LastS <= ph.FirstS {
			return 0
		}
		return float64(ph.Count) / (ph.LastS - ph.FirstS)
	}
	perRecord := func(d time.Duration) float64 {
		if sum.Published == 0 {
			return 0
		}
		return float64(d.Microseconds()) / float64(sum.Published)
	}
	// Run's own loss and acknowledgement checks assume it waited 30 s; the
	// sample says instead what was lost and what was still unacknowledged.
	problems := slices.DeleteFunc(slices.Clone(sum.Problems), func(p string) bool {
		return strings.HasSuffix(p, " records lost") || strings.Contains(p, "not acknowledged") || strings.HasPrefix(p, "the service received")
	})
	if qos0 {
		s.QoS0 = sum.Brief()
		s.QoS0PerS = rate(PhaseE2E)
		s.QoS0Published, s.QoS0Received = sum.Published, sum.Received
		s.BrokerCPUQoS0S, s.SimCPUQoS0S = brokerCPU.Seconds(), simCPU.Seconds()
		s.BrokerCPUPerQoS0US = perRecord(brokerCPU)
		s.Problems = append(s.Problems, runProblems("QoS 0", sum.Valid, sum.Invalid, problems)...)
		return nil
	}
	s.QoS1 = sum.Brief()
	s.QoS1PerS = rate(PhaseAck)
	s.QoS1DeliveredPerS = rate(PhaseE2E)
	s.QoS1Published, s.QoS1Acked, s.QoS1Received, s.QoS1InSink, s.QoS1Dup = sum.Published, sum.Acked, sum.Received, sum.InSink, sum.Duplicated
	// Lost: acknowledged, never delivered. The gateway acknowledges a
	// record once it is in its sink, and Run checks every acknowledged
	// record is there.
	s.QoS1Lost = max(sum.Acked-sum.Received, 0)
	if cfg.Sink != "" {
		s.QoS1Lost = sum.Lost
	}
	s.QoS1Unacked = max(sum.Published-sum.Acked, 0)
	if sum.Acked > 0 {
		s.QoS1LostPct = 100 * float64(s.QoS1Lost) / float64(sum.Acked)
	}
	if ph, ok := sum.Phases[PhaseAck]; ok {
		s.QoS1AckP99MS = ph.P99MS
	}
	s.BrokerCPUQoS1S, s.SimCPUQoS1S = brokerCPU.Seconds(), simCPU.Seconds()
	s.BrokerCPUPerQoS1US = perRecord(brokerCPU)
	if s.QoS1Lost > 0 {
		problems = append(problems, fmt.Sprintf("%d of %d records acknowledged were never delivered (%.2f%%)", s.QoS1Lost, sum.Acked, s.QoS1LostPct))
	}
	if s.QoS1Unacked > 0 {
		problems = append(problems, fmt.Sprintf("%d of %d records not acknowledged %s after the load: the broker fell behind", s.QoS1Unacked, sum.Published, benchDrain))
	}
	s.Problems = append(s.Problems, runProblems("QoS 1", sum.Valid, sum.Invalid, problems)...)
	return nil
}

// benchDrain is how long a throughput run waits, after the load, for the
// records still in flight.
const benchDrain = 5 * time.Second

// runProblems are a run's problems and, if the generator fell behind, why.
func runProblems(name string, valid bool, invalid, problems []string) []string {
	var out []string
	for _, p := range problems {
		out = append(out, name+": "+p)
	}
	if !valid {
		out = append(out, name+": the generator's self-check failed: "+strings.Join(invalid, "; "))
	}
	return out
}

// procCPU is the CPU time (user and system, all threads) process pid has
// used, from /proc/PID/stat; 0 where that cannot be read.
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The fields after the command's closing parenthesis start at the
	// state (field 3); utime and stime are fields 14 and 15, in clock
	// ticks (USER_HZ, 100 on Linux).
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0
	}
	return time.Duration(ut+st) * 10 * time.Millisecond
}

// alive fails if the broker's process has exited.
func alive(p *peers.Peer) error {
	select {
	case <-p.Done():
		return fmt.Errorf("the %s process exited during the run", p.Name)
	default:
		return nil
	}
}

func mb(b int64) float64 { return float64(b) / (1 << 20) }

func (s *BenchSample) line() string {
	if s.Err != "" && s.Storm == nil {
		return fmt.Sprintf("%s: error: %s", s.Target, s.Err)
	}
	l := fmt.Sprintf("%s: %d/%d ready, %.0f connects/s, p99 %.0f ms, broker %.1f KB and %.2f ms CPU/device, sim %.1f KB/device; QoS 1 %.0f acked/s, %.0f delivered/s, %d lost, broker %.1f µs CPU/record; QoS 0 %.0f msg/s, broker %.1f µs CPU/record",
		s.Target, s.Connected, s.Devices, s.ConnectsPerS, s.ConnectP99MS, s.BrokerKBPerDv, s.BrokerCPUPerConnectMS, s.SimKBPerDv, s.QoS1PerS, s.QoS1DeliveredPerS, s.QoS1Lost, s.BrokerCPUPerQoS1US, s.QoS0PerS, s.BrokerCPUPerQoS0US)
	if s.Err != "" {
		l += "; error: " + s.Err
	}
	if len(s.Problems) > 0 {
		l += "; " + strings.Join(s.Problems, "; ")
	}
	return l
}

// medians are target t's figures, each the median over the rounds that
// measured it.
func medians(samples []*BenchSample, t string) BenchFigures {
	pick := func(f func(*BenchSample) float64) float64 {
		var v []float64
		for _, s := range samples {
			if x := f(s); s.Target == t && (x > 0 || x == 0 && s.Err == "") && !math.IsInf(x, 0) && !math.IsNaN(x) {
				v = append(v, x)
			}
		}
		return median(v)
	}
	return BenchFigures{
		ConnectsPerS:          pick(func(s *BenchSample) float64 { return s.ConnectsPerS }),
		ConnectP99MS:          pick(func(s *BenchSample) float64 { return s.ConnectP99MS }),
		BrokerKBPerDv:         pick(func(s *BenchSample) float64 { return s.BrokerKBPerDv }),
		SimKBPerDv:            pick(func(s *BenchSample) float64 { return s.SimKBPerDv }),
		QoS1PerS:              pick(func(s *BenchSample) float64 { return s.QoS1PerS }),
		QoS1DeliveredPerS:     pick(func(s *BenchSample) float64 { return s.QoS1DeliveredPerS }),
		QoS1LostPct:           pick(func(s *BenchSample) float64 { return s.QoS1LostPct }),
		QoS0PerS:              pick(func(s *BenchSample) float64 { return s.QoS0PerS }),
		BrokerCPUPerConnectMS: pick(func(s *BenchSample) float64 { return s.BrokerCPUPerConnectMS }),
		BrokerCPUPerQoS1US:    pick(func(s *BenchSample) float64 { return s.BrokerCPUPerQoS1US }),
		BrokerCPUPerQoS0US:    pick(func(s *BenchSample) float64 { return s.BrokerCPUPerQoS0US }),
	}
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	slices.Sort(v)
	if n := len(v); n%2 == 1 {
		return v[n/2]
	} else {
		return (v[n/2-1] + v[n/2]) / 2
	}
}

func (b *bench) notes(res *BenchResult) []string {
	c := b.cfg
	notes := []string{
		fmt.Sprintf("connect storm: %d devices (own keys and certificates), offered at %g/s (open model; latency from each device's intended start, so queueing counts), max handshakes in flight %s; connects/s = devices ready / (first intended start to last ready); p99 connect = to CONNACK (mqtt targets) or to the first fkx1 epoch (fleetkey-fkx1); KB/device = peak RSS during the storm minus RSS before it, over the devices connected",
			c.Devices, c.Rate, map[bool]string{true: "unlimited", false: fmt.Sprint(c.MaxHandshakes)}[c.MaxHandshakes == 0]),
		fmt.Sprintf("throughput: %d devices, one %d-byte record each every %s (%.0f msg/s offered) for %s, with one service client subscribed (QoS 1; paho, in a process of its own, so that its acknowledgements do not wait behind the devices in the generator's scheduler); QoS 1 acked/s = PUBACKs a second, delivered/s and QoS 0 msg/s = records the service received a second, each over the span from the first to the last (a broker that falls behind is measured at the pace it kept); QoS 1 lost = acknowledged but never received by the service (fleetkey-fkx1: never stored in its sink), as a share of those acknowledged; a run ends %s after the load, so a broker that fell further behind leaves records unacknowledged (listed below, not counted as lost); a device keeps at most 1,024 records waiting for their PUBACK and drops the oldest beyond that (listed below): those were sent, and their PUBACKs, if any, are not counted, so delivered/s is then the truer figure",
			c.ThroughputDevices, c.Payload, c.Interval, float64(c.ThroughputDevices)/c.Interval.Seconds(), c.Duration, benchDrain),
		"broker CPU = user and system time of the broker's process (/proc/PID/stat) over the storm, per device made ready, and over each throughput run, per record published; on a machine the generator shares, a broker that needs less CPU leaves more to the load",
		"fleetkey-fkx1 PUBACKs a record only once it is decrypted and fsync'd to the gateway's telemetry sink (group commit): that is the product, measured as is; the other targets PUBACK from memory",
		"every broker runs in a process of its own, a fresh one for each run (storm, QoS 1, QoS 0) of each target in each round, targets in a rotated order each round, on 127.0.0.1 with mTLS (client certificates required, verified against the fleet's CAs); the simulator and the broker share the machine's cores",
		"Mosquitto verifies the client chain up to the fleet's P-384 root on every handshake (OpenSSL has no partial chains by default); the Go brokers stop at the issuing CA; the devices verify every broker against the issuing CA",
		"the devices are Go TLS clients with Go's defaults: they offer X25519MLKEM768, which the Go brokers (fleetkey, mochi) accept and Mosquitto 2 with OpenSSL 3.0 does not (it takes X25519); fleetkey-fkx1's devices also run their side of fkx1 (handshake, sealing) on the cores the gateway uses",
	}
	for t, why := range res.Skipped {
		notes = append(notes, fmt.Sprintf("%s skipped: %s", t, why))
	}
	if res.Baseline != "" && res.Baseline != BenchMosquitto {
		notes = append(notes, "no Mosquitto in this run: the ratios are against "+res.Baseline)
	}
	return notes
}

// WriteTable prints the medians and their ratios to the baseline, then the
// versions, the notes and any problem seen.
func (r *BenchResult) WriteTable(w io.Writer) error {
	if r.Baseline != "" {
		fmt.Fprintf(w, "bench-peers: medians of %d rounds; (x) = ratio to %s measured in the same run (p99, KB and CPU: lower is better)\n\n", r.Config.Rounds, r.Baseline)
	} else {
		fmt.Fprintf(w, "bench-peers: medians of %d rounds (no mosquitto or mochi in the run: no ratios)\n\n", r.Config.Rounds)
	}
	base := r.Medians[r.Baseline]
	type col struct {
		name  string
		f     func(BenchFigures) float64
		prec  int
		ratio bool
	}
	table := func(cols []col) error {
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintf(tw, "%-14s\t", "target")
		for _, c := range cols {
			fmt.Fprintf(tw, "%s\t", c.name)
			if c.ratio {
				fmt.Fprint(tw, "\t")
			}
		}
		fmt.Fprintln(tw)
		for _, t := range r.Targets {
			fmt.Fprintf(tw, "%-14s\t", t)
			for _, c := range cols {
				v := c.f(r.Medians[t])
				fmt.Fprintf(tw, "%.*f\t", c.prec, v)
				if c.ratio {
					if b := c.f(base); v != 0 && b != 0 {
						fmt.Fprintf(tw, "%.2fx\t", v/b)
					} else {
						fmt.Fprint(tw, "-\t")
					}
				}
			}
			fmt.Fprintln(tw)
		}
		return tw.Flush()
	}
	if err := table([]col{
		{"connects/s", func(m BenchFigures) float64 { return m.ConnectsPerS }, 0, true},
		{"p99 connect ms", func(m BenchFigures) float64 { return m.ConnectP99MS }, 0, true},
		{"broker KB/device", func(m BenchFigures) float64 { return m.BrokerKBPerDv }, 1, true},
		{"sim KB/device", func(m BenchFigures) float64 { return m.SimKBPerDv }, 1, true},
		{"QoS 1 acked/s", func(m BenchFigures) float64 { return m.QoS1PerS }, 0, true},
		{"QoS 1 delivered/s", func(m BenchFigures) float64 { return m.QoS1DeliveredPerS }, 0, true},
		{"QoS 1 lost %", func(m BenchFigures) float64 { return m.QoS1LostPct }, 2, false},
		{"QoS 0 msg/s", func(m BenchFigures) float64 { return m.QoS0PerS }, 0, true},
	}); err != nil {
		return err
	}
	fmt.Fprintln(w)
	if err := table([]col{
		{"broker CPU ms/connect", func(m BenchFigures) float64 { return m.BrokerCPUPerConnectMS }, 2, true},
		{"broker CPU µs/QoS 1 record", func(m BenchFigures) float64 { return m.BrokerCPUPerQoS1US }, 1, true},
		{"broker CPU µs/QoS 0 record", func(m BenchFigures) float64 { return m.BrokerCPUPerQoS0US }, 1, true},
	}); err != nil {
		return err
	}
	fmt.Fprintln(w)
	for _, t := range BenchTargets {
		if v, ok := r.Versions[t]; ok && (slices.Contains(r.Targets, t) || t == BenchMosquitto) {
			fmt.Fprintf(w, "version %s: %s\n", t, v)
		}
	}
	for _, n := range r.Notes {
		fmt.Fprintln(w, "note: "+n)
	}
	for _, s := range r.Samples {
		if s.Err != "" || len(s.Problems) > 0 {
			fmt.Fprintf(w, "round %d %s\n", s.Round, s.line())
		}
	}
	return nil
}

// PeerGatewayMain is the body of a hidden subcommand (`simulator
// peer-gateway`) that runs the fleetkey gateway (gateway/server) in a
// process of its own, for bench-peers. Flags:
//
//	--pki DIR          the fleet PKI (bundle.pem, gateway.crt, gateway.key)
//	--sink FILE        the telemetry sink
//	--plaintext        plaintext_telemetry: fkx1 off
//	--listen ADDR      default 127.0.0.1:0 (never :1883)
//	--addr-file FILE   where to write the bound address (required)
//	--cpuprofile FILE  write a CPU profile until the gateway stops
//
// The gateway takes any number of connections a second from one address
// (the load comes from one), serves no metrics and follows no provisioning
// service. It logs errors to stderr and serves until ctx ends.
func PeerGatewayMain(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("peer-gateway", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	pki := fs.String("pki", "", "the fleet PKI `dir`")
	sink := fs.String("sink", "", "the telemetry sink `file`")
	plain := fs.Bool("plaintext", false, "plaintext_telemetry (fkx1 off)")
	listen := fs.String("listen", "127.0.0.1:0", "`address` to listen on")
	addrFile := fs.String("addr-file", "", "`file` to write the bound address to")
	cpuProfile := fs.String("cpuprofile", "", "write a CPU profile to this `file`")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("peer-gateway: %w", err)
	}
	if fs.NArg() > 0 || *pki == "" || *sink == "" || *addrFile == "" {
		return errors.New("peer-gateway: --pki, --sink and --addr-file are required, and nothing else")
	}
	if _, port, err := net.SplitHostPort(*listen); err != nil || port == "1883" {
		return fmt.Errorf("peer-gateway: --listen %q: want host:port, never 1883", *listen)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))
	gw, err := gwserver.New(gwserver.Config{PKIDir: *pki, TelemetrySink: *sink, MetricsListen: "off", Listen: *listen,
		ConnPerSecondPerAddr: 1 << 20, PlaintextTelemetry: *plain}, log)
	if err != nil {
		return fmt.Errorf("peer-gateway: %w", err)
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("peer-gateway: %w", err)
	}
	tmp := *addrFile + ".tmp"
	if err := os.WriteFile(tmp, []byte(ln.Addr().String()+"\n"), 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("peer-gateway: %w", err)
	}
	if err := os.Rename(tmp, *addrFile); err != nil {
		ln.Close()
		return fmt.Errorf("peer-gateway: %w", err)
	}
	defer os.Remove(*addrFile)
	stopProfile, err := CPUProfileTo(*cpuProfile)
	if err != nil {
		ln.Close()
		return fmt.Errorf("peer-gateway: %w", err)
	}
	defer stopProfile()
	return gw.Serve(ctx, ln, nil)
}
