package simulator

import (
	"testing"
	"time"

	"fleetkey.dev/sessionkey"
)

// TestRunLocal: a small fleet through a local stack, with rekeying, loses
// and duplicates nothing.
func TestRunLocal(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the whole stack")
	}
	dir := t.TempDir()
	s, err := StartLocal(t.Context(), dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	tok, err := s.Token(t.Context(), "sim-", 10)
	if err != nil {
		t.Fatal(err)
	}
	sum, err := Run(t.Context(), RunConfig{Devices: 10, Rate: 20, Duration: 3 * time.Second, Interval: 100 * time.Millisecond, Payload: 64,
		Rotation:     sessionkey.Rotation{EpochEvery: time.Second, GenerationEvery: 300 * time.Millisecond},
		Provisioning: s.Provisioning, Gateway: s.Gateway, RootCAs: s.RootCAs, Token: tok, Sink: s.Sink, Dir: dir + "/devices"})
	if err != nil {
		t.Fatal(err)
	}
	if sum.Connected != 10 || sum.Published == 0 || sum.InSink != sum.Published || sum.Lost != 0 || sum.Duplicated != 0 || len(sum.Errors) > 0 {
		t.Fatalf("summary: %+v", sum)
	}
	if sum.Handshakes <= 10 {
		t.Fatalf("%d handshakes for 10 devices over 3 s with a 1 s epoch: no rekey", sum.Handshakes)
	}
}
