package simulator

import (
	"strings"
	"testing"
	"time"
)

func TestParseFault(t *testing.T) {
	for spec, want := range map[string]FaultSpec{
		"gateway-restart@20s": {Kind: "gateway-restart", At: 20 * time.Second},
		"churn:10%":           {Kind: "churn", Fraction: 0.1},
		"storm:50%@30s":       {Kind: "storm", At: 30 * time.Second, Fraction: 0.5},
		"revoke:5@1m":         {Kind: "revoke", At: time.Minute, N: 5},
	} {
		got, err := ParseFault(spec)
		if err != nil || got != want {
			t.Errorf("%s: %+v, %v; want %+v", spec, got, err, want)
		}
	}
	for spec, want := range map[string]string{
		"gateway-restart":     "gateway-restart@D",
		"gateway-restart@x":   "not a duration",
		"churn:10%@5s":        "churn runs all along",
		"churn:10":            "percentage",
		"churn:0%":            "percentage",
		"churn:101%":          "percentage",
		"storm:50%":           "storm:P%@D",
		"revoke:0@5s":         "revoke:N@D",
		"revoke:x@5s":         "revoke:N@D",
		"meteor@5s":           "unknown",
		"gateway-restart@-1s": "not a duration",
	} {
		if _, err := ParseFault(spec); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v; want %q", spec, err, want)
		}
	}
	// Faults that need the stack say so.
	fs, _ := ParseFault("gateway-restart@1s")
	if _, err := fs.Fault(nil, nil); err == nil || !strings.Contains(err.Error(), "--local") {
		t.Errorf("gateway-restart without a stack: %v", err)
	}
	fs, _ = ParseFault("revoke:1@1s")
	if _, err := fs.Fault(nil, nil); err == nil || !strings.Contains(err.Error(), "enrolled devices") {
		t.Errorf("revoke without an admin: %v", err)
	}
}

func TestParseAttacks(t *testing.T) {
	all, err := ParseAttacks("all", time.Second)
	if err != nil || len(all) != len(attackNames) || all[0].Tries != 3 {
		t.Fatalf("all: %v, %v", all, err)
	}
	some, err := ParseAttacks("wrong-ca:5, acl-publish", 0)
	if err != nil || len(some) != 2 || some[0].Tries != 5 || some[1].Name != "acl-publish" {
		t.Fatalf("a list: %+v, %v", some, err)
	}
	for spec, want := range map[string]string{
		"sql-injection":  "unknown",
		"wrong-ca:0":     "1 to 1000",
		"wrong-ca:lots":  "1 to 1000",
		"wrong-ca:10000": "1 to 1000",
	} {
		if _, err := ParseAttacks(spec, 0); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v; want %q", spec, err, want)
		}
	}
}

// TestSLOMetrics: the metrics an issue's objectives name.
func TestSLOMetrics(t *testing.T) {
	slos, err := ParseSLOs("connect_p99<2s,leaks=0,attacks_failed=0,invalid=0,e2e_p999<1s,tcp_max<=500ms")
	if err != nil {
		t.Fatal(err)
	}
	sum := &Summary{Valid: true, ReadyP99MS: 900, Phases: map[string]PhaseStats{PhaseE2E: {P999MS: 800}, PhaseTCP: {MaxMS: 500}},
		Attacks: []AttackResult{{Name: "wrong-ca", OK: true}}}
	if missed := Check(sum, slos); len(missed) != 0 {
		t.Fatalf("missed %v", missed)
	}
	sum.Valid, sum.Attacks = false, []AttackResult{{Name: "wrong-ca", Leaked: 1}}
	if missed := Check(sum, slos); len(missed) != 3 {
		t.Fatalf("missed %v; want leaks, attacks_failed and invalid", missed)
	}
}
