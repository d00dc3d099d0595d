package simulator

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"fleetkey.dev/sessionkey"
)

// TestFleet200 drives 200 devices, each enrolled over EST, through a real
// stack with every fault drill and every attack at once: reconnect churn,
// a reconnect storm, a gateway restart and revocations in the middle of
// the run, while a service receives the records and sends commands. It
// asserts that every attack is refused with the gateway's right reason
// and leaks nothing, that no record is lost or stored twice across the
// restart, and that revoked devices are out within a second.
func TestFleet200(t *testing.T) {
	s := localStack(t)
	tok, err := s.Token(t.Context(), "sim-", 400)
	if err != nil {
		t.Fatal(err)
	}
	fl, err := OpenFleet(s.PKI)
	if err != nil {
		t.Fatal(err)
	}
	svc, err := s.Service()
	if err != nil {
		t.Fatal(err)
	}
	attacks, err := ParseAttacks("all:2", 6*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var faults []Fault
	for _, spec := range []string{"churn:20%", "storm:30%@3s", "gateway-restart@4500ms", "revoke:5@9s"} {
		fs, err := ParseFault(spec)
		if err != nil {
			t.Fatal(err)
		}
		f, err := fs.Fault(s.RestartGateway, s.Revoke)
		if err != nil {
			t.Fatal(err)
		}
		faults = append(faults, f)
	}
	// At most 16 devices between their start and their keys: under -race
	// the whole stack runs several times slower, and this is a test of
	// behaviour, not of load.
	cfg := RunConfig{Devices: 200, Rate: 100, MaxHandshakes: 16, Duration: 9 * time.Second, Interval: 500 * time.Millisecond, Payload: 48,
		Rotation:     sessionkey.Rotation{EpochEvery: 5 * time.Second},
		Provisioning: s.Provisioning, Gateway: s.Gateway, RootCAs: s.RootCAs, Token: tok, Sink: s.Sink, Dir: s.Dir + "/devices",
		Bundle: fl.Bundle(), Service: &svc, CommandRate: 20, Faults: faults, Attacks: attacks,
		AttackEnv: AttackEnv{Issuer: fl.Issuer(), Revoke: s.Revoke, Refusals: s.Refusals}}
	sum, err := Run(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if len(sum.Problems) > 0 {
		refusals, _ := s.Refusals()
		t.Fatalf("problems: %v\nfaults %v\nerrors %v\ngateway refusals %v", sum.Problems, sum.Faults, sum.Errors, refusals)
	}
	// Enrollment over EST, then every device ready and every record stored
	// once, across churn, the storm and the restart.
	if sum.Enrolled != 200 || sum.Connected != 200 {
		t.Fatalf("%d enrolled, %d ready of 200", sum.Enrolled, sum.Connected)
	}
	// The sink may also hold records of revoked devices that were stored
	// but not acknowledged before the gateway cut them off.
	if sum.Published == 0 || sum.Lost != 0 || sum.Duplicated != 0 || sum.InSink < sum.Published || sum.InSink > sum.Published+sum.RevokedDropped {
		t.Fatalf("published %d, in the sink %d, lost %d, duplicated %d", sum.Published, sum.InSink, sum.Lost, sum.Duplicated)
	}
	// Live delivery to the service is at most once across the restart
	// (the sink is what keeps records): nearly all must arrive.
	if sum.Received < sum.Published*95/100 {
		t.Fatalf("the service received %d of %d records", sum.Received, sum.Published)
	}
	if sum.Commands == 0 {
		t.Fatal("no command reached a device")
	}
	if len(sum.Faults) != 4 {
		t.Fatalf("faults: %v", sum.Faults)
	}
	for _, f := range sum.Faults {
		if strings.Contains(f, "failed") {
			t.Fatalf("fault: %s", f)
		}
	}
	// The restart cut the devices connected then; each connected again
	// and made new keys.
	cut := sum.Errors["disconnected: closed by the peer"]
	if cut == 0 || sum.Handshakes < 200+cut {
		t.Fatalf("%d handshakes for 200 devices of which %d were cut by the restart: they did not rekey", sum.Handshakes, cut)
	}
	rev, ok := sum.Phases[PhaseRevoked]
	if !ok || rev.Count != 5 {
		t.Fatalf("revoked_out: %+v", rev)
	}
	if rev.MaxMS >= 1000 {
		t.Fatalf("a revoked device was out only after %.0f ms", rev.MaxMS)
	}
	// The run's own report renders (report's tests open such a page in
	// Chromium): every phase, the faults and the attacks are in it.
	page := filepath.Join(t.TempDir(), "report.html")
	if err := WriteReport(page, sum, &cfg, nil); err != nil {
		t.Fatal(err)
	}
	html, err := os.ReadFile(page)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"revoked → out", "reconnect storm", "tampered-envelope", "<svg"} {
		if !strings.Contains(string(html), want) {
			t.Errorf("the report lacks %q", want)
		}
	}
	// Every attack, tried twice, refused for its reason, nothing leaked.
	if len(sum.Attacks) != len(attackNames) {
		t.Fatalf("%d attack results for %d attacks", len(sum.Attacks), len(attackNames))
	}
	for _, a := range sum.Attacks {
		if !a.OK || a.Tries != 2 || a.Refused != 2 || a.Leaked != 0 {
			t.Errorf("attack %s: %+v", a.Name, a)
			continue
		}
		var got int64
		for _, want := range attackExpect[a.Name] {
			got += a.Gateway[want]
		}
		if got < 2 {
			t.Errorf("attack %s: the gateway counted %v; want %s twice", a.Name, a.Gateway, a.Expect)
		}
	}
}
