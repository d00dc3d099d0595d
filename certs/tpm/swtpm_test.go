package tpm_test

import (
	"crypto"
	"crypto/x509"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"fleetkey.dev/certs/tpm"
)

// startSWTPM runs Debian's swtpm on a Unix socket in a temp dir and
// returns its --tpm spec; with ekCert, swtpm_setup first manufactures the
// TPM with EK certificates from swtpm's local CA. It skips when swtpm is
// not installed (.ci/run installs it).
func startSWTPM(t *testing.T, ekCert bool) string {
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
	// --daemon returns once the socket is listening.
	out, err := exec.Command("swtpm", "socket", "--tpm2", "--tpmstate", "dir="+dir,
		"--server", "type=unixio,path="+sock, "--ctrl", "type=unixio,path="+filepath.Join(dir, "ctrl.sock"),
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
	return "swtpm:unix:" + sock
}

func TestSWTPM(t *testing.T) {
	spec := startSWTPM(t, false)
	d, err := tpm.Open(spec)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	testSignerAndAttestation(t, d)
	ek, err := d.EK()
	if err != nil {
		t.Fatal(err)
	}
	if ek.Cert != nil {
		t.Fatal("an unmanufactured swtpm reported an EK certificate")
	}
}

func TestSWTPMWithEKCertificate(t *testing.T) {
	spec := startSWTPM(t, true)
	d, err := tpm.Open(spec)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	ek, err := d.EK()
	if err != nil {
		t.Fatal(err)
	}
	if ek.Cert == nil {
		t.Fatal("no EK certificate read from NV")
	}
	// TCG EK certificates carry a critical SAN (the TPM's manufacturer and
	// model as a directory name) that Go refuses to parse as a SAN; that
	// is the provisioning service's business. The key must be the EK's.
	cert, err := x509.ParseCertificate(ek.Cert)
	if err != nil {
		t.Logf("Go's parser refuses this EK certificate: %v", err)
		return
	}
	if !cert.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(ek.Key) {
		t.Fatal("the EK certificate is for another key than the EK")
	}
	testSignerAndAttestation(t, d)
}
