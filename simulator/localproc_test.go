package simulator

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestLocalProcesses: the stack as child processes (the real provisioning
// and gateway binaries, built here): devices enroll over EST, a device is
// revoked through the admin API, the gateway process restarts mid-run,
// and an attack is refused for its reason as the gateway's metrics count
// it; nothing is lost, and both processes stop when the stack does.
func TestLocalProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the stack's binaries")
	}
	bin := t.TempDir()
	build := exec.Command("go", "build", "-o", bin, "fleetkey.dev/provisioning/cmd/provisioning", "fleetkey.dev/gateway/cmd/gateway")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the binaries: %v\n%s", err, out)
	}
	dir := t.TempDir()
	s, err := StartLocalWith(t.Context(), dir, nil, LocalOptions{Bin: bin})
	if err != nil {
		t.Fatal(err)
	}
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			s.Stop()
		}
	})
	tok, err := s.Token(t.Context(), "sim-", 100)
	if err != nil {
		t.Fatal(err)
	}
	attacks, err := ParseAttacks("spoofed-client-id:1", 500*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	restart := Fault{Name: "gateway-restart", At: 2 * time.Second, Do: func(context.Context, *FleetControl) (string, error) { return "", s.RestartGateway() }}
	revoke, err := FaultSpec{Kind: "revoke", N: 1, At: time.Second}.Fault(nil, s.Revoke)
	if err != nil {
		t.Fatal(err)
	}
	fl, err := OpenFleet(s.PKI)
	if err != nil {
		t.Fatal(err)
	}
	sum, err := Run(t.Context(), RunConfig{Devices: 10, Rate: 50, Duration: 4 * time.Second, Interval: 100 * time.Millisecond,
		Provisioning: s.Provisioning, Token: tok, Gateway: s.Gateway, RootCAs: s.RootCAs, Sink: s.Sink, Bundle: fl.Bundle(),
		Faults: []Fault{revoke, restart}, Attacks: attacks, Dir: t.TempDir(),
		AttackEnv: AttackEnv{Issuer: fl.Issuer(), Revoke: s.Revoke, Refusals: s.Refusals}})
	if err != nil {
		t.Fatal(err)
	}
	if sum.Connected != 10 || sum.Lost != 0 || sum.Duplicated != 0 || sum.InSink != sum.Published || len(sum.Problems) > 0 {
		t.Fatalf("summary: %+v", sum)
	}
	if len(sum.Attacks) != 1 || !sum.Attacks[0].OK || sum.Attacks[0].Gateway["connect/client-id-mismatch"] != 1 {
		t.Fatalf("attack: %+v", sum.Attacks)
	}
	if ph := sum.Phases[PhaseRevoked]; ph.Count != 1 {
		t.Fatalf("revoked_out: %+v; faults %v; errors %v", ph, sum.Faults, sum.Errors)
	}
	if err := s.Stop(); err != nil {
		t.Fatalf("stopping the stack: %v", err)
	}
	stopped = true
	for _, name := range []string{"provisioning.log", "gateway.log"} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil || !strings.Contains(string(b), "level=") {
			t.Errorf("%s: %d bytes, %v", name, len(b), err)
		}
	}
}

// TestLocalProcessesRefusals: no binaries where they are said to be.
func TestLocalProcessesRefusals(t *testing.T) {
	t.Parallel()
	_, err := StartLocalWith(t.Context(), t.TempDir(), nil, LocalOptions{Bin: t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "no provisioning binary at") {
		t.Fatalf("no binaries: %v", err)
	}
}
