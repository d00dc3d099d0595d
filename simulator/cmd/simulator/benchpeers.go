package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	"fleetkey.dev/simulator"
	"fleetkey.dev/simulator/peers"
)

const benchPeersUsage = `usage: simulator bench-peers [flags]

The same connect storm and throughput load, in one run, against the fleetkey
gateway (with fkx1, and as a plain mTLS broker: plaintext_telemetry), bare
mochi-mqtt and Mosquitto 2, each in a process of its own on 127.0.0.1 with
mTLS. It prints the medians over the rounds and their ratios to Mosquitto
(to mochi when there is no Mosquitto).

flags:
  --devices N             connect storm: devices (default 2000)
  --rate R                connect storm: devices started per second, open model (default 2000)
  --max-handshakes K      at most K devices between their start and ready (default 0: no cap)
  --throughput-devices M  throughput: devices publishing (default 200)
  --interval D            throughput: each device publishes this often (default 4ms)
  --duration D            throughput: for this long, at QoS 1 and then at QoS 0 (default 5s)
  --payload N             record body bytes (default 64)
  --rounds N              rounds; every run (storm, QoS 1, QoS 0) gets a fresh broker (default 3)
  --targets LIST          default fleetkey-fkx1,fleetkey-mqtt,mochi,mosquitto
  --dir DIR               PKI, identity cache, brokers' files (default a new temporary directory, removed after)
  --json FILE             write every round's figures and run summaries as JSON
  --profile               each fleetkey gateway writes a CPU profile, cpu.pprof, in its
                          run's directory under --dir (go tool pprof bin/simulator FILE)
`

// benchPeers is `simulator bench-peers`.
func benchPeers(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("bench-peers", flag.ContinueOnError)
	fs.Usage = func() { fmt.Fprint(os.Stderr, benchPeersUsage) }
	var cfg simulator.BenchConfig
	fs.IntVar(&cfg.Devices, "devices", 2000, "connect storm devices")
	fs.Float64Var(&cfg.Rate, "rate", 2000, "connect storm: devices started per second")
	fs.IntVar(&cfg.MaxHandshakes, "max-handshakes", 0, "at most this many devices between start and ready (0: no cap)")
	fs.IntVar(&cfg.ThroughputDevices, "throughput-devices", 200, "throughput devices")
	fs.DurationVar(&cfg.Interval, "interval", 4*time.Millisecond, "throughput: publish interval per device")
	fs.DurationVar(&cfg.Duration, "duration", 5*time.Second, "throughput: duration at each QoS")
	fs.IntVar(&cfg.Payload, "payload", 64, "record body bytes")
	fs.IntVar(&cfg.Rounds, "rounds", 3, "rounds")
	targets := fs.String("targets", strings.Join(simulator.BenchTargets, ","), "targets")
	dir := fs.String("dir", "", "state directory (default a new temporary one, removed after the run)")
	jsonOut := fs.String("json", "", "write the raw figures as JSON here")
	fs.BoolVar(&cfg.Profile, "profile", false, "fleetkey gateways write cpu.pprof into their run directories")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("bench-peers: unexpected arguments %q", fs.Args())
	}
	for t := range strings.SplitSeq(*targets, ",") {
		if t = strings.TrimSpace(t); t != "" {
			cfg.Targets = append(cfg.Targets, t)
		}
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	cfg.Child = func(sub string, args ...string) *exec.Cmd {
		return exec.Command(exe, append([]string{sub}, args...)...)
	}
	cfg.Progress = os.Stderr
	if cfg.Dir = *dir; cfg.Dir == "" {
		if cfg.Dir, err = os.MkdirTemp("", "fleetkey-bench-peers-"); err != nil {
			return err
		}
		defer os.RemoveAll(cfg.Dir)
	} else if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "bench-peers: state in %s\n", cfg.Dir)
	res, err := simulator.RunBench(ctx, cfg)
	if res != nil {
		if werr := res.WriteTable(os.Stdout); werr != nil {
			return werr
		}
		if *jsonOut != "" {
			b, _ := json.MarshalIndent(res, "", "  ")
			if werr := os.WriteFile(*jsonOut, append(b, '\n'), 0o644); werr != nil {
				return werr
			}
		}
	}
	if err != nil {
		return err
	}
	var failed []string
	for _, s := range res.Samples {
		if s.Err != "" {
			failed = append(failed, fmt.Sprintf("round %d %s: %s", s.Round, s.Target, s.Err))
		}
	}
	if len(failed) > 0 {
		return errors.New("bench-peers: " + strings.Join(failed, "; "))
	}
	return nil
}

// peerMochi is the hidden `simulator peer-mochi`: bare mochi in a process
// of its own (bench-peers starts it).
func peerMochi(ctx context.Context, args []string) error { return peers.MochiMain(ctx, args) }

// peerGateway is the hidden `simulator peer-gateway`: the fleetkey gateway
// in a process of its own (bench-peers starts it).
func peerGateway(ctx context.Context, args []string) error {
	return simulator.PeerGatewayMain(ctx, args)
}
