package server

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestExampleConfig(t *testing.T) {
	t.Parallel()
	cfg, err := LoadConfig("../provisioning.example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	// The example shows the defaults: loading it changes nothing.
	if got, want := cfg.withDefaults(), (Config{}).withDefaults(); got.Listen != want.Listen || got.DeviceValidity != want.DeviceValidity ||
		got.Limits != want.Limits || got.CRLLifetime != want.CRLLifetime {
		t.Fatalf("example config differs from the defaults:\n%+v\n%+v", got, want)
	}
}

func TestConfigRefusals(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, yaml, detail string
	}{
		{"fail/unknown-key", "listne: ':1'\n", "field listne not found"},
		{"fail/listen", "listen: nonsense\n", "config listen"},
		{"fail/validity", "device_validity: 30m\n", "config device_validity"},
		{"fail/crl", "crl_lifetime: 1s\n", "config crl_lifetime"},
		{"fail/ip", "host_ips: [notanip]\n", "config host_ips"},
		{"fail/key-type", "key_types: [dsa]\n", "config key_types"},
		{"fail/negative", "limits: {max_concurrent: -1}\n", "limits.max_concurrent"},
		{"fail/ek-hash", "ek_allowlist: [abc]\n", "ek_allowlist"},
		{"fail/duration-syntax", "device_validity: 90 days\n", "line 1: cannot unmarshal !!str `90 days` into time.Duration"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			p := filepath.Join(t.TempDir(), "c.yaml")
			if err := os.WriteFile(p, []byte(c.yaml), 0o600); err != nil {
				t.Fatal(err)
			}
			cfg, err := LoadConfig(p)
			if err == nil {
				err = cfg.Validate()
			}
			if err == nil || !strings.Contains(err.Error(), c.detail) {
				t.Fatalf("got %v; want an error containing %q", err, c.detail)
			}
		})
	}
	if d := (Config{}).withDefaults().DeviceValidity; d != 90*24*time.Hour {
		t.Fatalf("default device validity %s", d)
	}
}
