package pkidir

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"time"

	"fleetkey.dev/certs/authority"
	"fleetkey.dev/certs/crl"
	"fleetkey.dev/certs/keyfile"
)

// The offline revocation state is revoked.txt, one line per revoked serial:
//
//	<serial in hex> <RFC 5280 reason name> <revocation time, RFC 3339>
//
// The provisioning service keeps its own state in its registry; this file
// is for a PKI run by hand with the certs CLI.

// ParseSerial reads a serial number as hex, with or without colons or a
// 0x prefix, as openssl and `certs inspect` print it.
func ParseSerial(s string) (*big.Int, error) {
	h := strings.ToLower(strings.ReplaceAll(strings.TrimPrefix(strings.TrimSpace(s), "0x"), ":", ""))
	n, ok := new(big.Int).SetString(h, 16)
	if !ok || n.Sign() <= 0 || len(h) > 40 {
		return nil, fmt.Errorf("serial %q is not a positive hexadecimal number of at most 20 bytes", s)
	}
	return n, nil
}

// ReadRevoked reads dir/revoked.txt; a missing file is an empty list.
func ReadRevoked(dir string) ([]crl.Entry, error) {
	path := filepath.Join(dir, RevokedFile)
	b, err := readFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []crl.Entry
	sc := bufio.NewScanner(bytes.NewReader(b))
	for line := 1; sc.Scan(); line++ {
		text := strings.TrimSpace(sc.Text())
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		f := strings.Fields(text)
		if len(f) != 3 {
			return nil, fmt.Errorf("%s:%d: want \"<serial> <reason> <time>\"", path, line)
		}
		serial, err := ParseSerial(f[0])
		if err != nil {
			return nil, fmt.Errorf("%s:%d: %w", path, line, err)
		}
		reason, ok := crl.Reasons[f[1]]
		if !ok {
			return nil, fmt.Errorf("%s:%d: unknown reason %q", path, line, f[1])
		}
		at, err := time.Parse(time.RFC3339, f[2])
		if err != nil {
			return nil, fmt.Errorf("%s:%d: %w", path, line, err)
		}
		out = append(out, crl.Entry{Serial: serial, Reason: reason, RevokedAt: at})
	}
	return out, sc.Err()
}

// Revoke adds serials to dir/revoked.txt with reason (an RFC 5280 reason
// name) and returns how many were new. Serials already revoked keep their
// first entry.
func Revoke(dir string, serials []*big.Int, reason string, now time.Time) (int, error) {
	if _, ok := crl.Reasons[reason]; !ok {
		return 0, fmt.Errorf("unknown revocation reason %q: want one of unspecified, keyCompromise, cACompromise, affiliationChanged, superseded, cessationOfOperation, certificateHold, privilegeWithdrawn", reason)
	}
	existing, err := ReadRevoked(dir)
	if err != nil {
		return 0, err
	}
	seen := map[string]bool{}
	for _, e := range existing {
		seen[e.Serial.Text(16)] = true
	}
	var add strings.Builder
	n := 0
	for _, s := range serials {
		if seen[s.Text(16)] {
			continue
		}
		seen[s.Text(16)] = true
		fmt.Fprintf(&add, "%x %s %s\n", s, reason, now.UTC().Format(time.RFC3339))
		n++
	}
	if n == 0 {
		return 0, nil
	}
	f, err := os.OpenFile(filepath.Join(dir, RevokedFile), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return 0, err
	}
	if _, err := f.WriteString(add.String()); err != nil {
		f.Close()
		return 0, err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return 0, err
	}
	return n, f.Close()
}

// nextCRLNumber reads, increments and stores dir/crlnumber, so every CRL
// this directory's CAs sign has a larger number than the last.
func nextCRLNumber(dir string) (*big.Int, error) {
	path := filepath.Join(dir, CRLNumberFile)
	n := big.NewInt(0)
	b, err := readFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return nil, err
	default:
		if _, ok := n.SetString(strings.TrimSpace(string(b)), 10); !ok || n.Sign() < 0 {
			return nil, fmt.Errorf("%s holds %q, not a CRL number", path, strings.TrimSpace(string(b)))
		}
	}
	n.Add(n, big.NewInt(1))
	if err := keyfile.WriteFile(path, []byte(n.String()+"\n"), 0o644, true); err != nil {
		return nil, err
	}
	return n, nil
}

// WriteCRLs signs a CRL of everything in revoked.txt with the current
// issuing CA (crl.pem) and with each retired one (retired/issuing-*.crl).
// Serials are random 127-bit numbers, so listing every revoked serial in
// every CA's CRL revokes nothing by mistake.
func WriteCRLs(dir string, pass *Passphrase, lifetime time.Duration, opts Options) (*Result, error) {
	if lifetime <= 0 {
		lifetime = crl.DefaultLifetime
	}
	entries, err := ReadRevoked(dir)
	if err != nil {
		return nil, err
	}
	current, err := LoadIssuing(dir, pass)
	if err != nil {
		return nil, err
	}
	retired, err := LoadRetired(dir, pass)
	if err != nil {
		return nil, err
	}
	number, err := nextCRLNumber(dir)
	if err != nil {
		return nil, err
	}
	now := opts.now()
	res := &Result{Dir: dir, Issuing: current.Cert}
	sign := func(ca *authority.CA, name string) error {
		der, err := crl.Build(ca, entries, number, now, now.Add(lifetime))
		if err != nil {
			return err
		}
		return res.write(name, crl.EncodePEM(der), 0o644, true)
	}
	if err := sign(current, CRLFile); err != nil {
		return nil, err
	}
	for _, ca := range retired {
		if err := sign(ca, filepath.Join(RetiredDir, fmt.Sprintf("issuing-%x.crl", ca.Cert.SerialNumber))); err != nil {
			return nil, err
		}
	}
	return res, nil
}
