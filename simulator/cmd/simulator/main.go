// Command simulator drives fleets of virtual devices through fleetkey.
//
//	simulator local [--dir DIR]           the whole stack on loopback, until interrupted
//	simulator run --local [flags]         the stack, then a fleet through it
//	simulator run --provisioning URL --ca ROOT.pem --token T --gateway HOST:PORT [flags]
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"fleetkey.dev/certs/trust"
	"fleetkey.dev/sessionkey"
	"fleetkey.dev/simulator"
)

const usage = `usage:
  simulator local [--dir DIR] [--processes]
      provisioning and the gateway on free ports, in this process or (--processes) as the
      binaries beside this one; prints the endpoints, a token and commands to try
  simulator run --local [--processes] [flags]
      a fleet through a stack started first
  simulator run --gateway HOST:PORT --ca ROOT.pem [--provisioning URL] [--pki DIR] [--metrics URL] [flags]
      a fleet through a stack running elsewhere (make up prints such a command)
  simulator bench-peers [flags]
      the same load on the fleetkey gateway, bare mochi and Mosquitto

Each command's --help lists its flags. The main ones of run:
  --devices N, --rate R, --schedule constant|ramp:D|burst:N/P|poisson, --max-handshakes K
  --identities enroll|fast, --tpm sim, --duration D, --interval D, --payload N | --template T
  --qos 0|1, --channel A,B, --command-rate R, --target fleetkey|mqtt
  --fault gateway-restart@D|churn:P%|storm:P%@D|revoke:N@D (repeatable), --attack all|NAME:TRIES
  --slo 'connect_p99<2s,loss=0', --json FILE, --report FILE, --scenario FILE.yaml
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch os.Args[1] {
	case "local":
		err = local(ctx, os.Args[2:])
	case "run":
		err = run(ctx, os.Args[2:])
	case "bench-peers":
		err = benchPeers(ctx, os.Args[2:])
	case "peer-mochi":
		err = peerMochi(ctx, os.Args[2:])
	case "peer-gateway":
		err = peerGateway(ctx, os.Args[2:])
	case "peer-service":
		err = simulator.PeerServiceMain(ctx, os.Args[2:], os.Stdout)
	case "-h", "--help", "help":
		fmt.Print(usage)
		return
	default:
		err = fmt.Errorf("unknown command %q\n%s", os.Args[1], usage)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "simulator:", err)
		os.Exit(1)
	}
}

// binDir is the directory of this executable, where make build puts the
// provisioning and gateway binaries too.
func binDir() (string, error) {
	exe, err := os.Executable()
	if err != nil {
		return "", err
	}
	return filepath.Dir(exe), nil
}

func stateDir(flagDir string) (string, error) {
	if flagDir != "" {
		return flagDir, os.MkdirAll(flagDir, 0o700)
	}
	return os.MkdirTemp("", "fleetkey-sim-")
}

func local(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("local", flag.ContinueOnError)
	dir := fs.String("dir", "", "state directory (default a new temporary one)")
	cpuProfile := fs.String("cpuprofile", "", "write a CPU profile of the stack, until it stops, to this file")
	processes := fs.Bool("processes", false, "run provisioning and the gateway as child processes (the binaries beside this one), not in this process")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var opts simulator.LocalOptions
	if *processes {
		if *cpuProfile != "" {
			return errors.New("--cpuprofile profiles this process: not with --processes")
		}
		bin, err := binDir()
		if err != nil {
			return err
		}
		opts.Bin = bin
	}
	stopProfile, err := simulator.CPUProfileTo(*cpuProfile)
	if err != nil {
		return err
	}
	defer stopProfile()
	d, err := stateDir(*dir)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	s, err := simulator.StartLocalWith(ctx, d, log, opts)
	if err != nil {
		return err
	}
	tok, err := s.Token(ctx, "", 1000)
	if err != nil {
		s.Stop()
		return err
	}
	pki := s.PKI
	if *processes {
		fmt.Printf("provisioning and the gateway run as child processes; their logs: %s, %s\n",
			filepath.Join(d, "provisioning.log"), filepath.Join(d, "gateway.log"))
	}
	fmt.Printf(`fleetkey is up (state in %s); Ctrl-C stops it.

  provisioning  %s   (EST: /.well-known/est/, attestation: /attest/v1/)
  gateway       mqtts://%s
  metrics       %s   (the gateway's)
  telemetry     %s (the gateway's sink)
  token         %s   (1000 enrollments)

enroll and run a device:
  bin/device-agent enroll --provisioning %s --ca %s --token %s --id dev-1 --dir %s/dev-1
  bin/device-agent run --dir %s/dev-1 --gateway %s --source synthetic:1s

watch the decrypted telemetry as a service:
  mosquitto_sub -h localhost -p %s --cafile %s --cert %s --key %s -i service -t 'fleet/telemetry/#' -v

drive a simulated fleet through it, attacks checked against the gateway's counters:
  bin/simulator run --gateway %s --provisioning %s --ca %s --pki %s --metrics %s --devices 100 --duration 30s --attack all
`, d, s.Provisioning, s.Gateway, s.Metrics, s.Sink, tok, s.Provisioning, s.RootPEMFile(), tok, d, d, s.Gateway,
		s.Gateway[len("localhost:"):], s.RootPEMFile(), filepath.Join(pki, "service.crt"), filepath.Join(pki, "service.key"),
		s.Gateway, s.Provisioning, s.RootPEMFile(), pki, s.Metrics)
	<-ctx.Done()
	return s.Stop()
}

func run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	scenario := fs.String("scenario", "", "a YAML scenario file: its keys are these flags (flags given on the command line win)")
	localStack := fs.Bool("local", false, "start the stack in this process first")
	processes := fs.Bool("processes", false, "with --local: provisioning and the gateway as child processes (the binaries beside this one)")
	dir := fs.String("dir", "", "state directory")
	prov := fs.String("provisioning", "", "provisioning URL")
	caFile := fs.String("ca", "", "fleet root (PEM)")
	token := fs.String("token", "", "enrollment token")
	gw := fs.String("gateway", "", "gateway HOST:PORT")
	metricsURL := fs.String("metrics", "", "the gateway's metrics URL (http://HOST:9102/metrics): attacks check its refusal counters (without --local)")
	target := fs.String("target", "fleetkey", "fleetkey (mTLS + fkx1) or mqtt (plain mTLS MQTT, for any broker)")
	devices := fs.Int("devices", 100, "devices")
	rate := fs.Float64("rate", 50, "devices started per second")
	schedSpec := fs.String("schedule", "constant", "constant, ramp:D, burst:N/P or poisson")
	maxHS := fs.Int("max-handshakes", 0, "at most this many devices between start and their first key (0: no cap)")
	duration := fs.Duration("duration", 60*time.Second, "telemetry phase")
	interval := fs.Duration("interval", time.Second, "publish interval")
	payload := fs.Int("payload", 64, "record body bytes")
	qos := fs.Int("qos", 1, "telemetry QoS, 0 or 1")
	channel := fs.String("channel", "telemetry", "telemetry channel, or a comma-separated list the records take in turn")
	template := fs.String("template", "", "record body after its 16-byte header, with {{device}}, {{seq}}, {{unix_ms}} (instead of --payload bytes)")
	suite := fs.Int("suite", 1, "fkx1 suite")
	epochEvery := fs.Duration("epoch-every", 0, "new handshake interval")
	genEvery := fs.Duration("generation-every", 0, "new key generation interval")
	cmdRate := fs.Float64("command-rate", 0, "commands per second sent by a service to random devices")
	jsonOut := fs.String("json", "", "write the summary as JSON here (- for stdout)")
	htmlOut := fs.String("report", "", "write the HTML report here (default DIR/report.html)")
	idents := fs.String("identities", "enroll", "enroll (EST, through provisioning) or fast (minted from the fleet CA in --pki, cached)")
	tpmSpec := fs.String("tpm", "", "sim: keys in a simulated TPM, enrolled through TPM attestation (with --local and --identities enroll)")
	pkiDir := fs.String("pki", "", "the fleet PKI directory: --identities fast, attacks, and the service credential without --local")
	cacheDir := fs.String("identity-cache", "", "where --identities fast keeps what it minted (default the user cache dir)")
	attackSpec := fs.String("attack", "", "attacks: all, or a list of "+strings.Join(simulator.AttackNames(), ", ")+" (NAME:TRIES)")
	attackAt := fs.Duration("attack-at", 0, "when attacks start (default a third into the telemetry phase)")
	var faults []string
	fs.Func("fault", "a fault drill: gateway-restart@D, churn:P%, storm:P%@D, revoke:N@D (repeatable)", func(v string) error { faults = append(faults, v); return nil })
	sloSpec := fs.String("slo", "", "objectives, e.g. 'connect_p99<2s,loss=0'; the run exits non-zero when one is missed")
	cpuProfile := fs.String("cpuprofile", "", "write a CPU profile of the run (with --local, the stack's too) to this file, for go tool pprof")
	heapProfile := fs.String("memprofile", "", "write a heap profile of this process (with --local, the stack's too) once the telemetry has drained, to this file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *scenario != "" {
		pre, err := simulator.ScenarioArgs(*scenario)
		if err != nil {
			return err
		}
		set := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
		for _, a := range pre {
			name, value, _ := strings.Cut(strings.TrimPrefix(a, "--"), "=")
			if set[name] && name != "fault" {
				continue
			}
			if err := fs.Set(name, value); err != nil {
				return fmt.Errorf("%s: %s: %w", *scenario, name, err)
			}
		}
	}
	if *processes && !*localStack {
		return errors.New("--processes is a way to run the --local stack")
	}
	if *localStack && *metricsURL != "" {
		return errors.New("--metrics is for a gateway run elsewhere; with --local the counters are read in process")
	}
	if *suite != 1 && *suite != 2 {
		return fmt.Errorf("--suite %d: want 1 or 2", *suite)
	}
	if *qos != 0 && *qos != 1 {
		return fmt.Errorf("--qos %d: want 0 or 1", *qos)
	}
	sched, err := simulator.ParseSchedule(*schedSpec, *rate)
	if err != nil {
		return err
	}
	if *maxHS < 0 {
		return errors.New("--max-handshakes must not be negative")
	}
	slos, err := simulator.ParseSLOs(*sloSpec)
	if err != nil {
		return err
	}
	if *idents != "enroll" && *idents != "fast" {
		return fmt.Errorf("--identities %q: want enroll or fast", *idents)
	}
	if *devices < 1 || *devices > 100_000 || *rate <= 0 || *interval <= 0 || *payload < 0 || *payload > 60_000 {
		return errors.New("--devices 1 to 100000, --rate and --interval positive, --payload 0 to 60000")
	}
	if *attackAt == 0 {
		*attackAt = time.Duration(float64(*devices) / *rate * float64(time.Second)) + *duration/3
	}
	attacks, err := simulator.ParseAttacks(*attackSpec, *attackAt)
	if err != nil {
		return err
	}
	var specs []simulator.FaultSpec
	for _, f := range faults {
		fsp, err := simulator.ParseFault(f)
		if err != nil {
			return err
		}
		specs = append(specs, fsp)
	}
	d, err := stateDir(*dir)
	if err != nil {
		return err
	}
	cfg := simulator.RunConfig{Devices: *devices, Rate: *rate, Schedule: sched, MaxHandshakes: *maxHS, Duration: *duration, Interval: *interval, Payload: *payload,
		Target: simulator.Target(*target), TPM: *tpmSpec, AtMostOnce: *qos == 0, Channel: *channel, Template: *template, CommandRate: *cmdRate, Attacks: attacks,
		Suite: sessionkey.Suite(*suite), Rotation: sessionkey.Rotation{EpochEvery: *epochEvery, GenerationEvery: *genEvery}, Dir: filepath.Join(d, "devices"), Progress: os.Stderr, HeapProfile: *heapProfile}
	var restart func() error
	var revoke simulator.Revoker
	if (!*localStack || *processes) && os.Getenv("GOGC") == "" {
		// The generator alone in its process: what a virtual device holds
		// live is about 11 KB, and the collector's default headroom (as
		// much again as is live) would double it in RSS. 50 % headroom
		// costs a few per cent of CPU in a connect storm. With --local
		// (not --processes) the stack shares the process and keeps the
		// default, so the system under test is measured as it ships.
		// GOGC overrides.
		debug.SetGCPercent(50)
	}
	if *localStack {
		// --target mqtt: the gateway with fkx1 off (plaintext_telemetry),
		// relaying devices' records to fleet/telemetry/ for services.
		plain := cfg.Target == simulator.TargetMQTT
		lopts := simulator.LocalOptions{PlaintextTelemetry: plain, RequireTPM: *tpmSpec != ""}
		if *processes {
			if lopts.Bin, err = binDir(); err != nil {
				return err
			}
		}
		s, err := simulator.StartLocalWith(ctx, d, slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})), lopts)
		if err != nil {
			return err
		}
		defer s.Stop()
		if cfg.Token, err = s.Token(ctx, "sim-", *devices+1000); err != nil {
			return err
		}
		cfg.Provisioning, cfg.Gateway, cfg.RootCAs, cfg.Sink = s.Provisioning, s.Gateway, s.RootCAs, s.Sink
		if plain {
			cfg.Sink, cfg.ServiceTopic = "", "fleet/telemetry/+/+"
		}
		fmt.Fprintf(os.Stderr, "stack up: provisioning %s, gateway %s, state in %s\n", s.Provisioning, s.Gateway, d)
		*pkiDir = s.PKI
		restart, revoke = s.RestartGateway, s.Revoke
		cfg.AllowEK = s.AllowEK
		cfg.StackInProcess = !*processes
		cfg.AttackEnv.Refusals = s.Refusals
	} else {
		if *gw == "" || *caFile == "" {
			return errors.New("run needs --local, or --gateway and --ca (and --provisioning and --token to enroll)")
		}
		pem, err := os.ReadFile(*caFile)
		if err != nil {
			return err
		}
		roots, err := trust.ParseCertificatesPEM(pem)
		if err != nil || len(roots) == 0 {
			return fmt.Errorf("%s holds no certificate", *caFile)
		}
		cfg.RootCAs = x509.NewCertPool()
		for _, r := range roots {
			cfg.RootCAs.AddCert(r)
		}
		cfg.Provisioning, cfg.Token, cfg.Gateway = *prov, *token, *gw
		// With the provisioning service and the fleet's admin credential,
		// the run revokes (revoke faults, the revoked-cert attack), allows
		// EKs and makes its own enrollment token, as with --local.
		if *prov != "" && *pkiDir != "" {
			if cert, err := tls.LoadX509KeyPair(filepath.Join(*pkiDir, "admin.crt"), filepath.Join(*pkiDir, "admin.key")); err == nil {
				admin := simulator.NewAdmin(*prov, cfg.RootCAs, cert)
				revoke, cfg.AllowEK = admin.Revoke, admin.AllowEK
				if cfg.Token == "" && *idents == "enroll" {
					if cfg.Token, err = admin.Token(ctx, "sim-", *devices+1000); err != nil {
						return err
					}
				}
			}
		}
		if *idents == "enroll" && (cfg.Provisioning == "" || cfg.Token == "") {
			return errors.New("--identities enroll needs --provisioning and --token, or --provisioning and the --pki that holds admin.crt (or use --identities fast with --pki)")
		}
		if *metricsURL != "" {
			if u, err := url.Parse(*metricsURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
				return fmt.Errorf("--metrics %q: want the gateway's metrics URL, http://HOST:9102/metrics", *metricsURL)
			}
			cfg.AttackEnv.Refusals = simulator.ScrapeRefusals(*metricsURL)
		}
	}
	for _, fsp := range specs {
		f, err := fsp.Fault(restart, revoke)
		if err != nil {
			return err
		}
		cfg.Faults = append(cfg.Faults, f)
	}
	if *pkiDir != "" {
		fleet, err := simulator.OpenFleet(*pkiDir)
		if err != nil {
			return err
		}
		cfg.Bundle = fleet.Bundle()
		cfg.AttackEnv.Issuer = fleet.Issuer()
		if svc, err := tls.LoadX509KeyPair(filepath.Join(*pkiDir, "service.crt"), filepath.Join(*pkiDir, "service.key")); err == nil {
			cfg.Service = &svc
		}
		if *idents == "fast" {
			cache := *cacheDir
			if cache == "" {
				if uc, err := os.UserCacheDir(); err == nil {
					cache = filepath.Join(uc, "fleetkey-simulator")
				} else {
					cache = filepath.Join(d, "identities")
				}
			}
			start := time.Now()
			var minted, loaded int
			if cfg.Identities, minted, loaded, err = fleet.MintCached(cache, *devices); err != nil {
				return err
			}
			el := time.Since(start)
			fmt.Fprintf(os.Stderr, "identities: %d minted, %d loaded from %s, in %s\n", minted, loaded, cache, el.Round(time.Millisecond))
		}
	} else if *idents == "fast" {
		return errors.New("--identities fast needs the fleet CA: --local, or --pki DIR")
	}
	cfg.AttackEnv.Revoke = revoke
	stopProfile, err := simulator.CPUProfileTo(*cpuProfile)
	if err != nil {
		return err
	}
	defer stopProfile()
	sum, err := simulator.Run(ctx, cfg)
	if sum != nil {
		simulator.WriteText(os.Stdout, sum)
		if *jsonOut != "" {
			full, _ := json.MarshalIndent(sum, "", "  ")
			if *jsonOut == "-" {
				fmt.Println(string(full))
			} else if werr := os.WriteFile(*jsonOut, append(full, '\n'), 0o644); werr != nil {
				return werr
			}
		}
		path := *htmlOut
		if path == "" {
			path = filepath.Join(d, "report.html")
		}
		if werr := simulator.WriteReport(path, sum, &cfg, slos); werr != nil {
			return werr
		}
		fmt.Fprintf(os.Stderr, "report: %s\n", path)
	}
	if err != nil {
		return err
	}
	var fails []string
	if missed := simulator.Check(sum, slos); len(missed) > 0 {
		fails = append(fails, "SLOs missed: "+strings.Join(missed, "; "))
	}
	fails = append(fails, sum.Problems...)
	if !sum.Valid {
		fmt.Fprintf(os.Stderr, "the run is INVALID: %s\n", strings.Join(sum.Invalid, "; "))
	}
	if len(fails) > 0 {
		return fmt.Errorf("the run failed: %s", strings.Join(fails, "; "))
	}
	fmt.Fprintf(os.Stderr, "%d devices, %d records published, none lost or duplicated\n", sum.Devices, sum.Published)
	return nil
}
