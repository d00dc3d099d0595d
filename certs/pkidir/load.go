package pkidir

import (
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"fleetkey.dev/certs/authority"
	"fleetkey.dev/certs/keyfile"
	"fleetkey.dev/certs/trust"
)

// LoadBundle reads dir/bundle.pem.
func LoadBundle(dir string) (*trust.Bundle, error) {
	b, err := readFile(filepath.Join(dir, BundleFile))
	if err != nil {
		return nil, fmt.Errorf("reading trust bundle: %w", err)
	}
	bundle, err := trust.ParseBundle(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, BundleFile), err)
	}
	return bundle, nil
}

// LoadCA reads a CA certificate and its encrypted key.
func LoadCA(certPath, keyPath string, pass *Passphrase) (*authority.CA, error) {
	certPEM, err := readFile(certPath)
	if err != nil {
		return nil, fmt.Errorf("reading CA certificate: %w", err)
	}
	certs, err := trust.ParseCertificatesPEM(certPEM)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", certPath, err)
	}
	keyPEM, err := readFile(keyPath)
	if err != nil {
		return nil, fmt.Errorf("reading CA key: %w", err)
	}
	if pass == nil {
		return nil, ErrNoPassphrase
	}
	key, err := keyfile.ParsePrivateKey(keyPEM, pass.Secret)
	if err != nil {
		return nil, fmt.Errorf("%s (passphrase from %s): %w", keyPath, pass.Source, err)
	}
	ca, err := authority.NewCA(certs[0], key)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", certPath, err)
	}
	return ca, nil
}

// LoadRoot reads the root CA with its key.
func LoadRoot(dir string, pass *Passphrase) (*authority.CA, error) {
	return LoadCA(filepath.Join(dir, RootCert), filepath.Join(dir, RootKey), pass)
}

// LoadIssuing reads the current issuing CA with its key.
func LoadIssuing(dir string, pass *Passphrase) (*authority.CA, error) {
	return LoadCA(filepath.Join(dir, IssuingCert), filepath.Join(dir, IssuingKey), pass)
}

// retiredPaths lists the retired issuing CAs as (cert, key) path pairs,
// oldest name first.
func retiredPaths(dir string) ([][2]string, error) {
	entries, err := os.ReadDir(filepath.Join(dir, RetiredDir))
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out [][2]string
	for _, e := range entries {
		name := e.Name()
		if base, ok := strings.CutSuffix(name, ".crt"); ok && strings.HasPrefix(base, "issuing-") {
			p := filepath.Join(dir, RetiredDir, base)
			out = append(out, [2]string{p + ".crt", p + ".key"})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i][0] < out[j][0] })
	return out, nil
}

// LoadRetired reads the retired issuing CAs with their keys (to sign their
// CRLs).
func LoadRetired(dir string, pass *Passphrase) ([]*authority.CA, error) {
	paths, err := retiredPaths(dir)
	if err != nil {
		return nil, err
	}
	var out []*authority.CA
	for _, p := range paths {
		ca, err := LoadCA(p[0], p[1], pass)
		if err != nil {
			return nil, err
		}
		out = append(out, ca)
	}
	return out, nil
}

// Rotate rolls the issuing CA over: it makes a new issuing CA under the
// root, keeps the old one in retired/ (so it can still sign its CRL), and
// rewrites the bundle to trust the root, the new issuing CA and every
// retired one that has not expired. Leaves of the old CA keep verifying.
func Rotate(dir string, pass *Passphrase, opts Options) (*Result, error) {
	root, err := LoadRoot(dir, pass)
	if err != nil {
		return nil, err
	}
	old, err := LoadIssuing(dir, pass)
	if err != nil {
		return nil, err
	}
	bundle, err := LoadBundle(dir)
	if err != nil {
		return nil, err
	}
	next, err := authority.NewIssuing(root, authority.CAOptions{TrustDomain: bundle.TrustDomain(), Now: opts.Now, Rand: opts.Rand})
	if err != nil {
		return nil, err
	}
	res := &Result{Dir: dir, Root: root.Cert, Issuing: next.Cert}
	if err := os.MkdirAll(filepath.Join(dir, RetiredDir), 0o700); err != nil {
		return nil, err
	}
	// Order matters for a crash: the old key is kept before the new one
	// replaces it, and the bundle is written last.
	retired := filepath.Join(RetiredDir, fmt.Sprintf("issuing-%x", old.Cert.SerialNumber))
	oldKey, err := readFile(filepath.Join(dir, IssuingKey))
	if err != nil {
		return nil, err
	}
	if err := res.write(retired+".key", oldKey, 0o600, false); err != nil {
		return nil, err
	}
	if err := res.write(retired+".crt", trust.EncodePEM(old.Cert), 0o644, false); err != nil {
		return nil, err
	}
	opts.Force = true
	if err := res.writeCA(IssuingCert, IssuingKey, next, pass, opts); err != nil {
		return nil, err
	}
	issuing := []*x509.Certificate{next.Cert}
	paths, err := retiredPaths(dir)
	if err != nil {
		return nil, err
	}
	now := opts.now()
	for _, p := range paths {
		b, err := readFile(p[0])
		if err != nil {
			return nil, err
		}
		certs, err := trust.ParseCertificatesPEM(b)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p[0], err)
		}
		if now.Before(certs[0].NotAfter) {
			issuing = append(issuing, certs[0])
		}
	}
	nb, err := trust.NewBundle(bundle.Roots(), issuing)
	if err != nil {
		return nil, err
	}
	if err := res.write(BundleFile, nb.PEM(), 0o644, true); err != nil {
		return nil, err
	}
	return res, nil
}
