// Command gateway is fleetkey's mutual-TLS MQTT gateway: only devices with
// a valid, unrevoked fleet certificate get in, each bound to its own
// identity and topics.
package main

import (
	"context"
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

	"fleetkey.dev/gateway/server"
)

const usage = `gateway: fleetkey's mTLS MQTT gateway

Usage:
  gateway serve [--config FILE] [--listen :8883] [--metrics-listen :9102] [--pki DIR] [--provisioning URL]

Example:
  certs init --dir .fleetkey/pki --trust-domain fleet.example
  gateway serve --pki .fleetkey/pki --provisioning https://localhost:8443
  mosquitto_sub -h localhost -p 8883 --cafile .fleetkey/pki/root.crt \
      --cert dev.crt --key dev.key -i line3-0001 -t 'devices/line3-0001/down/+'
`

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	case "serve":
	default:
		fmt.Fprintf(stderr, "gateway: unknown command %q\nhint: run 'gateway --help'\n", args[0])
		return 2
	}
	fs := flag.NewFlagSet("gateway serve", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	configFile := fs.String("config", "", "YAML configuration file")
	listen := fs.String("listen", "", "MQTT over TLS address (default :8883)")
	metrics := fs.String("metrics-listen", "", "metrics and health address (default :9102; off to disable)")
	pki := fs.String("pki", "", "PKI directory from 'certs init' (default .fleetkey/pki)")
	prov := fs.String("provisioning", "", "provisioning service URL whose revocation feed to follow")
	sinkFile := fs.String("telemetry-sink", "", "JSON-lines file where decrypted telemetry is stored before each PUBACK (default telemetry.jsonl beside the PKI directory)")
	addrFile := fs.String("addr-file", "", "write the bound MQTT address here once listening (for --listen 127.0.0.1:0)")
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(stdout)
			fs.PrintDefaults()
			return 0
		}
		fmt.Fprintf(stderr, "gateway serve: %v\nhint: run 'gateway serve --help'\n", err)
		return 2
	}
	var cfg server.Config
	if *configFile != "" {
		var err error
		if cfg, err = server.LoadConfig(*configFile); err != nil {
			fmt.Fprintf(stderr, "gateway: %v\n", err)
			return 1
		}
	}
	for _, o := range []struct {
		flag string
		dst  *string
	}{{*listen, &cfg.Listen}, {*metrics, &cfg.MetricsListen}, {*pki, &cfg.PKIDir}, {*prov, &cfg.Provisioning}, {*sinkFile, &cfg.TelemetrySink}} {
		if o.flag != "" {
			*o.dst = o.flag
		}
	}
	if err := serve(cfg, *addrFile, stderr); err != nil {
		fmt.Fprintf(stderr, "gateway: %v\n", err)
		return 1
	}
	return 0
}

func serve(cfg server.Config, addrFile string, stderr io.Writer) error {
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	g, err := server.New(cfg, log)
	if err != nil {
		return err
	}
	c := g.Config()
	ln, err := net.Listen("tcp", c.Listen)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", c.Listen, err)
	}
	var mln net.Listener
	if !strings.EqualFold(c.MetricsListen, "off") {
		if mln, err = net.Listen("tcp", c.MetricsListen); err != nil {
			ln.Close()
			return fmt.Errorf("listening on %s: %w", c.MetricsListen, err)
		}
	}
	if addrFile != "" {
		if err := os.WriteFile(addrFile, []byte(ln.Addr().String()+"\n"), 0o644); err != nil {
			return fmt.Errorf("writing --addr-file: %w", err)
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return g.Serve(ctx, ln, mln)
}
