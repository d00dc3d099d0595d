package simulator

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"fleetkey.dev/certs/identity"
	"fleetkey.dev/certs/trust"
	"fleetkey.dev/device-agent/agent"
	"fleetkey.dev/sessionkey"
	"fleetkey.dev/simulator/peers"
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
	// every record published is in it exactly once.
	Sink string
	// Target: TargetFleetkey (default) or TargetMQTT.
	Target Target
	// Bundle authenticates the gateway as the fleet's (TargetFleetkey).
	Bundle *trust.Bundle
	// AtMostOnce sends telemetry at QoS 0 (default QoS 1). Channel is
	// one channel or a comma-separated list the records take in turn;
	// default "telemetry".
	AtMostOnce bool
	// Template, if set, is each record's body after its 16-byte header,
	// with {{device}}, {{seq}} and {{unix_ms}} filled in; otherwise the
	// body is Payload bytes.
	Template string
	channels []string
	Channel  string
	// Service, if set, is a service credential: the run subscribes to the
	// records it delivers (end-to-end latency, loss at the receiver) and
	// sends commands with it.
	Service *tls.Certificate
	// ServiceTopic is what the service subscribes to; default
	// fleet/telemetry/+/CHANNEL (the gateway's delivery) for TargetFleetkey
	// and devices/+/up/CHANNEL for TargetMQTT.
	ServiceTopic string
	// CommandRate is commands per second the service sends to connected
	// devices, in all (TargetFleetkey).
	CommandRate float64
	// ServiceCmd, if set, runs the service's MQTT client in a process of
	// its own (`simulator peer-service`, made by ServiceCmd with the
	// arguments given), which streams what it receives back: a service in
	// the generator's process waits for the Go scheduler behind every
	// device, and its slow acknowledgements then pace any broker that
	// keeps a window of them (bench-peers). No commands then.
	ServiceCmd func(args ...string) *exec.Cmd
	// HeapProfile, if set, is where the run writes a heap profile of its
	// process once the telemetry has drained, every device still
	// connected (go tool pprof -sample_index=inuse_space).
	HeapProfile string
	// Attacks run against the stack during the run, one after another,
	// with what they need from it.
	Attacks   []Attack
	AttackEnv AttackEnv
	// Dir holds the devices' state directories.
	Dir string
	// TPM, with enrollment, makes each device's key in a simulated TPM and
	// enrolls it through TPM attestation: "sim", the in-process TPM
	// simulator, whose endorsement seed is changed for each device so that
	// each has an EK of its own. AllowEK adds each EK to the provisioning
	// service's allowlist first (as a factory imports its TPMs' EKs).
	TPM     string
	AllowEK func(ctx context.Context, ekHash []byte) error
	// Identities, if set (one per device, from Fleet.Mint), replace
	// enrollment: the devices connect with them at once.
	Identities []*agent.Credentials
	// Faults happen during the run, at their time after its start.
	Faults []Fault
	// StackInProcess says the stack runs in this process (--local): its
	// memory and CPU are then in the simulator's figures.
	StackInProcess bool
	// Progress, if set, gets a line a second.
	Progress io.Writer
	Log      *slog.Logger
}

// Summary is what a run measured. Latencies are from each operation's
// intended start, so time spent waiting to be served counts.
type Summary struct {
	Target     Target `json:"target"`
	Devices    int    `json:"devices"`
	Enrolled   int    `json:"enrolled"`
	Connected  int    `json:"connected"`
	Connects   int64  `json:"connects"`
	Handshakes int64  `json:"handshakes"`
	Published  int64  `json:"published"`
	Acked      int64  `json:"acked"`
	Received   int64  `json:"received"`
	InSink     int64  `json:"in_sink"`
	Lost       int64  `json:"lost"`
	Duplicated int64  `json:"duplicated"`
	Commands   int64  `json:"commands"`
	// RevokedDropped are records of devices revoked mid-run that were not
	// acknowledged before the gateway cut them off: not counted as
	// published (the gateway may have stored some of them).
	RevokedDropped int64 `json:"revoked_dropped,omitempty"`
	// OutboxDropped are records the devices dropped, oldest first, when
	// 1,024 were waiting for their acknowledgement (the broker not keeping
	// up); not counted as published. Any is a problem.
	OutboxDropped int64 `json:"outbox_dropped,omitempty"`
	// Enroll and ready (the first fkx1 epoch, or CONNACK for TargetMQTT)
	// p50 and p99, kept from the first version of the summary.
	EnrollP50MS float64 `json:"enroll_p50_ms"`
	EnrollP99MS float64 `json:"enroll_p99_ms"`
	ReadyP50MS  float64 `json:"ready_p50_ms"`
	ReadyP99MS  float64 `json:"ready_p99_ms"`
	// ConnectsPerS is devices made ready per second while they arrived;
	// MessagesPerS records acknowledged (QoS 1) or sent (QoS 0) per second
	// in the telemetry phase.
	ConnectsPerS float64               `json:"connects_per_s"`
	MessagesPerS float64               `json:"messages_per_s"`
	Phases       map[string]PhaseStats `json:"phases"`
	Errors       map[string]int64      `json:"errors,omitempty"`
	Attacks      []AttackResult        `json:"attacks,omitempty"`
	Faults       []string              `json:"faults,omitempty"`
	// The generator's self-check: a run is invalid when the simulator
	// itself fell behind.
	Valid          bool     `json:"valid"`
	Invalid        []string `json:"invalid,omitempty"`
	RSSPeakMB      float64  `json:"sim_rss_peak_mb"`
	RSSPerDeviceKB float64  `json:"sim_rss_per_device_kb"`
	// StackInProcess: the RSS figures include the stack (--local).
	StackInProcess bool      `json:"stack_in_process,omitempty"`
	Series         Series    `json:"series"`
	Seconds        float64   `json:"seconds"`
	Started        time.Time `json:"started"`
	// Problems are the run's failures as sentences (loss, duplicates,
	// devices never connected, attacks let in).
	Problems []string `json:"problems,omitempty"`
	// Notes are what the run saw that is not a failure.
	Notes []string `json:"notes,omitempty"`
}

// Run runs the fleet and returns its summary.
func Run(ctx context.Context, cfg RunConfig) (*Summary, error) {
	if cfg.Devices <= 0 || cfg.Rate <= 0 || cfg.Interval <= 0 {
		return nil, fmt.Errorf("devices, rate and interval must be positive")
	}
	if cfg.Identities != nil && len(cfg.Identities) != cfg.Devices {
		return nil, fmt.Errorf("%d identities for %d devices", len(cfg.Identities), cfg.Devices)
	}
	if cfg.TPM != "" && (cfg.TPM != "sim" || cfg.Identities != nil || cfg.AllowEK == nil) {
		return nil, fmt.Errorf("--tpm: only \"sim\" (the in-process simulator), with --identities enroll and a provisioning admin to allow each EK (--local)")
	}
	switch cfg.Target {
	case "":
		cfg.Target = TargetFleetkey
	case TargetFleetkey, TargetMQTT:
	default:
		return nil, fmt.Errorf("target %q: fleetkey or mqtt", cfg.Target)
	}
	if cfg.Channel == "" {
		cfg.Channel = "telemetry"
	}
	for c := range strings.SplitSeq(cfg.Channel, ",") {
		if c == sessionkey.KexChannel || identity.ValidateID(c) != nil {
			return nil, fmt.Errorf("channel %q: one topic level of letters, digits, '.', '_' and '-', and not %q", c, sessionkey.KexChannel)
		}
		cfg.channels = append(cfg.channels, c)
	}
	if len(cfg.Template) > 60_000 {
		return nil, fmt.Errorf("a payload template of %d bytes: the limit is 60,000", len(cfg.Template))
	}
	if cfg.Dir == "" && (cfg.Identities == nil || len(cfg.Attacks) > 0) {
		return nil, errors.New("RunConfig.Dir is required to enroll devices or run attacks: it holds their state directories")
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if len(cfg.Identities) > 0 && cfg.Identities[0].Bundle != nil {
		if cfg.Bundle == nil {
			cfg.Bundle = cfg.Identities[0].Bundle
		}
		if cfg.RootCAs == nil {
			cfg.RootCAs = cfg.Bundle.RootPool()
		}
	}
	rss0, _ := peers.RSS(os.Getpid())
	start := time.Now()
	m := newMeter(start)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sched := cfg.Schedule
	if sched == nil {
		sched, _ = ParseSchedule("constant", cfg.Rate)
	}
	f, err := newFleet(ctx, &cfg, m, start)
	if err != nil {
		return nil, err
	}
	arrived := start.Add(sched(cfg.Devices - 1))
	f.stopPub = arrived.Add(cfg.Duration)
	var recv *receiver
	if cfg.Service != nil {
		if recv, err = startReceiver(ctx, &cfg, m); err != nil {
			f.close()
			return nil, err
		}
		defer recv.stop()
	}
	f.devs = make([]*vdev, cfg.Devices)
	for i := range f.devs {
		v := &vdev{f: f, idx: i, id: deviceID(i)}
		if cfg.Identities != nil {
			v.creds = cfg.Identities[i]
		}
		if cfg.Target == TargetFleetkey {
			v.dev = agent.NewDevice(v.id, agent.DeviceOptions{Suite: cfg.Suite, Rotation: cfg.Rotation, OnEpoch: v.onEpoch, OnCommand: v.onCommand})
		}
		f.devs[i] = v
	}
	var timers []*time.Timer
	for i, v := range f.devs {
		intended := start.Add(sched(i))
		timers = append(timers, time.AfterFunc(time.Until(intended), func() { v.start(intended) }))
	}
	var sampler sync.WaitGroup
	samplerDone := make(chan struct{})
	var rssPeak atomic.Int64
	sampler.Go(func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		cpu := newCPUMeter()
		for {
			select {
			case <-samplerDone:
				return
			case now := <-t.C:
				box, self := cpu.sample()
				m.sample(now, box)
				m.selfCPU = append(m.selfCPU, self)
				if r, err := peers.RSS(os.Getpid()); err == nil && r > rssPeak.Load() {
					rssPeak.Store(r)
				}
				if cfg.Progress != nil {
					fmt.Fprintf(cfg.Progress, "\r%5.0fs  connected %d/%d  published %d  acked %d  received %d  errors %d   ", now.Sub(start).Seconds(),
						m.connected.Load(), cfg.Devices, m.published.Load(), m.acked.Load(), m.received.Load(), sumCounts(m.errorCounts()))
				}
			}
		}
	})
	faults := runFaults(ctx, &cfg, f, start)
	attacks := runAttacks(ctx, &cfg, f, start, recv)
	sleepUntil(ctx, f.stopPub)
	// Drain: every record acknowledged (QoS 1) and received, within 30 s.
	drain := time.NewTimer(30 * time.Second)
	poll := time.NewTicker(100 * time.Millisecond)
	lastRecv, still := int64(-1), 0
	for done := false; !done; {
		select {
		case <-ctx.Done():
			done = true
		case <-drain.C:
			done = true
		case <-poll.C:
			// Acknowledged all; and received all, or (after a gateway
			// restart, whose deliveries may be lost) nothing more for 1 s.
			r := m.received.Load()
			if r == lastRecv {
				still++
			} else {
				lastRecv, still = r, 0
			}
			acked := cfg.AtMostOnce || m.acked.Load() >= m.published.Load()
			done = acked && (recv == nil || r >= m.acked.Load() || (restarted(cfg.Faults) && still >= 10))
		}
	}
	drain.Stop()
	poll.Stop()
	for _, t := range timers {
		t.Stop()
	}
	if cfg.HeapProfile != "" {
		if err := writeHeapProfile(cfg.HeapProfile); err != nil {
			m.fail("heap profile: " + err.Error())
		}
	}
	unacked := 0
	for _, v := range f.devs {
		unacked += v.unacked()
		v.stop()
	}
	cancel()
	f.close()
	close(samplerDone)
	sampler.Wait()
	if cfg.Progress != nil {
		fmt.Fprintln(cfg.Progress)
	}
	sum := &Summary{Target: cfg.Target, Devices: cfg.Devices, Started: start, Seconds: time.Since(start).Seconds(),
		Connects: m.connects.Load(), Handshakes: m.handshakes.Load(), Published: m.published.Load(), Acked: m.acked.Load(),
		Received: m.received.Load(), Commands: m.commands.Load(), RevokedDropped: m.revokedDropped.Load(), OutboxDropped: m.outboxDropped.Load(), Faults: faults.wait(), Attacks: attacks.wait(),
		Phases: m.stats(), Errors: m.errorCounts(), Series: m.seriesCopy()}
	if e, ok := sum.Phases[PhaseEnroll]; ok {
		sum.Enrolled = int(e.Count)
		sum.EnrollP50MS, sum.EnrollP99MS = e.P50MS, e.P99MS
	}
	if cfg.Identities != nil {
		sum.Enrolled = cfg.Devices
	}
	readyPhase := PhaseFKX1
	if cfg.Target == TargetMQTT {
		readyPhase = PhaseConnack
	}
	for _, v := range f.devs {
		v.mu.Lock()
		if v.firstAck || v.everReady {
			sum.Connected++
		}
		v.mu.Unlock()
	}
	if r, ok := sum.Phases[readyPhase]; ok {
		sum.ReadyP50MS, sum.ReadyP99MS = r.P50MS, r.P99MS
	}
	if d := arrived.Sub(start).Seconds(); d > 0 {
		sum.ConnectsPerS = float64(sum.Connected) / max(d, 1)
	}
	if cfg.Duration > 0 {
		n := sum.Acked
		if cfg.AtMostOnce {
			n = sum.Published
		}
		sum.MessagesPerS = float64(n) / cfg.Duration.Seconds()
	}
	sum.RSSPeakMB, sum.StackInProcess = float64(rssPeak.Load())/(1<<20), cfg.StackInProcess
	sum.RSSPerDeviceKB = float64(max(rssPeak.Load()-rss0, 0)) / 1024 / float64(cfg.Devices)
	m.judge(sum)
	if recv != nil {
		sum.Duplicated += recv.duplicates()
		if n := recv.foreignCount(); n > 0 {
			sum.Notes = append(sum.Notes, fmt.Sprintf("the service received %d records that were not this run's devices' (another publisher, or garbled)", n))
		}
		if cfg.Sink == "" && !cfg.AtMostOnce {
			sum.Lost = max(sum.Published-sum.Received, 0)
		}
	}
	if cfg.Sink != "" {
		if err := checkSink(cfg.Sink, f.recBase, f.devs, sum); err != nil {
			return sum, err
		}
	}
	if unacked > 0 && !cfg.AtMostOnce {
		sum.Problems = append(sum.Problems, fmt.Sprintf("%d records not acknowledged 30 s after the run", unacked))
	}
	if recv != nil && !cfg.AtMostOnce && sum.Received < sum.Acked {
		// The sink is what keeps records; the live stream to services is
		// at most once across a gateway restart (its sessions are in
		// memory), so a shortfall then is a note, not a loss.
		msg := fmt.Sprintf("the service received %d of %d acknowledged records", sum.Received, sum.Acked)
		if restarted(cfg.Faults) && cfg.Sink != "" {
			sum.Notes = append(sum.Notes, msg+": the rest were delivered while the gateway restarted, and are in its sink")
		} else {
			sum.Problems = append(sum.Problems, msg)
		}
	}
	if sum.OutboxDropped > 0 {
		sum.Problems = append(sum.Problems, fmt.Sprintf("the devices dropped %d records from full outboxes: the broker did not keep up with the offered load", sum.OutboxDropped))
	}
	if sum.Lost > 0 {
		sum.Problems = append(sum.Problems, fmt.Sprintf("%d records lost", sum.Lost))
	}
	if sum.Duplicated > 0 {
		sum.Problems = append(sum.Problems, fmt.Sprintf("%d records duplicated", sum.Duplicated))
	}
	if sum.Connected < sum.Devices {
		var which []string
		for _, v := range f.devs {
			if len(which) == 3 {
				break
			}
			v.mu.Lock()
			if !v.everReady {
				which = append(which, v.describe())
			}
			v.mu.Unlock()
		}
		sum.Problems = append(sum.Problems, fmt.Sprintf("%d devices never became ready (%s)", sum.Devices-sum.Connected, strings.Join(which, "; ")))
	}
	for _, a := range sum.Attacks {
		if !a.OK {
			sum.Problems = append(sum.Problems, fmt.Sprintf("attack %q: %s", a.Name, a.Verdict))
		}
	}
	return sum, nil
}

func restarted(faults []Fault) bool {
	for _, f := range faults {
		if f.Name == "gateway-restart" {
			return true
		}
	}
	return false
}

func sumCounts(m map[string]int64) (n int64) {
	for _, v := range m {
		n += v
	}
	return n
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

// checkSink reads the sink's records of this run's devices (record ids
// base+seq): each record the gateway acknowledged must be there, once.
// Records that were never acknowledged (a device revoked, or still
// waiting at the end) are reported apart.
func checkSink(path string, base uint64, devs []*vdev, sum *Summary) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	stored := make([]seqSet, len(devs))
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var l struct {
			Device   string `json:"device"`
			RecordID uint64 `json:"record_id"`
		}
		if json.Unmarshal(sc.Bytes(), &l) != nil || l.RecordID < base || l.RecordID-base > maxSeq {
			continue
		}
		num, ok := strings.CutPrefix(l.Device, "sim-")
		idx, err := strconv.Atoi(num)
		if !ok || err != nil || idx < 0 || idx >= len(devs) || deviceID(idx) != l.Device {
			continue // not one of this run's devices (attackers, other runs)
		}
		if !stored[idx].add(uint32(l.RecordID - base)) {
			sum.Duplicated++
			continue
		}
		sum.InSink++
	}
	for i, v := range devs {
		v.mu.Lock()
		sum.Lost += v.ackedSeqs.missingFrom(stored[i])
		v.mu.Unlock()
	}
	return sc.Err()
}
