// Package agent is the device agent: enrollment through EST, the
// connection to the gateway (paho, mTLS), the fkx1 handshake and key
// rotation, encrypted telemetry with a delivery outbox, commands, and
// certificate renewal. The device-agent CLI is a thin main over it, and
// the simulator runs the same code for each virtual device.
package agent

import (
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"

	"fleetkey.dev/certs/identity"
	"fleetkey.dev/certs/keyfile"
	"fleetkey.dev/certs/tpm"
	"fleetkey.dev/certs/trust"
)

// The state directory's files.
const (
	KeyFile    = "device.key"  // the device's private key, PKCS#8 PEM, 0600
	CertFile   = "device.crt"  // its certificate (leaf), PEM
	BundleFile = "bundle.pem"  // the fleet's CA certificates from EST cacerts
	MetaFile   = "agent.json"  // id, provisioning URL, record id reservation
	StatusFile = "status.json" // what `run` is doing, for `status`
	OutboxFile = "outbox.log"  // unacknowledged records, when kept on disk
	nextSuffix = ".next"       // a renewal being put in place
)

// Meta is the agent's own small state, kept in agent.json.
type Meta struct {
	ID           string `json:"id"`
	Provisioning string `json:"provisioning"`
	// RecordReserved: record ids below it may have been used. A restarted
	// agent starts there, so ids keep rising across restarts and crashes.
	RecordReserved uint64 `json:"record_reserved"`
}

// State is a device's state directory.
type State struct {
	Dir string
	// TPM overrides the TPM recorded at enrollment for a TPM-bound key
	// (the same TPM by another path, e.g. after a reboot renamed it).
	TPM string
	// TPMDevice, if set, is the open TPM to use (not closed by the state):
	// the fleet simulator's virtual devices share one simulated TPM, which
	// holds one SRK for all of them.
	TPMDevice *tpm.Device
	mu        sync.Mutex
}

func (s *State) path(name string) string { return filepath.Join(s.Dir, name) }

// ReadMeta reads agent.json.
func (s *State) ReadMeta() (Meta, error) {
	var m Meta
	b, err := os.ReadFile(s.path(MetaFile))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return m, fmt.Errorf("%s holds no enrolled device (run `device-agent enroll` first)", s.Dir)
		}
		return m, err
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("%s: %w", s.path(MetaFile), err)
	}
	if err := identity.ValidateID(m.ID); err != nil {
		return m, fmt.Errorf("%s: %w", s.path(MetaFile), err)
	}
	return m, nil
}

// WriteMeta replaces agent.json atomically and durably.
func (s *State) WriteMeta(m Meta) error {
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	return keyfile.WriteFile(s.path(MetaFile), append(b, '\n'), 0o600, true)
}

// Credentials are the device's key and certificate and the fleet's trust.
type Credentials struct {
	Signer crypto.Signer
	Leaf   *x509.Certificate
	Bundle *trust.Bundle
	// TPM: the key lives in a TPM and the certificate is TPM-bound.
	TPM    bool
	closer io.Closer
}

// Close releases the TPM, if the key lives in one.
func (c *Credentials) Close() error {
	if c != nil && c.closer != nil {
		return c.closer.Close()
	}
	return nil
}

// TLS returns the client certificate for mTLS: the leaf alone (the
// gateway holds the issuing CAs).
func (c *Credentials) TLS() tls.Certificate {
	return tls.Certificate{Certificate: [][]byte{c.Leaf.Raw}, PrivateKey: c.Signer, Leaf: c.Leaf}
}

// LoadCredentials reads the key, certificate and bundle, first finishing
// a renewal that a crash interrupted.
func (s *State) LoadCredentials() (*Credentials, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.finishRenewal()
	var signer crypto.Signer
	var closer io.Closer
	if _, err := os.Stat(s.path(TPMKeyFile)); err == nil {
		ts, d, err := s.loadTPMKey(s.TPM)
		if err != nil {
			return nil, err
		}
		signer, closer = ts, d
	} else {
		keyPEM, err := os.ReadFile(s.path(KeyFile))
		if err != nil {
			return nil, fmt.Errorf("reading the device key: %w", err)
		}
		if signer, err = keyfile.ParsePrivateKey(keyPEM, nil); err != nil {
			return nil, fmt.Errorf("%s: %w", s.path(KeyFile), err)
		}
	}
	fail := func(err error) (*Credentials, error) {
		if closer != nil {
			closer.Close()
		}
		return nil, err
	}
	leaf, err := readCert(s.path(CertFile))
	if err != nil {
		return fail(err)
	}
	if !samePublicKey(leaf.PublicKey, signer.Public()) {
		return fail(fmt.Errorf("%s does not match the device key", s.path(CertFile)))
	}
	bundlePEM, err := os.ReadFile(s.path(BundleFile))
	if err != nil {
		return fail(fmt.Errorf("reading the fleet bundle: %w", err))
	}
	bundle, err := trust.ParseBundle(bundlePEM)
	if err != nil {
		return fail(fmt.Errorf("%s: %w", s.path(BundleFile), err))
	}
	return &Credentials{Signer: signer, Leaf: leaf, Bundle: bundle, TPM: closer != nil, closer: closer}, nil
}

func readCert(path string) (*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading the device certificate: %w", err)
	}
	certs, err := trust.ParseCertificatesPEM(b)
	if err != nil || len(certs) == 0 {
		return nil, fmt.Errorf("%s holds no certificate: %v", path, err)
	}
	return certs[0], nil
}

func samePublicKey(a, b crypto.PublicKey) bool {
	ea, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ea.Equal(b)
}

// storeCredentials writes a new key and certificate. For a first
// enrollment they must not exist yet; a renewal writes them beside the
// current ones and then moves them into place (finishRenewal), so a crash
// leaves either the old pair or the new one.
func (s *State) storeCredentials(key crypto.Signer, leaf *x509.Certificate, renewal bool) error {
	keyPEM, err := keyfile.MarshalPrivateKey(key)
	if err != nil {
		return err
	}
	defer clear(keyPEM)
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leaf.Raw})
	if !renewal {
		if err := keyfile.WriteFile(s.path(KeyFile), keyPEM, 0o600, false); err != nil {
			return fmt.Errorf("storing the device key: %w", err)
		}
		return keyfile.WriteFile(s.path(CertFile), certPEM, 0o644, true)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := keyfile.WriteFile(s.path(KeyFile+nextSuffix), keyPEM, 0o600, true); err != nil {
		return err
	}
	if err := keyfile.WriteFile(s.path(CertFile+nextSuffix), certPEM, 0o644, true); err != nil {
		return err
	}
	s.finishRenewal()
	return nil
}

// finishRenewal moves a complete, matching renewal pair into place; a
// half-written one is removed. The certificate moves first: after a crash
// between the two renames, the .next key matches the certificate already
// in place, and this moves it in too. Caller holds mu.
func (s *State) finishRenewal() {
	kp, cp := s.path(KeyFile+nextSuffix), s.path(CertFile+nextSuffix)
	keyPEM, err := os.ReadFile(kp)
	if err != nil {
		os.Remove(cp) // a certificate without its key is of no use
		return
	}
	defer clear(keyPEM)
	cert, cerr := readCert(cp)
	if cerr != nil {
		cert, cerr = readCert(s.path(CertFile))
	}
	signer, kerr := keyfile.ParsePrivateKey(keyPEM, nil)
	if cerr != nil || kerr != nil || !samePublicKey(cert.PublicKey, signer.Public()) {
		os.Remove(kp)
		os.Remove(cp)
		return
	}
	if _, err := os.Stat(cp); err == nil {
		if os.Rename(cp, s.path(CertFile)) != nil {
			return
		}
	}
	_ = os.Rename(kp, s.path(KeyFile))
	syncDir(s.Dir)
}

func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
}

// Status is what a running agent reports in status.json.
type Status struct {
	ID           string    `json:"id"`
	Gateway      string    `json:"gateway"`
	Connected    bool      `json:"connected"`
	Since        time.Time `json:"since"`
	KID          string    `json:"kid,omitempty"`
	EpochStarted time.Time `json:"epoch_started,omitzero"`
	Epochs       int64     `json:"epochs"`
	RecordsAcked int64     `json:"records_acked"`
	Outbox       int       `json:"outbox"`
	CertNotAfter time.Time `json:"cert_not_after"`
	LastError    string    `json:"last_error,omitempty"`
	PID          int       `json:"pid"`
	Updated      time.Time `json:"updated"`
}

// WriteStatus replaces status.json (not fsync'd: it is informational).
func (s *State) WriteStatus(st Status) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	tmp := s.path(StatusFile + ".tmp")
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, s.path(StatusFile))
}

// ReadStatus reads status.json.
func (s *State) ReadStatus() (Status, error) {
	var st Status
	b, err := os.ReadFile(s.path(StatusFile))
	if err != nil {
		return st, err
	}
	return st, json.Unmarshal(b, &st)
}
