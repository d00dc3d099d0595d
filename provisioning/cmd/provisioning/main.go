// Command provisioning is fleetkey's enrollment service for the factory
// line: EST enrollment with tokens, renewal over mTLS, a registry on SQLite
// or PostgreSQL, revocation with a CRL and a feed for gateways, and an
// admin API. The subcommands other than serve work on the registry
// directly, so an operator can act with the service stopped.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"fleetkey.dev/provisioning/registry"
	"fleetkey.dev/provisioning/server"
)

const usage = `provisioning: fleetkey's enrollment service

Usage:
  provisioning serve [--config FILE] [--listen :8443] [--pki DIR] [--data DIR | --db postgres://...]
  provisioning token create --prefix P --max-uses N --expires D [--require-tpm] [--allow-reprovision] [--label k=v]...
  provisioning token list | token disable ID
  provisioning device list [--status active|revoked] | device show ID | device revoke ID --reason R
  provisioning ek add HASH... [--label L] | ek import FILE.csv | ek list | ek remove HASH
  provisioning audit [--subject ID] [--limit N]

Every command takes --config FILE, --data DIR (SQLite; default .fleetkey/provisioning)
or --db DSN (PostgreSQL) to find the registry.

Example:
  certs init --dir .fleetkey/pki --trust-domain fleet.example
  provisioning serve &
  provisioning token create --prefix line3- --max-uses 500 --expires 72h
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout dev.key -subj /CN=line3-0001 -outform DER \
    | base64 | curl --cacert .fleetkey/pki/root.crt -H 'Authorization: Bearer fkt_...' \
      -H 'Content-Type: application/pkcs10' --data-binary @- https://localhost:8443/.well-known/est/simpleenroll
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

var errUsage = errors.New("usage")

func usageErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errUsage, fmt.Sprintf(format, args...))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	var err error
	switch cmd, rest := args[0], args[1:]; cmd {
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	case "serve":
		err = cmdServe(rest, stderr)
	case "token":
		err = sub(rest, map[string]func([]string, io.Writer) error{"create": cmdTokenCreate, "list": cmdTokenList, "disable": cmdTokenDisable}, stdout)
	case "device":
		err = sub(rest, map[string]func([]string, io.Writer) error{"list": cmdDeviceList, "show": cmdDeviceShow, "revoke": cmdDeviceRevoke}, stdout)
	case "ek":
		err = sub(rest, map[string]func([]string, io.Writer) error{"add": cmdEKAdd, "import": cmdEKImport, "list": cmdEKList, "remove": cmdEKRemove}, stdout)
	case "audit":
		err = cmdAudit(rest, stdout)
	default:
		err = usageErr("unknown command %q\nhint: run 'provisioning --help'", cmd)
	}
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		fmt.Fprintf(stderr, "provisioning: %s\n", strings.TrimPrefix(err.Error(), "usage: "))
		return 2
	default:
		fmt.Fprintf(stderr, "provisioning: %v\n", err)
		return 1
	}
}

func sub(args []string, cmds map[string]func([]string, io.Writer) error, out io.Writer) error {
	if len(args) == 0 {
		return usageErr("name a subcommand\nhint: run 'provisioning --help'")
	}
	fn, ok := cmds[args[0]]
	if !ok {
		return usageErr("unknown subcommand %q\nhint: run 'provisioning --help'", args[0])
	}
	return fn(args[1:], out)
}

// storeFlags are the flags that find the registry (and, for serve, more).
type storeFlags struct {
	fs         *flag.FlagSet
	configFile *string
	data       *string
	db         *string
	pos        []string // positional arguments, wherever they stood
}

func newFlags(name string) *storeFlags {
	fs := flag.NewFlagSet("provisioning "+name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	return &storeFlags{fs: fs,
		configFile: fs.String("config", "", "YAML configuration file"),
		data:       fs.String("data", "", "data directory of the SQLite registry (default .fleetkey/provisioning)"),
		db:         fs.String("db", "", "PostgreSQL DSN (postgres://...) instead of SQLite"),
	}
}

func (f *storeFlags) parse(args []string, out io.Writer) error {
	// Flags may come before, between or after the positional arguments.
	f.pos = nil
	for {
		err := f.fs.Parse(args)
		if errors.Is(err, flag.ErrHelp) {
			f.fs.SetOutput(out)
			fmt.Fprintf(out, "Usage of %s:\n", f.fs.Name())
			f.fs.PrintDefaults()
			return err
		}
		if err != nil {
			return usageErr("%v\nhint: run '%s --help'", err, f.fs.Name())
		}
		rest := f.fs.Args()
		if len(rest) == 0 {
			return nil
		}
		f.pos, args = append(f.pos, rest[0]), rest[1:]
	}
}

func (f *storeFlags) config() (server.Config, error) {
	var cfg server.Config
	if *f.configFile != "" {
		var err error
		if cfg, err = server.LoadConfig(*f.configFile); err != nil {
			return cfg, err
		}
	}
	if *f.data != "" {
		cfg.DataDir = *f.data
	}
	if *f.db != "" {
		cfg.Database = *f.db
	}
	return cfg, nil
}

// withStore opens the registry the flags name, runs fn on it, and closes it.
func (f *storeFlags) withStore(fn func(ctx context.Context, store registry.Store) error) error {
	cfg, err := f.config()
	if err != nil {
		return err
	}
	ctx := context.Background()
	store, err := server.OpenStore(ctx, cfg)
	if err != nil {
		return err
	}
	defer store.Close()
	return fn(ctx, store)
}

func cmdServe(args []string, stderr io.Writer) error {
	f := newFlags("serve")
	listen := f.fs.String("listen", "", "HTTPS address (default :8443)")
	metrics := f.fs.String("metrics-listen", "", "metrics and health address (default :9101; off to disable)")
	pki := f.fs.String("pki", "", "PKI directory from 'certs init' (default .fleetkey/pki)")
	addrFile := f.fs.String("addr-file", "", "write the bound HTTPS address here once listening (for --listen 127.0.0.1:0)")
	if err := f.parse(args, stderr); err != nil {
		return err
	}
	cfg, err := f.config()
	if err != nil {
		return err
	}
	if *listen != "" {
		cfg.Listen = *listen
	}
	if *metrics != "" {
		cfg.MetricsListen = *metrics
	}
	if *pki != "" {
		cfg.PKIDir = *pki
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	srv, err := server.New(ctx, cfg, server.Options{Log: log})
	if err != nil {
		return err
	}
	resolved := srv.Config()
	ln, err := net.Listen("tcp", resolved.Listen)
	if err != nil {
		srv.Close()
		return fmt.Errorf("listening on %s: %w", resolved.Listen, err)
	}
	var mln net.Listener
	if resolved.MetricsListen != "off" {
		if mln, err = net.Listen("tcp", resolved.MetricsListen); err != nil {
			ln.Close()
			srv.Close()
			return fmt.Errorf("listening on %s: %w", resolved.MetricsListen, err)
		}
	}
	if *addrFile != "" {
		if err := os.WriteFile(*addrFile, []byte(ln.Addr().String()+"\n"), 0o644); err != nil {
			ln.Close()
			srv.Close()
			return fmt.Errorf("writing --addr-file: %w", err)
		}
	}
	return srv.Serve(ctx, ln, mln)
}

func cmdTokenCreate(args []string, out io.Writer) error {
	f := newFlags("token create")
	prefix := f.fs.String("prefix", "", "device ids enrolled with the token must start with this")
	maxUses := f.fs.Int("max-uses", 1, "how many devices the token may enroll")
	expires := f.fs.Duration("expires", 24*time.Hour, "how long the token is valid, e.g. 72h")
	requireTPM := f.fs.Bool("require-tpm", false, "refuse plain EST enrollment; only TPM attestation may use the token")
	reprovision := f.fs.Bool("allow-reprovision", false, "allow re-enrolling an existing id with a new key (revokes the old certificate)")
	var labels labelFlag
	f.fs.Var(&labels, "label", "k=v label, repeatable")
	if err := f.parse(args, out); err != nil {
		return err
	}
	return f.withStore(func(ctx context.Context, store registry.Store) error {
		v, err := server.CreateToken(ctx, store, server.TokenRequest{Prefix: *prefix, MaxUses: *maxUses, RequireTPM: *requireTPM,
			AllowReprovision: *reprovision, Labels: labels}, *expires, "cli:"+currentUser(), time.Now())
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "%s\n", v.Token)
		fmt.Fprintf(os.Stderr, "token %s: prefix %q, %d use(s), expires %s. It is shown only this once.\n", v.ID, v.Prefix, v.MaxUses, v.ExpiresAt.Format(time.RFC3339))
		return nil
	})
}

func cmdTokenList(args []string, out io.Writer) error {
	f := newFlags("token list")
	if err := f.parse(args, out); err != nil {
		return err
	}
	return f.withStore(func(ctx context.Context, store registry.Store) error {
		toks, err := store.ListTokens(ctx)
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "%-12s  %-16s  %9s  %-20s  %s\n", "ID", "PREFIX", "USES", "EXPIRES", "FLAGS")
		for _, t := range toks {
			var flags []string
			if t.RequireTPM {
				flags = append(flags, "require-tpm")
			}
			if t.AllowReprovision {
				flags = append(flags, "allow-reprovision")
			}
			if t.Disabled {
				flags = append(flags, "DISABLED")
			}
			fmt.Fprintf(out, "%-12s  %-16q  %4d/%-4d  %-20s  %s\n", t.ID, t.Prefix, t.Uses, t.MaxUses, t.ExpiresAt.UTC().Format(time.RFC3339), strings.Join(flags, ","))
		}
		return nil
	})
}

func cmdTokenDisable(args []string, out io.Writer) error {
	f := newFlags("token disable")
	if err := f.parse(args, out); err != nil {
		return err
	}
	if len(f.pos) != 1 {
		return usageErr("name the token id to disable\nhint: provisioning token list")
	}
	return f.withStore(func(ctx context.Context, store registry.Store) error {
		id := f.pos[0]
		if err := store.DisableToken(ctx, id, registry.AuditEvent{At: time.Now(), Actor: "cli:" + currentUser(), Action: "token.disable", Subject: id, Outcome: registry.Allowed}); err != nil {
			if errors.Is(err, registry.ErrNotFound) {
				return fmt.Errorf("no token %q", id)
			}
			return err
		}
		fmt.Fprintf(out, "token %s disabled\n", id)
		return nil
	})
}

func cmdDeviceList(args []string, out io.Writer) error {
	f := newFlags("device list")
	status := f.fs.String("status", "", "active or revoked")
	after := f.fs.String("after", "", "list ids after this one (paging)")
	limit := f.fs.Int("limit", 100, "at most this many (1 to 1000)")
	if err := f.parse(args, out); err != nil {
		return err
	}
	return f.withStore(func(ctx context.Context, store registry.Store) error {
		devs, err := store.ListDevices(ctx, registry.ListOptions{After: *after, Limit: *limit, Status: registry.DeviceStatus(*status)})
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "%-24s  %-8s  %-34s  %-20s  %s\n", "ID", "STATUS", "SERIAL", "NOT AFTER", "TPM")
		for _, d := range devs {
			fmt.Fprintf(out, "%-24s  %-8s  %-34s  %-20s  %v\n", d.ID, d.Status, d.Serial, d.NotAfter.UTC().Format(time.RFC3339), d.TPMBound)
		}
		return nil
	})
}

func cmdDeviceShow(args []string, out io.Writer) error {
	f := newFlags("device show")
	if err := f.parse(args, out); err != nil {
		return err
	}
	if len(f.pos) != 1 {
		return usageErr("name the device id\nhint: provisioning device show sensor-0001")
	}
	return f.withStore(func(ctx context.Context, store registry.Store) error {
		d, err := store.GetDevice(ctx, f.pos[0])
		if errors.Is(err, registry.ErrNotFound) {
			return fmt.Errorf("no device %q", f.pos[0])
		}
		if err != nil {
			return err
		}
		certs, err := store.ListCertificates(ctx, d.ID)
		if err != nil {
			return err
		}
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(map[string]any{"device": d, "certificates": len(certs)})
	})
}

func cmdDeviceRevoke(args []string, out io.Writer) error {
	f := newFlags("device revoke")
	reason := f.fs.String("reason", "", "RFC 5280 reason: keyCompromise, cessationOfOperation, affiliationChanged, superseded, privilegeWithdrawn, unspecified (required)")
	// Accept the id before or after the flags.
	var id string
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		id, args = args[0], args[1:]
	}
	if err := f.parse(args, out); err != nil {
		return err
	}
	if id == "" && len(f.pos) == 1 {
		id = f.pos[0]
	}
	if id == "" || *reason == "" {
		return usageErr("name the device and a reason\nhint: provisioning device revoke sensor-0001 --reason keyCompromise")
	}
	return f.withStore(func(ctx context.Context, store registry.Store) error {
		certs, err := server.RevokeDevice(ctx, store, id, *reason, "cli:"+currentUser(), "", time.Now())
		if errors.Is(err, registry.ErrNotFound) {
			return fmt.Errorf("no device %q", id)
		}
		if err != nil {
			return err
		}
		if len(certs) == 0 {
			fmt.Fprintf(out, "device %s was already revoked\n", id)
			return nil
		}
		for _, c := range certs {
			fmt.Fprintf(out, "revoked %s serial %s (%s)\n", id, c.Serial, *reason)
		}
		return nil
	})
}

func cmdAudit(args []string, out io.Writer) error {
	f := newFlags("audit")
	subject := f.fs.String("subject", "", "only events about this device or token")
	after := f.fs.Int64("after", 0, "only events after this sequence number")
	limit := f.fs.Int("limit", 100, "at most this many (1 to 1000)")
	if err := f.parse(args, out); err != nil {
		return err
	}
	return f.withStore(func(ctx context.Context, store registry.Store) error {
		evs, err := store.ListAudit(ctx, registry.AuditQuery{AfterSeq: *after, Limit: *limit, Subject: *subject})
		if err != nil {
			return err
		}
		for _, e := range evs {
			fmt.Fprintf(out, "%6d %s %-8s %-14s %-22s %-20s %s\n", e.Seq, e.At.UTC().Format(time.RFC3339), e.Outcome, e.Action, e.Actor, e.Subject, e.Reason)
		}
		return nil
	})
}

type labelFlag map[string]string

func (l *labelFlag) String() string { return fmt.Sprint(map[string]string(*l)) }
func (l *labelFlag) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("label %q must be key=value", s)
	}
	if *l == nil {
		*l = labelFlag{}
	}
	(*l)[k] = v
	return nil
}

func currentUser() string {
	if u := os.Getenv("USER"); u != "" {
		return u
	}
	return "operator"
}
