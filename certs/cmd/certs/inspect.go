package main

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"fleetkey.dev/certs/authority"
	"fleetkey.dev/certs/identity"
	"fleetkey.dev/certs/trust"
)

func cmdInspect(args []string, out io.Writer) error {
	f := newFlags("inspect", `Usage: certs inspect [--bundle FILE] FILE...

Prints, for each certificate in each PEM file: identity, role, validity and
time left, key type, issuer, SHA-256 fingerprint, TPM binding, and whether
it verifies against the trust bundle (--bundle, else bundle.pem beside the
file). Exits 1 if a leaf does not verify.

Example:
  certs inspect ./pki/gateway.crt ./pki/admin.crt`, out)
	bundlePath := f.String("bundle", "", "trust bundle to verify against (default: bundle.pem beside each file)")
	if err := f.parse(args); err != nil {
		return err
	}
	if f.NArg() == 0 {
		return usageErr("name at least one certificate file\nhint: certs inspect ./pki/gateway.crt")
	}
	now := time.Now()
	failed := false
	for i, file := range f.Args() {
		if i > 0 {
			fmt.Fprintln(out)
		}
		data, err := os.ReadFile(file)
		if err != nil {
			return err
		}
		certs, err := trust.ParseCertificatesPEM(data)
		if err != nil {
			return fmt.Errorf("%s: %w", file, err)
		}
		bp := *bundlePath
		if bp == "" {
			bp = filepath.Join(filepath.Dir(file), "bundle.pem")
		}
		bundle, bundleErr := loadBundle(bp)
		// A leaf file holds the leaf and then its chain: describe the leaf
		// and name the rest. Any other file (a bundle) is described whole.
		if !certs[0].IsCA {
			fmt.Fprintf(out, "%s\n", file)
			if !describe(out, certs[0], certs[1:], bundle, bp, bundleErr, now) {
				failed = true
			}
			for _, c := range certs[1:] {
				fmt.Fprintf(out, "  %-13s %q (serial %x, until %s)\n", "chain:", c.Subject.CommonName, c.SerialNumber, c.NotAfter.UTC().Format("2006-01-02"))
			}
			continue
		}
		for j, c := range certs {
			if j > 0 {
				fmt.Fprintln(out)
			}
			fmt.Fprintf(out, "%s [%d/%d]\n", file, j+1, len(certs))
			if !describe(out, c, nil, bundle, bp, bundleErr, now) {
				failed = true
			}
		}
	}
	if failed {
		return errFailedCheck
	}
	return nil
}

func loadBundle(path string) (*trust.Bundle, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return trust.ParseBundle(data)
}

// describe prints one certificate and reports whether it verified (CA
// certificates are checked for their signature chain only).
func describe(out io.Writer, c *x509.Certificate, rest []*x509.Certificate, bundle *trust.Bundle, bundlePath string, bundleErr error, now time.Time) bool {
	row := func(k, format string, args ...any) {
		fmt.Fprintf(out, "  %-13s %s\n", k+":", fmt.Sprintf(format, args...))
	}
	switch {
	case c.IsCA && string(c.RawIssuer) == string(c.RawSubject):
		row("identity", "root CA %q", c.Subject.CommonName)
	case c.IsCA:
		row("identity", "issuing CA %q", c.Subject.CommonName)
		if len(c.PermittedURIDomains) > 0 {
			row("trust domain", "%s", strings.Join(c.PermittedURIDomains, ", "))
		}
	default:
		id, err := trust.Identity([]*x509.Certificate{c})
		if err != nil {
			row("identity", "none: %v", err)
		} else {
			row("identity", "%s", id)
			row("role", "%s", id.Role)
			row("name", "%s", id.Name)
		}
		if len(c.DNSNames) > 0 || len(c.IPAddresses) > 0 {
			var sans []string
			for _, n := range c.DNSNames {
				sans = append(sans, "DNS:"+n)
			}
			for _, ip := range c.IPAddresses {
				sans = append(sans, "IP:"+ip.String())
			}
			row("host names", "%s", strings.Join(sans, " "))
		}
		if len(c.ExtKeyUsage) > 0 {
			row("usage", "%s", extKeyUsages(c.ExtKeyUsage))
		}
	}
	row("validity", "%s to %s (%s)", c.NotBefore.UTC().Format(time.RFC3339), c.NotAfter.UTC().Format(time.RFC3339), timeLeft(c, now))
	row("key", "%s", keyDescription(c))
	row("issuer", "%s", c.Issuer.CommonName)
	row("serial", "%x", c.SerialNumber)
	sum := sha256.Sum256(c.Raw)
	row("sha256", "%s", colonHex(sum[:]))
	if !c.IsCA {
		switch ek, bound, err := authority.TPMBinding(c); {
		case err != nil:
			row("TPM-bound", "malformed binding: %v", err)
		case bound:
			row("TPM-bound", "yes, EK SHA-256 %s", hex.EncodeToString(ek))
		default:
			row("TPM-bound", "no")
		}
	}
	if bundleErr != nil {
		row("verifies", "not checked: no usable trust bundle at %s (%v); pass --bundle", bundlePath, bundleErr)
		return true
	}
	if c.IsCA {
		return verifyCA(row, c, bundle, bundlePath, now)
	}
	usage := x509.ExtKeyUsageClientAuth
	if id, err := trust.Identity([]*x509.Certificate{c}); err == nil && id.Role == identity.RoleGateway {
		usage = x509.ExtKeyUsageServerAuth
	}
	peer, err := bundle.Verify(append([]*x509.Certificate{c}, rest...), trust.VerifyOptions{Now: now, Usage: usage})
	if err != nil {
		row("verifies", "NO against %s: %v", bundlePath, err)
		return false
	}
	var path []string
	for _, p := range peer.Chain {
		path = append(path, fmt.Sprintf("%q", p.Subject.CommonName))
	}
	row("verifies", "yes against %s: %s", bundlePath, strings.Join(path, " -> "))
	return true
}

func verifyCA(row func(string, string, ...any), c *x509.Certificate, bundle *trust.Bundle, bundlePath string, now time.Time) bool {
	for _, t := range append(bundle.Roots(), bundle.Issuing()...) {
		if t.Equal(c) {
			state := "in the bundle"
			if now.After(c.NotAfter) {
				state = "in the bundle but EXPIRED"
			}
			row("verifies", "%s (%s)", state, bundlePath)
			return !now.After(c.NotAfter)
		}
	}
	row("verifies", "NO: not in the trust bundle %s", bundlePath)
	return false
}

func timeLeft(c *x509.Certificate, now time.Time) string {
	switch {
	case now.Before(c.NotBefore):
		return "NOT YET VALID"
	case now.After(c.NotAfter):
		return "EXPIRED " + humanDuration(now.Sub(c.NotAfter)) + " ago"
	}
	return humanDuration(c.NotAfter.Sub(now)) + " left"
}

func humanDuration(d time.Duration) string {
	days := int(d / (24 * time.Hour))
	hours := int(d % (24 * time.Hour) / time.Hour)
	if days > 0 {
		return fmt.Sprintf("%dd %dh", days, hours)
	}
	return fmt.Sprintf("%dh %dm", hours, int(d%time.Hour/time.Minute))
}

func keyDescription(c *x509.Certificate) string {
	switch k := c.PublicKey.(type) {
	case *ecdsa.PublicKey:
		return "ECDSA " + k.Curve.Params().Name
	case ed25519.PublicKey:
		return "Ed25519"
	case *rsa.PublicKey:
		return fmt.Sprintf("RSA %d", k.N.BitLen())
	}
	return fmt.Sprintf("%T", c.PublicKey)
}

func extKeyUsages(us []x509.ExtKeyUsage) string {
	names := map[x509.ExtKeyUsage]string{x509.ExtKeyUsageClientAuth: "clientAuth", x509.ExtKeyUsageServerAuth: "serverAuth"}
	var s []string
	for _, u := range us {
		if n, ok := names[u]; ok {
			s = append(s, n)
		} else {
			s = append(s, fmt.Sprintf("eku(%d)", u))
		}
	}
	return strings.Join(s, ", ")
}

func colonHex(b []byte) string {
	h := strings.ToUpper(hex.EncodeToString(b))
	var parts []string
	for i := 0; i < len(h); i += 2 {
		parts = append(parts, h[i:i+2])
	}
	return strings.Join(parts, ":")
}
