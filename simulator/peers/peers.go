// Package peers starts the brokers that `make bench-peers` compares the
// fleetkey gateway with: a private Mosquitto 2 process and bare mochi-mqtt
// (in this process, or as a child process via MochiMain and StartProcess).
//
// Every peer listens on 127.0.0.1 only, on a port chosen at run time; port
// 1883 belongs to the system Mosquitto and is never used. Every peer speaks
// MQTT over mutual TLS: the client must present a certificate signed by the
// configured CA.
//
// A peer outlives the ctx passed to its Start function: ctx only bounds the
// start-up wait. Call Stop to end it.
package peers

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// ErrNotInstalled is wrapped by the error StartMosquitto returns when there
// is no mosquitto binary to run.
var ErrNotInstalled = errors.New("not installed")

// TLSFiles are PEM files for a broker: the CA that signs client certificates,
// and the server's certificate chain and key.
type TLSFiles struct{ CAFile, CertFile, KeyFile string }

// Peer is a running broker process (or in-process server).
type Peer struct {
	Name    string // "mosquitto", "mochi"
	Addr    string // 127.0.0.1:PORT
	PID     int    // the process whose memory is measured (os.Getpid() for in-process)
	Version string // the broker's version, when known ("2.0.11", "2.7.9")
	LogFile string // the broker's log, when it has one of its own (mosquitto)

	done     chan struct{} // closed when the process exits or the server is closed
	stop     func() error
	stopOnce sync.Once
	stopErr  error
}

// Stop ends the peer and waits until it has gone; its port is closed when
// Stop returns. A process gets SIGTERM, then SIGKILL if it is still running
// 5 s later. Stop returns nil if the peer shut down cleanly on request; an
// error if it had to be killed or had already died on its own. Calling Stop
// again returns the same result.
func (p *Peer) Stop() error {
	p.stopOnce.Do(func() { p.stopErr = p.stop() })
	return p.stopErr
}

// Done is closed when the peer's process exits (or, in process, when the
// server has been stopped), so a benchmark can notice a peer that crashed.
func (p *Peer) Done() <-chan struct{} { return p.done }

// RSS is the resident set size of the peer's process, in bytes, from
// /proc/PID/status VmRSS. For an in-process peer that is the whole process,
// load generator included.
func (p *Peer) RSS() (int64, error) { return RSS(p.PID) }

// RSS is the resident set size of process pid, in bytes, from
// /proc/PID/status VmRSS (Linux only).
func RSS(pid int) (int64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, fmt.Errorf("rss of pid %d: %w", pid, err)
	}
	return parseVmRSS(b, pid)
}

func parseVmRSS(status []byte, pid int) (int64, error) {
	sc := bufio.NewScanner(bytes.NewReader(status))
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:")
		if !ok {
			continue
		}
		fields := strings.Fields(rest)
		if len(fields) != 2 || fields[1] != "kB" {
			return 0, fmt.Errorf("rss of pid %d: unexpected VmRSS line %q", pid, sc.Text())
		}
		kb, err := strconv.ParseInt(fields[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("rss of pid %d: %w", pid, err)
		}
		return kb * 1024, nil
	}
	return 0, fmt.Errorf("rss of pid %d: no VmRSS in /proc/%d/status (exited?)", pid, pid)
}

// stopGrace is how long a process has, after SIGTERM, before SIGKILL.
const stopGrace = 5 * time.Second

// defaultStartTimeout bounds a start-up wait when ctx has no deadline.
const defaultStartTimeout = 15 * time.Second

// reservedPort is the system Mosquitto's; no peer may bind it.
const reservedPort = 1883

// proc is a started child process and the result of waiting for it.
type proc struct {
	cmd     *exec.Cmd
	done    chan struct{}
	waitErr error // valid once done is closed
}

func startProc(cmd *exec.Cmd) (*proc, error) {
	liftChildNofile()
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	pr := &proc{cmd: cmd, done: make(chan struct{})}
	go func() {
		pr.waitErr = cmd.Wait()
		close(pr.done)
	}()
	return pr, nil
}

// exited reports whether the process has exited, without blocking.
func (pr *proc) exited() bool {
	select {
	case <-pr.done:
		return true
	default:
		return false
	}
}

// terminate sends SIGTERM, then SIGKILL after stopGrace, and waits for the
// process to exit. It returns nil if the process exited cleanly because of
// the SIGTERM (status 0, or killed by that SIGTERM).
func (pr *proc) terminate() error {
	if pr.exited() {
		if pr.waitErr != nil {
			return fmt.Errorf("%s had already exited: %w", pr.cmd.Path, pr.waitErr)
		}
		return fmt.Errorf("%s had already exited", pr.cmd.Path)
	}
	_ = pr.cmd.Process.Signal(syscall.SIGTERM)
	t := time.NewTimer(stopGrace)
	defer t.Stop()
	select {
	case <-pr.done:
	case <-t.C:
		_ = pr.cmd.Process.Kill()
		<-pr.done
		return fmt.Errorf("%s did not exit within %v of SIGTERM; killed", pr.cmd.Path, stopGrace)
	}
	if pr.waitErr == nil {
		return nil
	}
	var ee *exec.ExitError
	if errors.As(pr.waitErr, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGTERM {
			return nil
		}
	}
	return fmt.Errorf("%s: %w", pr.cmd.Path, pr.waitErr)
}

// kill ends a process that failed to start properly; its exit status is of
// no interest.
func (pr *proc) kill() {
	_ = pr.cmd.Process.Kill()
	<-pr.done
}

// startContext gives ctx a deadline of defaultStartTimeout if it has none.
func startContext(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, defaultStartTimeout)
}

// backoff yields the successive waits of a poll loop: 2 ms doubling to 100 ms.
type backoff struct{ d time.Duration }

func (b *backoff) next() time.Duration {
	switch {
	case b.d == 0:
		b.d = 2 * time.Millisecond
	case b.d < 100*time.Millisecond:
		b.d = min(2*b.d, 100*time.Millisecond)
	}
	return b.d
}

// pause waits d, or until ctx ends or the process exits, whichever is first.
// It returns ctx's error or errExited in the latter cases.
func pause(ctx context.Context, pr *proc, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-pr.done:
		return errExited
	}
}

var errExited = errors.New("process exited")

// readAddrFile reads the host:port a child wrote to path: "" while there
// is no file or not yet a whole line (a writer that does not rename into
// place may be half-way through), an error for a line that is no address.
func readAddrFile(path string) (string, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) || err == nil && !bytes.HasSuffix(b, []byte("\n")) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	addr := strings.TrimSpace(string(b))
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return "", fmt.Errorf("bad address in %s: %w", path, err)
	}
	return addr, nil
}

// StartProcess runs cmd, a command that will write its listening address
// (host:port) and a newline to addrFile as MochiMain does, waits for that file, and returns
// a Peer for it (PID = the child's pid). Any file already at addrFile is
// removed first. The wait polls with a short backoff until ctx ends (15 s if
// ctx has no deadline); if the child exits first, or ctx ends, the child is
// killed and the error says so (with the tail of its stderr when cmd.Stderr
// was nil: StartProcess then captures it). Stop sends SIGTERM, then SIGKILL
// after 5 s, and waits. Only the child itself is signalled, not its children.
//
// If cmd.SysProcAttr is nil, StartProcess sets it so that the child is
// SIGKILLed if this process dies (Linux). Like StartMosquitto, it lets the
// child have this process's hard RLIMIT_NOFILE as its soft limit, rather than
// the lower soft limit Go would otherwise restore for children.
func StartProcess(ctx context.Context, name string, addrFile string, cmd *exec.Cmd) (*Peer, error) {
	if err := os.Remove(addrFile); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	var tail *Tail
	if cmd.Stderr == nil {
		tail = NewTail(4096)
		cmd.Stderr = tail
	}
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = ChildAttr()
	}
	pr, err := startProc(cmd)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	fail := func(err error) (*Peer, error) {
		pr.kill()
		if tail != nil {
			if s := strings.TrimSpace(tail.String()); s != "" {
				return nil, fmt.Errorf("%s: %w; stderr:\n%s", name, err, s)
			}
		}
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	ctx, cancel := startContext(ctx)
	defer cancel()
	var bo backoff
	for {
		addr, err := readAddrFile(addrFile)
		if err != nil {
			return fail(err)
		}
		if addr != "" {
			return &Peer{Name: name, Addr: addr, PID: cmd.Process.Pid, done: pr.done, stop: pr.terminate}, nil
		}
		if err := pause(ctx, pr, bo.next()); err != nil {
			if errors.Is(err, errExited) {
				return fail(fmt.Errorf("exited before writing %s: %v", addrFile, pr.waitErr))
			}
			return fail(fmt.Errorf("no address in %s: %w", addrFile, err))
		}
	}
}

// NewTail keeps the last max bytes written to it.
func NewTail(max int) *Tail { return &Tail{max: max} }

// Tail keeps the last bytes written to it (a child process's stderr, for
// its error messages).
type Tail struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (t *Tail) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if over := len(t.b) - t.max; over > 0 {
		t.b = append(t.b[:0], t.b[over:]...)
	}
	return len(p), nil
}

func (t *Tail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}

// fileTail returns about the last n bytes of the file at path, trimmed to
// whole lines.
func fileTail(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", path, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", path, err)
	}
	off := max(st.Size()-n, 0)
	b, err := io.ReadAll(io.NewSectionReader(f, off, st.Size()-off))
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", path, err)
	}
	if off > 0 {
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			b = b[i+1:]
		}
	}
	return strings.TrimSpace(string(b))
}

// checkPort refuses the system Mosquitto's port.
func checkPort(addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	if n, err := net.LookupPort("tcp", port); err == nil && n == reservedPort {
		return fmt.Errorf("port %d is the system mosquitto's; use another (or :0)", reservedPort)
	}
	return nil
}
