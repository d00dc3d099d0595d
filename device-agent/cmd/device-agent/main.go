// Command device-agent runs on a device: it enrolls through EST, connects
// to the gateway with mTLS, agrees on session keys with fkx1, and sends
// encrypted telemetry and receives encrypted commands.
//
//	device-agent enroll --provisioning URL --ca ROOT.pem --token T --id ID --dir STATE
//	device-agent run    --dir STATE --gateway HOST:PORT [--source ...] [--on-command CMD]
//	device-agent status --dir STATE
package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"fleetkey.dev/certs/tpm"
	"fleetkey.dev/certs/trust"
	"fleetkey.dev/device-agent/agent"
	"fleetkey.dev/sessionkey"
)

const usage = `usage:
  device-agent enroll --provisioning https://HOST:PORT --ca ROOT.pem --token TOKEN --id ID --dir STATE [--tpm TPM]
  device-agent run    --dir STATE --gateway HOST:PORT [flags]
  device-agent status --dir STATE
  device-agent ek --tpm TPM          print the TPM's EK hash, for 'provisioning ek add'

enroll --tpm TPM makes the key inside the TPM and enrolls through TPM
attestation: TPM is /dev/tpmrm0, swtpm:unix:PATH or swtpm:tcp:HOST:PORT.
run uses the TPM recorded at enrollment (--tpm overrides its path).

run flags:
  --source SRC        telemetry: stdin (one record per line; the default), file:PATH,
                      cmd:COMMAND (each line of its output), synthetic:INTERVAL[:BYTES], none
  --channel NAME      channel of the records (default telemetry)
  --on-command CMD    run CMD (sh -c) for each command, body on stdin, with
                      FLEETKEY_COMMAND_CHANNEL and FLEETKEY_COMMAND_ID set;
                      default: print each command as a JSON line on stdout
  --suite 1|2         fkx1 suite: 1 X25519, 2 X25519MLKEM768 (default 1)
  --outbox-max N      records held until acknowledged (default 10000)
  --outbox-full P     when full: block (default), drop-oldest, refuse
  --outbox-disk       keep the outbox in STATE/outbox.log across restarts
  --epoch-every D     a new handshake at least this often (default 1h)
  --generation-every D  a new key generation at least this often (default 10m)
  --exit-when-done    with a finite source, exit once every record is acknowledged
  --log-level L       debug, info (default), warn, error
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
	case "enroll":
		err = enroll(ctx, os.Args[2:])
	case "run":
		err = run(ctx, os.Args[2:])
	case "status":
		err = status(os.Args[2:])
	case "ek":
		err = ekCmd(os.Args[2:])
	case "-h", "--help", "help":
		fmt.Print(usage)
		return
	default:
		err = fmt.Errorf("unknown command %q\n%s", os.Args[1], usage)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "device-agent:", err)
		os.Exit(1)
	}
}

func newFlags(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.Usage = func() { fmt.Fprint(os.Stderr, usage) }
	return fs
}

func enroll(ctx context.Context, args []string) error {
	fs := newFlags("enroll")
	prov := fs.String("provisioning", "", "provisioning service URL")
	caFile := fs.String("ca", "", "fleet root certificate (PEM) that authenticates the provisioning service")
	token := fs.String("token", "", "enrollment token")
	id := fs.String("id", "", "device id")
	dir := fs.String("dir", "", "state directory")
	tpmSpec := fs.String("tpm", "", "make the key in this TPM and enroll with TPM attestation")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *prov == "" || *caFile == "" || *id == "" || *dir == "" {
		return errors.New("enroll needs --provisioning, --ca, --token, --id and --dir")
	}
	if *token == "" {
		*token = os.Getenv("FLEETKEY_TOKEN")
	}
	pem, err := os.ReadFile(*caFile)
	if err != nil {
		return err
	}
	roots, err := trust.ParseCertificatesPEM(pem)
	if err != nil || len(roots) == 0 {
		return fmt.Errorf("%s holds no certificate: %v", *caFile, err)
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	st := &agent.State{Dir: *dir}
	leaf, err := st.Enroll(ctx, agent.EnrollOptions{Provisioning: *prov, RootCAs: pool, Token: *token, ID: *id, TPM: *tpmSpec})
	if err != nil {
		return err
	}
	where := "key 0600, generated on this device"
	if *tpmSpec != "" {
		where = "key made in and bound to the TPM " + *tpmSpec + "; certificate TPM-bound after attestation"
	}
	fmt.Printf("enrolled %s\n  certificate serial %s, valid until %s\n  state in %s (%s)\n",
		leaf.URIs[0], leaf.SerialNumber.Text(16), leaf.NotAfter.UTC().Format(time.RFC3339), *dir, where)
	return nil
}

func run(ctx context.Context, args []string) error {
	fs := newFlags("run")
	dir := fs.String("dir", "", "state directory")
	gw := fs.String("gateway", "", "gateway HOST:PORT")
	source := fs.String("source", "stdin", "telemetry source")
	channel := fs.String("channel", "telemetry", "channel")
	onCmd := fs.String("on-command", "", "command handler")
	suite := fs.Int("suite", 1, "fkx1 suite")
	outMax := fs.Int("outbox-max", 10000, "outbox size")
	outFull := fs.String("outbox-full", "block", "outbox policy when full")
	outDisk := fs.Bool("outbox-disk", false, "keep the outbox on disk")
	exitDone := fs.Bool("exit-when-done", false, "exit when the source ends and all is acknowledged")
	epochEvery := fs.Duration("epoch-every", 0, "new handshake interval")
	genEvery := fs.Duration("generation-every", 0, "new key generation interval")
	level := fs.String("log-level", "info", "log level")
	runTPM := fs.String("tpm", "", "the TPM holding the device key, if not where it was at enrollment")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dir == "" || *gw == "" {
		return errors.New("run needs --dir and --gateway")
	}
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(*level)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	if *epochEvery < 0 || *genEvery < 0 || (*epochEvery > 0 && *epochEvery < time.Second) {
		return errors.New("--epoch-every is at least 1s, and neither interval may be negative")
	}
	if *suite != 1 && *suite != 2 {
		return fmt.Errorf("--suite %d: want 1 (X25519) or 2 (X25519MLKEM768)", *suite)
	}
	policy := agent.FullPolicy(*outFull)
	if policy != agent.Block && policy != agent.DropOldest && policy != agent.Refuse {
		return fmt.Errorf("--outbox-full %q: want block, drop-oldest or refuse", *outFull)
	}
	src, err := parseSource(*source)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lv}))
	a, err := agent.New(agent.Config{State: &agent.State{Dir: *dir, TPM: *runTPM}, Gateway: *gw, Suite: sessionkey.Suite(*suite), Log: log,
		Rotation: sessionkey.Rotation{EpochEvery: *epochEvery, GenerationEvery: *genEvery},
		Outbox:   agent.OutboxOptions{Max: *outMax, Policy: policy, Disk: *outDisk}, OnCommand: commandHandler(*onCmd, log)})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	srcDone := make(chan error, 1)
	go func() {
		srcDone <- src(ctx, func(body []byte) error { _, err := a.Publish(ctx, *channel, body); return err })
	}()
	runDone := make(chan error, 1)
	go func() { runDone <- a.Run(ctx) }()
	for {
		select {
		case err := <-runDone:
			return err
		case err := <-srcDone:
			srcDone = nil
			if err != nil && ctx.Err() == nil {
				log.Error("telemetry source failed", "err", err)
			}
			if *exitDone {
				go func() {
					for a.Outbox().Len() > 0 {
						select {
						case <-a.Outbox().Changed():
						case <-ctx.Done():
							return
						}
					}
					log.Info("source ended and every record is acknowledged", "acked", a.Acked())
					cancel()
				}()
			}
		}
	}
}

// A source calls emit for each record until it ends or ctx does.
type source func(ctx context.Context, emit func([]byte) error) error

func parseSource(s string) (source, error) {
	kind, arg, _ := strings.Cut(s, ":")
	switch kind {
	case "none":
		return func(ctx context.Context, _ func([]byte) error) error { <-ctx.Done(); return nil }, nil
	case "stdin":
		return func(ctx context.Context, emit func([]byte) error) error { return lines(os.Stdin, emit) }, nil
	case "file":
		if arg == "" {
			return nil, errors.New("--source file:PATH needs a path")
		}
		return func(ctx context.Context, emit func([]byte) error) error {
			f, err := os.Open(arg)
			if err != nil {
				return err
			}
			defer f.Close()
			return lines(f, emit)
		}, nil
	case "cmd":
		if arg == "" {
			return nil, errors.New("--source cmd:COMMAND needs a command")
		}
		return func(ctx context.Context, emit func([]byte) error) error {
			c := exec.CommandContext(ctx, "sh", "-c", arg)
			c.Stderr = os.Stderr
			out, err := c.StdoutPipe()
			if err != nil {
				return err
			}
			if err := c.Start(); err != nil {
				return err
			}
			lerr := lines(out, emit)
			if err := c.Wait(); err != nil && ctx.Err() == nil {
				return fmt.Errorf("source command: %w", err)
			}
			return lerr
		}, nil
	case "synthetic":
		every, size := time.Second, 0
		if arg != "" {
			iv, sz, _ := strings.Cut(arg, ":")
			d, err := time.ParseDuration(iv)
			if err != nil || d <= 0 {
				return nil, fmt.Errorf("--source synthetic:%s: interval like 500ms or 10s", arg)
			}
			every = d
			if sz != "" {
				if size, err = strconv.Atoi(sz); err != nil || size < 0 || size > 60000 {
					return nil, fmt.Errorf("--source synthetic: size %q: 0 to 60000 bytes", sz)
				}
			}
		}
		return func(ctx context.Context, emit func([]byte) error) error {
			t := time.NewTicker(every)
			defer t.Stop()
			for n := 1; ; n++ {
				select {
				case <-ctx.Done():
					return nil
				case <-t.C:
				}
				body := fmt.Sprintf(`{"n":%d,"temp_c":%.2f,"pad":"%s"}`, n, 20+float64(n%100)/10, strings.Repeat("x", max(size-40, 0)))
				if err := emit([]byte(body)); err != nil {
					return err
				}
			}
		}, nil
	}
	return nil, fmt.Errorf("--source %q: want stdin, file:PATH, cmd:COMMAND, synthetic:INTERVAL[:BYTES] or none", s)
}

// maxLine bounds one telemetry line (the gateway's packet limit is 64 KiB).
const maxLine = 60 << 10

func lines(r io.Reader, emit func([]byte) error) error {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), maxLine)
	for sc.Scan() {
		if err := emit(sc.Bytes()); err != nil {
			return err
		}
	}
	if errors.Is(sc.Err(), bufio.ErrTooLong) {
		return fmt.Errorf("a telemetry line longer than %d bytes", maxLine)
	}
	return sc.Err()
}

func commandHandler(cmd string, log *slog.Logger) func(agent.Command) {
	if cmd == "" {
		enc := json.NewEncoder(os.Stdout)
		return func(c agent.Command) {
			_ = enc.Encode(map[string]any{"channel": c.Channel, "id": c.ID, "unix_ms": c.UnixMS, "body": string(c.Body)})
		}
	}
	return func(c agent.Command) {
		h := exec.Command("sh", "-c", cmd)
		h.Stdin = strings.NewReader(string(c.Body))
		h.Stdout, h.Stderr = os.Stdout, os.Stderr
		h.Env = append(os.Environ(), "FLEETKEY_COMMAND_CHANNEL="+c.Channel, "FLEETKEY_COMMAND_ID="+strconv.FormatUint(c.ID, 10))
		if err := h.Run(); err != nil {
			log.Warn("command handler failed", "channel", c.Channel, "id", c.ID, "err", err)
		}
	}
}

func status(args []string) error {
	fs := newFlags("status")
	dir := fs.String("dir", "", "state directory")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dir == "" {
		return errors.New("status needs --dir")
	}
	st := &agent.State{Dir: *dir}
	meta, err := st.ReadMeta()
	if err != nil {
		return err
	}
	creds, err := st.LoadCredentials()
	if err != nil {
		return err
	}
	defer creds.Close()
	leaf := creds.Leaf
	if creds.TPM {
		fmt.Printf("key           in the TPM (certificate TPM-bound)\n")
	}
	fmt.Printf("device        %s\nidentity      %s\ncertificate   serial %s, valid until %s (%s left)\nprovisioning  %s\n",
		meta.ID, leaf.URIs[0], leaf.SerialNumber.Text(16), leaf.NotAfter.UTC().Format(time.RFC3339),
		time.Until(leaf.NotAfter).Round(time.Minute), meta.Provisioning)
	s, err := st.ReadStatus()
	if err != nil {
		fmt.Println("connection    never run")
		return nil
	}
	alive := syscall.Kill(s.PID, 0) == nil
	conn := "disconnected"
	if s.Connected && alive {
		conn = "connected to " + s.Gateway + " since " + s.Since.UTC().Format(time.RFC3339)
	} else if !alive {
		conn = "not running (last seen " + s.Updated.UTC().Format(time.RFC3339) + ")"
	}
	fmt.Printf("connection    %s\n", conn)
	if s.KID != "" {
		fmt.Printf("key epoch     kid %s, started %s (%d epochs this run)\n", s.KID, s.EpochStarted.UTC().Format(time.RFC3339), s.Epochs)
	}
	fmt.Printf("records       %d acknowledged, %d waiting in the outbox\n", s.RecordsAcked, s.Outbox)
	if s.LastError != "" {
		fmt.Printf("last error    %s\n", s.LastError)
	}
	return nil
}

// ekCmd prints the TPM's endorsement key hash (what the provisioning
// service's allowlist holds) and whether the TPM carries an EK certificate.
func ekCmd(args []string) error {
	fs := newFlags("ek")
	spec := fs.String("tpm", "", "the TPM")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *spec == "" {
		return errors.New("ek needs --tpm (/dev/tpmrm0, swtpm:unix:PATH, swtpm:tcp:HOST:PORT)")
	}
	d, err := tpm.Open(*spec)
	if err != nil {
		return err
	}
	defer d.Close()
	ek, err := d.EK()
	if err != nil {
		return err
	}
	spki, err := x509.MarshalPKIXPublicKey(ek.Key)
	if err != nil {
		return err
	}
	h := sha256.Sum256(spki)
	fmt.Printf("EK SHA-256   %s\n", hex.EncodeToString(h[:]))
	if ek.Cert != nil {
		fmt.Println("EK cert      present in the TPM's NV (trusted if its manufacturer's CA is in the service's ek_roots)")
	} else {
		fmt.Println("EK cert      none: add the hash to the allowlist with 'provisioning ek add'")
	}
	return nil
}
