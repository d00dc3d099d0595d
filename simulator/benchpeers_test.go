package simulator

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"fleetkey.dev/simulator/peers"
)

const benchHelperEnv = "FLEETKEY_BENCH_PEER"

// TestBenchPeerHelper is not a test: it is a broker child of
// TestBenchPeers, which re-runs this test binary with benchHelperEnv set to
// the subcommand (peer-mochi, peer-gateway, peer-service) and its
// arguments after "--".
func TestBenchPeerHelper(t *testing.T) {
	sub := os.Getenv(benchHelperEnv)
	if sub == "" {
		return
	}
	args := os.Args
	for i, a := range args {
		if a == "--" {
			args = args[i+1:]
			break
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	var err error
	switch sub {
	case "peer-mochi":
		err = peers.MochiMain(ctx, args)
	case "peer-gateway":
		err = PeerGatewayMain(ctx, args)
	case "peer-service":
		err = PeerServiceMain(ctx, args, os.Stdout)
	default:
		err = fmt.Errorf("unknown helper %q", sub)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	os.Exit(0)
}

func benchChild(sub string, args ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], append([]string{"-test.run=^TestBenchPeerHelper$", "--"}, args...)...)
	// The race detector's runtime otherwise sleeps 1 s at exit.
	cmd.Env = append(os.Environ(), benchHelperEnv+"="+sub, "GORACE="+strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0"))
	return cmd
}

// TestBenchPeers runs a tiny bench-peers end to end: every target (but
// Mosquitto when it is not installed) connects every device, carries
// records at both QoS, and loses none at QoS 1.
func TestBenchPeers(t *testing.T) {
	if testing.Short() {
		t.Skip("starts four brokers")
	}
	const devices = 50
	var progress bytes.Buffer
	res, err := RunBench(t.Context(), BenchConfig{Dir: t.TempDir(), Rounds: 1, Devices: devices, Rate: 500, ThroughputDevices: 10,
		Interval: 10 * time.Millisecond, Duration: time.Second, KDFIterations: 1000, Child: benchChild, Progress: &progress})
	t.Log(progress.String())
	if err != nil {
		t.Fatal(err)
	}
	var table bytes.Buffer
	if err := res.WriteTable(&table); err != nil {
		t.Fatal(err)
	}
	t.Log(table.String())
	want := BenchTargets
	if why, ok := res.Skipped[BenchMosquitto]; ok {
		t.Logf("mosquitto skipped: %s", why)
		want = want[:3]
		if res.Baseline != BenchMochi {
			t.Errorf("baseline %q without mosquitto, want mochi", res.Baseline)
		}
	} else if res.Baseline != BenchMosquitto || !strings.HasPrefix(res.Versions[BenchMosquitto], "2.") {
		t.Errorf("baseline %q, mosquitto version %q", res.Baseline, res.Versions[BenchMosquitto])
	}
	if !slices.Equal(res.Targets, want) {
		t.Fatalf("targets %v, want %v", res.Targets, want)
	}
	if len(res.Samples) != len(want) {
		t.Fatalf("%d samples for %d targets", len(res.Samples), len(want))
	}
	for _, s := range res.Samples {
		if s.Err != "" {
			t.Errorf("%s: %s", s.Target, s.Err)
			continue
		}
		if s.Connected != devices || s.ConnectsPerS <= 0 || s.ConnectP99MS <= 0 || s.BrokerRSSPeakMB <= 0 {
			t.Errorf("%s: storm: %d/%d ready, %.0f/s, p99 %.1f ms, broker peak %.1f MB", s.Target, s.Connected, devices, s.ConnectsPerS, s.ConnectP99MS, s.BrokerRSSPeakMB)
		}
		if s.QoS1PerS <= 0 || s.QoS1DeliveredPerS <= 0 || s.QoS0PerS <= 0 || s.QoS1Published == 0 || s.QoS1Acked != s.QoS1Published {
			t.Errorf("%s: throughput: QoS 1 %.0f/s (%d of %d acked), delivered %.0f/s, QoS 0 %.0f/s", s.Target, s.QoS1PerS, s.QoS1Acked, s.QoS1Published, s.QoS1DeliveredPerS, s.QoS0PerS)
		}
		if s.QoS1Lost != 0 || s.QoS1Unacked != 0 || s.QoS1Dup != 0 || s.QoS1LostPct != 0 || s.QoS1Received != s.QoS1Published {
			t.Errorf("%s: QoS 1: %d lost, %d unacknowledged, %d duplicated, %d of %d received", s.Target, s.QoS1Lost, s.QoS1Unacked, s.QoS1Dup, s.QoS1Received, s.QoS1Published)
		}
		if len(s.Problems) > 0 {
			t.Errorf("%s: problems: %q", s.Target, s.Problems)
		}
		if s.Target == BenchFleetkeyFKX1 && (s.QoS1.InSink != s.QoS1Published || s.Storm.InSink != s.Storm.Published) {
			t.Errorf("fleetkey-fkx1: %d of %d records in the sink (storm %d of %d)", s.QoS1.InSink, s.QoS1Published, s.Storm.InSink, s.Storm.Published)
		}
		if m := res.Medians[s.Target]; m.ConnectsPerS != s.ConnectsPerS || m.QoS1PerS != s.QoS1PerS {
			t.Errorf("%s: the median of one round is not that round: %+v", s.Target, m)
		}
	}
	for _, tg := range want {
		if !strings.Contains(table.String(), tg) {
			t.Errorf("the table has no row %s", tg)
		}
	}
	if !strings.Contains(table.String(), "1.00x") {
		t.Error("the table has no ratios")
	}
}

func TestBenchConfigRefused(t *testing.T) {
	child := func(string, ...string) *exec.Cmd { return nil }
	for _, cfg := range []BenchConfig{
		{Dir: t.TempDir(), Child: child, Targets: []string{"emqx"}},
		{Dir: t.TempDir(), Child: child, Targets: []string{BenchMochi, BenchMochi}},
		{Dir: t.TempDir(), Child: child, Rate: -1},
		{Dir: t.TempDir(), Child: child, Payload: 8},
		{Child: child},
		{Dir: t.TempDir()},
	} {
		if _, err := RunBench(t.Context(), cfg); err == nil {
			t.Errorf("%+v: no error", cfg)
		}
	}
}

func TestPeerGatewayMainRefuses(t *testing.T) {
	dir := t.TempDir()
	// The plaintext MQTT port is refused before anything is bound.
	for want, args := range map[string][]string{
		"never 1883":   {"--pki", dir, "--sink", filepath.Join(dir, "sink"), "--addr-file", filepath.Join(dir, "addr"), "--listen", "127.0.0.1:1883"},
		"required":     {"--pki", dir, "--sink", filepath.Join(dir, "sink")},
		"nothing else": {"--pki", dir, "--sink", filepath.Join(dir, "sink"), "--addr-file", filepath.Join(dir, "addr"), "extra"},
	} {
		if err := PeerGatewayMain(t.Context(), args); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v; want %q", args, err, want)
		}
	}
}

func TestMedian(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{{nil, 0}, {[]float64{3}, 3}, {[]float64{5, 1, 3}, 3}, {[]float64{4, 1, 3, 2}, 2.5}} {
		if got := median(slices.Clone(c.in)); got != c.want {
			t.Errorf("median(%v) = %v, want %v", c.in, got, c.want)
		}
	}
}

// TestExternalServiceRefusals: a service process that cannot subscribe
// fails the run with what it said; commands need the service in process.
func TestExternalServiceRefusals(t *testing.T) {
	t.Parallel()
	cfg := &RunConfig{Gateway: "127.0.0.1:1", channels: []string{"telemetry"},
		ServiceCmd: func(args ...string) *exec.Cmd { return benchChild("peer-service", args...) }}
	_, err := startReceiver(t.Context(), cfg, newMeter(time.Now()))
	if err == nil || !strings.Contains(err.Error(), "ended before it subscribed") || !strings.Contains(err.Error(), "--pki, --gateway and --topic are required") {
		t.Fatalf("a service process without --pki: %v", err)
	}
	cfg.CommandRate = 1
	if _, err := startReceiver(t.Context(), cfg, newMeter(time.Now())); err == nil || !strings.Contains(err.Error(), "commands need the service in this process") {
		t.Fatalf("commands with a service process: %v", err)
	}
}
