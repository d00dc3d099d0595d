package server

import (
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"go.yaml.in/yaml/v3"

	"fleetkey.dev/certs/authority"
	"fleetkey.dev/certs/identity"
)

// Config is the provisioning service's configuration, read from YAML and
// flags. The zero value of every field is its default, as documented.
type Config struct {
	// Listen is the HTTPS address of EST, the admin API, the CRL and the
	// revocation feed. Default ":8443".
	Listen string `yaml:"listen"`
	// MetricsListen is the plain-HTTP address of /metrics, /healthz and
	// /readyz. Default ":9101". "off" disables it.
	MetricsListen string `yaml:"metrics_listen"`
	// PKIDir holds the issuing CA and bundle that `certs init` wrote.
	// Default ".fleetkey/pki".
	PKIDir string `yaml:"pki_dir"`
	// PassphraseFile holds the CA passphrase; default: the certs CLI's
	// sources ($FLEETKEY_CA_PASSPHRASE, ..., PKIDir/ca.pass).
	PassphraseFile string `yaml:"passphrase_file"`
	// DataDir holds the SQLite registry (registry.db). Default
	// ".fleetkey/provisioning". Ignored when Database is set.
	DataDir string `yaml:"data_dir"`
	// Database is a postgres:// DSN; empty means SQLite in DataDir.
	Database string `yaml:"database"`
	// HostNames and HostIPs go into the server certificate the service
	// issues itself at start-up. Default localhost, 127.0.0.1, ::1.
	HostNames []string `yaml:"host_names"`
	HostIPs   []string `yaml:"host_ips"`
	// Policy for device certificates.
	DeviceValidity time.Duration       `yaml:"device_validity"` // default 2160h (90 days)
	KeyTypes       []authority.KeyType `yaml:"key_types"`       // default p256, p384, ed25519
	// CRLLifetime is the nextUpdate distance of served CRLs. Default 24h.
	CRLLifetime time.Duration `yaml:"crl_lifetime"`
	Limits      Limits        `yaml:"limits"`
	// TPM attestation (/attest/v1). EKAllowlist holds SHA-256 hashes (hex)
	// of trusted EK public keys (SubjectPublicKeyInfo DER); EKRoots are PEM
	// files of TPM manufacturers' CAs (roots and intermediates), whose EK
	// certificates make an EK trusted. With neither, attestation refuses
	// every EK.
	EKAllowlist []string `yaml:"ek_allowlist"`
	EKRoots     []string `yaml:"ek_roots"`
}

// Limits bound what clients can make the service do.
type Limits struct {
	// MaxConcurrent requests being handled; more get 503. Default 256.
	MaxConcurrent int `yaml:"max_concurrent"`
	// EnrollPerMinutePerToken and EnrollPerMinutePerAddr rate-limit EST
	// (burst of the same size); more get 429 with Retry-After. Defaults
	// 600 and 600.
	EnrollPerMinutePerToken int `yaml:"enroll_per_minute_per_token"`
	EnrollPerMinutePerAddr  int `yaml:"enroll_per_minute_per_addr"`
	// Deadlines of the HTTP server. Defaults 5s, 15s, 30s, 120s.
	ReadHeaderTimeout time.Duration `yaml:"read_header_timeout"`
	ReadTimeout       time.Duration `yaml:"read_timeout"`
	WriteTimeout      time.Duration `yaml:"write_timeout"`
	IdleTimeout       time.Duration `yaml:"idle_timeout"`
	// MaxHeaderBytes; default 16 KiB.
	MaxHeaderBytes int `yaml:"max_header_bytes"`
}

// LoadConfig reads a YAML file; unknown keys are an error, so a typo is
// not silently ignored.
func LoadConfig(path string) (Config, error) {
	var c Config
	f, err := os.Open(path)
	if err != nil {
		return c, fmt.Errorf("reading config: %w", err)
	}
	defer f.Close()
	dec := yaml.NewDecoder(f)
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil && !errors.Is(err, io.EOF) {
		return c, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

// withDefaults returns c with every zero field set to its default.
func (c Config) withDefaults() Config {
	def := func(s *string, v string) {
		if *s == "" {
			*s = v
		}
	}
	def(&c.Listen, ":8443")
	def(&c.MetricsListen, ":9101")
	def(&c.PKIDir, ".fleetkey/pki")
	def(&c.DataDir, ".fleetkey/provisioning")
	if len(c.HostNames) == 0 && len(c.HostIPs) == 0 {
		c.HostNames, c.HostIPs = []string{"localhost"}, []string{"127.0.0.1", "::1"}
	}
	if c.DeviceValidity == 0 {
		c.DeviceValidity = authority.DefaultValidity[identity.RoleDevice]
	}
	if c.CRLLifetime == 0 {
		c.CRLLifetime = 24 * time.Hour
	}
	l := &c.Limits
	defInt := func(p *int, v int) {
		if *p == 0 {
			*p = v
		}
	}
	defInt(&l.MaxConcurrent, 256)
	defInt(&l.EnrollPerMinutePerToken, 600)
	defInt(&l.EnrollPerMinutePerAddr, 600)
	defInt(&l.MaxHeaderBytes, 16<<10)
	defDur := func(p *time.Duration, v time.Duration) {
		if *p == 0 {
			*p = v
		}
	}
	defDur(&l.ReadHeaderTimeout, 5*time.Second)
	defDur(&l.ReadTimeout, 15*time.Second)
	defDur(&l.WriteTimeout, 30*time.Second)
	defDur(&l.IdleTimeout, 120*time.Second)
	return c
}

// Validate checks the configuration (after defaults) and names the key at
// fault.
func (c Config) Validate() error {
	c = c.withDefaults()
	for _, h := range c.EKAllowlist {
		if b, err := hex.DecodeString(h); err != nil || len(b) != 32 {
			return fmt.Errorf("config ek_allowlist: %q is not a SHA-256 in hex (64 hex digits)", h)
		}
	}
	for key, addr := range map[string]string{"listen": c.Listen, "metrics_listen": c.MetricsListen} {
		if key == "metrics_listen" && addr == "off" {
			continue
		}
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return fmt.Errorf("config %s: %q is not host:port: %v", key, addr, err)
		}
	}
	if c.DeviceValidity < authority.MinValidity {
		return fmt.Errorf("config device_validity: %s is shorter than the minimum %s", c.DeviceValidity, authority.MinValidity)
	}
	if c.CRLLifetime < time.Minute {
		return fmt.Errorf("config crl_lifetime: %s is shorter than a minute", c.CRLLifetime)
	}
	for _, ip := range c.HostIPs {
		if net.ParseIP(ip) == nil {
			return fmt.Errorf("config host_ips: %q is not an IP address", ip)
		}
	}
	for key, v := range map[string]int{"limits.max_concurrent": c.Limits.MaxConcurrent, "limits.enroll_per_minute_per_token": c.Limits.EnrollPerMinutePerToken,
		"limits.enroll_per_minute_per_addr": c.Limits.EnrollPerMinutePerAddr} {
		if v < 0 {
			return fmt.Errorf("config %s: %d is negative", key, v)
		}
	}
	p := authority.Policy{TrustDomain: "x", KeyTypes: c.KeyTypes}
	if err := p.Validate(); err != nil {
		return fmt.Errorf("config key_types: %w", err)
	}
	return nil
}
