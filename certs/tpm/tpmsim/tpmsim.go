// Package tpmsim registers the in-process TPM 2.0 simulator (the
// Microsoft reference implementation, through go-tpm-tools; it needs cgo)
// as --tpm sim. Only tests and the fleet simulator import it, so the
// device agent itself builds without cgo. It also starts Debian's swtpm
// for tests (StartSWTPM).
package tpmsim

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/simulator"

	"fleetkey.dev/certs/tpm"
)

// The simulator is one TPM for the whole process, as a device has one:
// every Open of "sim" talks to it, and Close leaves it running, so its
// endorsement key stays the same from one Open to the next (a new
// simulator would have new seeds, and so another EK).
var (
	simOnce sync.Once
	simTPM  transport.TPMCloser
	simErr  error
	simMu   sync.Mutex
)

type shared struct{}

func (shared) Send(cmd []byte) ([]byte, error) {
	simMu.Lock()
	defer simMu.Unlock()
	return simTPM.Send(cmd)
}

func (shared) Close() error { return nil }

func init() {
	tpm.Register("sim", func(string) (transport.TPMCloser, error) {
		simOnce.Do(func() { simTPM, simErr = simulator.OpenSimulator() })
		if simErr != nil {
			return nil, simErr
		}
		return shared{}, nil
	})
}

// StartSWTPM runs Debian's swtpm on a Unix socket in a temp dir and
// returns its --tpm spec; with ekCert, swtpm_setup first manufactures the
// TPM with EK certificates from swtpm's local CA. It skips when swtpm is
// not installed (.ci/run installs it).
func StartSWTPM(t testing.TB, ekCert bool) string { return startSWTPM(t, ekCert, false) }

// StartSWTPMTCP is StartSWTPM with swtpm's data channel on TCP
// (swtpm:tcp:127.0.0.1:PORT).
func StartSWTPMTCP(t testing.TB) string { return startSWTPM(t, false, true) }

func startSWTPM(t testing.TB, ekCert, tcp bool) string {
	t.Helper()
	if _, err := exec.LookPath("swtpm"); err != nil {
		t.Skip("swtpm is not installed (apt-get install swtpm swtpm-tools); .ci/run installs it")
	}
	dir := t.TempDir()
	if ekCert {
		if _, err := exec.LookPath("swtpm_setup"); err != nil {
			t.Skip("swtpm_setup is not installed (apt-get install swtpm-tools)")
		}
		out, err := exec.Command("swtpm_setup", "--tpm2", "--tpmstate", dir, "--create-ek-cert", "--create-platform-cert", "--overwrite").CombinedOutput()
		if err != nil {
			t.Fatalf("swtpm_setup: %v\n%s", err, out)
		}
	}
	sock, pid := filepath.Join(dir, "tpm.sock"), filepath.Join(dir, "swtpm.pid")
	server, spec := "type=unixio,path="+sock, "swtpm:unix:"+sock
	if tcp {
		// A free port: the kernel picks one, and swtpm binds it next.
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		server, spec = "type=tcp,bindaddr=127.0.0.1,port="+strconv.Itoa(port), "swtpm:tcp:127.0.0.1:"+strconv.Itoa(port)
	}
	// --daemon returns once the socket is listening.
	out, err := exec.Command("swtpm", "socket", "--tpm2", "--tpmstate", "dir="+dir,
		"--server", server, "--ctrl", "type=unixio,path="+filepath.Join(dir, "ctrl.sock"),
		"--flags", "startup-clear", "--daemon", "--pid", "file="+pid).CombinedOutput()
	if err != nil {
		t.Fatalf("swtpm: %v\n%s", err, out)
	}
	t.Cleanup(func() {
		if b, err := os.ReadFile(pid); err == nil {
			if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				syscall.Kill(n, syscall.SIGTERM)
			}
		}
	})
	return spec
}
