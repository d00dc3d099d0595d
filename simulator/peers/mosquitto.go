package peers

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Mosquitto's per-client message limits for the load test. Mosquitto's
// defaults (20 in flight, 1000 queued) would throttle or drop a fan-out that
// mochi, with its defaults, carries; these match mochi v2.7.9's defaults so
// that both brokers buffer about as much per client:
//
//   - max_inflight_messages 1024: outgoing QoS 1/2 messages awaiting their
//     acknowledgement, per client. Mosquitto also advertises it as Receive
//     Maximum to MQTT 5 clients. mochi's Capabilities.ReceiveMaximum is 1024
//     (its inbound window; its outbound window is bounded by MaximumInflight,
//     8192, and the client's own Receive Maximum).
//   - max_queued_messages 8192: QoS 1/2 messages queued per client beyond
//     those in flight, after which mosquitto drops silently. mochi's
//     Capabilities.MaximumClientWritesPending is 8192 (its per-client outbound
//     packet queue; it drops and counts beyond that).
//
// max_queued_bytes, max_inflight_bytes, max_packet_size and memory_limit stay
// at mosquitto's defaults: no limit.
const (
	MosquittoMaxInflight = 1024
	MosquittoMaxQueued   = 8192
)

// mosquittoCandidates are tried after $PATH: Debian and Ubuntu install the
// broker in /usr/sbin, which is not on every user's $PATH.
var mosquittoCandidates = []string{"/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"}

// findMosquitto returns the path of the mosquitto binary, or an error
// wrapping ErrNotInstalled.
func findMosquitto() (string, error) {
	if p, err := exec.LookPath("mosquitto"); err == nil {
		return p, nil
	}
	for _, p := range mosquittoCandidates {
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("mosquitto: %w (not on $PATH nor in %s)", ErrNotInstalled, strings.Join(mosquittoCandidates, ", "))
}

// mosquittoVersion runs `mosquitto -h` (which exits non-zero by design) and
// parses "mosquitto version X.Y.Z" from its first line.
func mosquittoVersion(ctx context.Context, bin string) (string, error) {
	out, _ := exec.CommandContext(ctx, bin, "-h").CombinedOutput()
	first, _, _ := strings.Cut(string(out), "\n")
	v, ok := strings.CutPrefix(strings.TrimSpace(first), "mosquitto version ")
	if !ok {
		return "", fmt.Errorf("mosquitto: cannot tell the version of %s from %q", bin, first)
	}
	return strings.TrimSpace(v), nil
}

// StartMosquitto runs `mosquitto -c dir/mosquitto.conf` (Mosquitto 2) with a
// config of its own: one listener on a free 127.0.0.1 port, TLS 1.2+ with
// require_certificate and use_identity_as_username (the client certificate's
// CN is the username), cafile/certfile/keyfile from f, allow_anonymous false,
// persistence false, max_connections -1, the per-client limits documented at
// MosquittoMaxInflight, and TCP_NODELAY (as Go sets on every connection).
// No ACL file: every authenticated client may publish and subscribe anywhere.
// mosquitto gets this process's hard RLIMIT_NOFILE as its soft limit (Go
// would otherwise give it the original soft limit, often 1024 descriptors),
// and is SIGKILLed if this process dies (Linux).
// Mosquitto logs errors, warnings, notices and information, but not each
// connection, to dir/mosquitto.log, which also takes its stdout and stderr.
//
// It waits until the port accepts TCP connections and mosquitto has logged
// that it is running, polling with a short backoff until ctx ends (15 s if
// ctx has no deadline). If mosquitto exits or
// does not come up, it is killed and the error includes the tail of its log;
// if the port turns out to be taken meanwhile, it tries another one (three
// tries in all). If there is no mosquitto binary, the error wraps
// ErrNotInstalled; if it is not Mosquitto 2, StartMosquitto fails.
func StartMosquitto(ctx context.Context, dir string, f TLSFiles) (*Peer, error) {
	bin, err := findMosquitto()
	if err != nil {
		return nil, err
	}
	ctx, cancel := startContext(ctx)
	defer cancel()
	version, err := mosquittoVersion(ctx, bin)
	if err != nil {
		return nil, err
	}
	if major, _, _ := strings.Cut(version, "."); major != "2" {
		return nil, fmt.Errorf("mosquitto: %s is version %s; the peer config is for Mosquitto 2", bin, version)
	}
	if dir, err = filepath.Abs(dir); err != nil {
		return nil, fmt.Errorf("mosquitto: %w", err)
	}
	if f, err = absFiles(f); err != nil {
		return nil, fmt.Errorf("mosquitto: %w", err)
	}
	for attempt := 1; ; attempt++ {
		p, err := startMosquittoOnce(ctx, bin, version, dir, f)
		if errors.Is(err, errPortTaken) && attempt < 3 {
			continue
		}
		if err != nil {
			return nil, err
		}
		p.Version = version
		return p, nil
	}
}

var errPortTaken = errors.New("port taken")

func startMosquittoOnce(ctx context.Context, bin, version, dir string, f TLSFiles) (*Peer, error) {
	running := []byte("mosquitto version " + version + " running")
	port, err := freePort()
	if err != nil {
		return nil, fmt.Errorf("mosquitto: %w", err)
	}
	conf := filepath.Join(dir, "mosquitto.conf")
	logPath := filepath.Join(dir, "mosquitto.log")
	if err := os.WriteFile(conf, mosquittoConfig(port, f), 0o600); err != nil {
		return nil, fmt.Errorf("mosquitto: %w", err)
	}
	logFile, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("mosquitto: %w", err)
	}
	defer logFile.Close() // the child has its own copy of the descriptor
	cmd := exec.Command(bin, "-c", conf)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = ChildAttr()
	pr, err := startProc(cmd)
	if err != nil {
		return nil, fmt.Errorf("mosquitto: %w", err)
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	fail := func(why string) (*Peer, error) {
		pr.kill()
		tail := fileTail(logPath, 2048)
		if strings.Contains(tail, "Address already in use") {
			return nil, fmt.Errorf("mosquitto: %w: %s", errPortTaken, addr)
		}
		return nil, fmt.Errorf("mosquitto on %s %s; %s:\n%s", addr, why, logPath, tail)
	}
	var bo backoff
	var d net.Dialer
	for {
		dctx, dcancel := context.WithTimeout(ctx, time.Second)
		c, err := d.DialContext(dctx, "tcp", addr)
		dcancel()
		if err == nil {
			c.Close()
			// Something accepts on the port. It is our mosquitto once that
			// has logged "mosquitto version X running", which it does only
			// after binding all its listeners; if another program took the
			// port meanwhile, mosquitto exits instead.
			if logged(logPath, running) {
				return &Peer{Name: "mosquitto", Addr: addr, PID: cmd.Process.Pid, LogFile: logPath, done: pr.done, stop: pr.terminate}, nil
			}
		}
		if err := pause(ctx, pr, bo.next()); err != nil {
			if errors.Is(err, errExited) {
				return fail(fmt.Sprintf("exited (%v)", pr.waitErr))
			}
			return fail(fmt.Sprintf("did not accept connections: %v", err))
		}
	}
}

// logged reports whether the file at path contains s.
func logged(path string, s []byte) bool {
	b, err := os.ReadFile(path)
	return err == nil && bytes.Contains(b, s)
}

// mosquittoConfig is the config file for StartMosquitto; see it and
// MosquittoMaxInflight for the choices.
func mosquittoConfig(port int, f TLSFiles) []byte {
	var b bytes.Buffer
	line := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	line("# Written by fleetkey.dev/simulator/peers: a load-test peer, not for production.")
	if u, err := user.Current(); err == nil && u.Username != "" {
		// As root, mosquitto would otherwise switch to the "mosquitto" user,
		// which cannot read files in a private temporary directory.
		line("user %s", u.Username)
	}
	line("per_listener_settings false")
	line("allow_anonymous false")
	line("persistence false")
	line("log_dest stderr")
	line("log_type error")
	line("log_type warning")
	line("log_type notice")
	line("log_type information") // start-up lines; StartMosquitto waits for "running"
	line("connection_messages false")
	line("log_timestamp_format %%Y-%%m-%%dT%%H:%%M:%%S")
	line("set_tcp_nodelay true")
	line("max_inflight_messages %d", MosquittoMaxInflight)
	line("max_queued_messages %d", MosquittoMaxQueued)
	line("")
	line("listener %d 127.0.0.1", port)
	line("max_connections -1")
	line("tls_version tlsv1.2")
	line("cafile %s", f.CAFile)
	line("certfile %s", f.CertFile)
	line("keyfile %s", f.KeyFile)
	line("require_certificate true")
	line("use_identity_as_username true")
	return b.Bytes()
}

// absFiles makes f's paths absolute and checks they can go in a config file.
func absFiles(f TLSFiles) (TLSFiles, error) {
	for _, p := range []*string{&f.CAFile, &f.CertFile, &f.KeyFile} {
		if *p == "" {
			return f, errors.New("TLSFiles: CAFile, CertFile and KeyFile are all required")
		}
		if strings.ContainsAny(*p, "\r\n") {
			return f, fmt.Errorf("TLSFiles: path %q contains a line break", *p)
		}
		abs, err := filepath.Abs(*p)
		if err != nil {
			return f, err
		}
		*p = abs
	}
	return f, nil
}

// freePort asks the kernel for a free 127.0.0.1 port and releases it for a
// child to bind. Another program may take it first; StartMosquitto then
// tries again.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	if port == reservedPort { // cannot happen with a normal ephemeral range
		return 0, fmt.Errorf("kernel offered port %d, the system mosquitto's", reservedPort)
	}
	return port, nil
}
