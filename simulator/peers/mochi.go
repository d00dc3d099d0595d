package peers

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"
)

// serverTLS is the peers' TLS: TLS 1.2+, the server certificate chain of f,
// client certificates required and verified against f.CAFile.
func serverTLS(f TLSFiles) (*tls.Config, error) {
	if f.CAFile == "" || f.CertFile == "" || f.KeyFile == "" {
		return nil, errors.New("TLSFiles: CAFile, CertFile and KeyFile are all required")
	}
	pem, err := os.ReadFile(f.CAFile)
	if err != nil {
		return nil, err
	}
	cas := x509.NewCertPool()
	if !cas.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s: no PEM certificates", f.CAFile)
	}
	cert, err := tls.LoadX509KeyPair(f.CertFile, f.KeyFile)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    cas,
	}, nil
}

// mochiCapabilities are bare mochi's: mochi v2.7.9's defaults, unchanged.
// They already buffer as much per client as the limits StartMosquitto gives
// mosquitto (which were chosen to match them; see MosquittoMaxInflight):
// MaximumClientWritesPending 8192 (outbound packets queued per client),
// ReceiveMaximum 1024 (inbound QoS 1/2 window per client), MaximumInflight
// 8192 (unacknowledged outbound QoS 1/2 per client), no packet size limit,
// no client limit. Read and write buffers stay at 2 KiB a client.
func mochiCapabilities() *mqtt.Capabilities { return mqtt.NewDefaultServerCapabilities() }

// startMochi serves bare mochi with mTLS on listen and returns the server and
// its bound address.
func startMochi(f TLSFiles, listen string, log *slog.Logger) (*mqtt.Server, string, error) {
	if err := checkPort(listen); err != nil {
		return nil, "", err
	}
	cfg, err := serverTLS(f)
	if err != nil {
		return nil, "", err
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, "", err
	}
	s := mqtt.New(&mqtt.Options{
		Capabilities: mochiCapabilities(),
		InlineClient: false,
		Logger:       log,
	})
	if err := s.AddHook(new(auth.AllowHook), nil); err != nil {
		ln.Close()
		return nil, "", err
	}
	if err := s.AddListener(listeners.NewNet("mtls", tls.NewListener(ln, cfg))); err != nil {
		ln.Close()
		return nil, "", err
	}
	if err := s.Serve(); err != nil {
		_ = s.Close()
		return nil, "", err
	}
	return s, ln.Addr().String(), nil
}

// StartMochi runs bare mochi-mqtt (github.com/mochi-mqtt/server/v2) in this
// process, the "bare mochi" baseline: mTLS (TLS 1.2+, client certificates
// required and verified against f.CAFile), mochi's allow-all auth hook,
// inline client off, default capabilities (see mochiCapabilities), on a free
// 127.0.0.1 port. mochi's log is discarded. Its PID is this process's, so
// RSS measures the whole process; run it with MochiMain in a child process
// (StartProcess) to measure mochi alone. Stop closes the listener and every
// client connection.
func StartMochi(ctx context.Context, f TLSFiles) (*Peer, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s, addr, err := startMochi(f, "127.0.0.1:0", slog.New(slog.DiscardHandler))
	if err != nil {
		return nil, fmt.Errorf("mochi: %w", err)
	}
	done := make(chan struct{})
	return &Peer{
		Name: "mochi", Addr: addr, PID: os.Getpid(), Version: mqtt.Version, done: done,
		stop: func() error {
			defer close(done)
			return s.Close()
		},
	}, nil
}

// MochiMain is the body of a hidden subcommand (`simulator peer-mochi`) that
// runs bare mochi, as StartMochi does, in a process of its own so that it can
// be measured separately. Flags:
//
//	--ca PATH          CA that signs client certificates (required)
//	--cert PATH        server certificate chain (required)
//	--key PATH         server key (required)
//	--listen ADDR      address to listen on (default 127.0.0.1:0; never :1883)
//	--addr-file PATH   where to write the bound address (required)
//
// The address file is written to a temporary name and renamed, so a reader
// never sees it half written. mochi logs errors to stderr. MochiMain serves
// until ctx ends, then closes the server and removes the address file.
func MochiMain(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("peer-mochi", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var f TLSFiles
	var listen, addrFile string
	fs.StringVar(&f.CAFile, "ca", "", "CA `file` that signs client certificates")
	fs.StringVar(&f.CertFile, "cert", "", "server certificate chain `file`")
	fs.StringVar(&f.KeyFile, "key", "", "server key `file`")
	fs.StringVar(&listen, "listen", "127.0.0.1:0", "`address` to listen on")
	fs.StringVar(&addrFile, "addr-file", "", "`file` to write the bound address to")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("peer-mochi: %w", err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("peer-mochi: unexpected arguments %q", fs.Args())
	}
	if f.CAFile == "" || f.CertFile == "" || f.KeyFile == "" || addrFile == "" {
		return errors.New("peer-mochi: --ca, --cert, --key and --addr-file are required")
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))
	s, addr, err := startMochi(f, listen, log)
	if err != nil {
		return fmt.Errorf("peer-mochi: %w", err)
	}
	defer s.Close()
	if err := writeFileAtomic(addrFile, []byte(addr+"\n")); err != nil {
		return fmt.Errorf("peer-mochi: %w", err)
	}
	defer os.Remove(addrFile)
	<-ctx.Done()
	return nil
}

// writeFileAtomic writes b to a temporary file next to path and renames it
// to path.
func writeFileAtomic(path string, b []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return err
	}
	if err := tmp.Close(); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	return nil
}
