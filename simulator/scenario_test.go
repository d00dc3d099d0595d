package simulator

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestScenarioArgs(t *testing.T) {
	args, err := ScenarioArgs("scenarios/drill.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"--local=true", "--devices=200", "--fault=churn:10%", "--fault=revoke:5@45s", "--attack=all:2"} {
		if !slices.Contains(args, want) {
			t.Errorf("%q missing from %v", want, args)
		}
	}
	dir := t.TempDir()
	for name, c := range map[string]struct{ yaml, want string }{
		"empty":      {"", "empty scenario"},
		"list":       {"- devices\n", "a mapping of flag names"},
		"nested":     {"devices:\n  n: 3\n", "a value or a list of values"},
		"nested-seq": {"fault:\n  - {a: 1}\n", "a list of plain values"},
		"twice":      {"devices: 1\ndevices: 2\n", "given twice"},
		"bad-yaml":   {"devices: [1\n", "did not find"},
		"scenario":   {"scenario: other.yaml\n", "not a flag name"},
	} {
		p := filepath.Join(dir, name+".yaml")
		os.WriteFile(p, []byte(c.yaml), 0o600)
		if _, err := ScenarioArgs(p); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v; want %q", name, err, c.want)
		}
	}
	big := filepath.Join(dir, "big.yaml")
	os.WriteFile(big, []byte("devices: 1\n"+strings.Repeat("#", maxScenario)), 0o600)
	if _, err := ScenarioArgs(big); err == nil || !strings.Contains(err.Error(), "bytes") {
		t.Errorf("an oversized scenario: %v", err)
	}
	if _, err := ScenarioArgs(filepath.Join(dir, "missing.yaml")); err == nil {
		t.Error("a missing file was accepted")
	}
}
