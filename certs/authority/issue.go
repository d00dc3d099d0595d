package authority

import (
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"net"
	"net/url"
	"strings"
	"time"

	"fleetkey.dev/certs/identity"
)

// Issuer signs leaf certificates with an issuing CA under a Policy. It is
// safe for concurrent use if the CA's signer is.
type Issuer struct {
	CA     *CA
	Policy Policy
	// Now is the clock; default time.Now.
	Now func() time.Time
	// Rand is the source of serial numbers; default crypto/rand.Reader.
	Rand io.Reader
}

// NewIssuer validates the policy and returns an Issuer.
func NewIssuer(ca *CA, policy Policy) (*Issuer, error) {
	if ca == nil {
		return nil, fmt.Errorf("issuer needs a CA")
	}
	if err := policy.Validate(); err != nil {
		return nil, err
	}
	return &Issuer{CA: ca, Policy: policy}, nil
}

func (is *Issuer) now() time.Time {
	if is.Now != nil {
		return is.Now()
	}
	return time.Now()
}

func (is *Issuer) rand() io.Reader {
	if is.Rand != nil {
		return is.Rand
	}
	return rand.Reader
}

// IssueCSR checks a DER CSR for role (see Policy.CheckCSR) and issues it.
func (is *Issuer) IssueCSR(der []byte, role identity.Role, name string) (*x509.Certificate, error) {
	req, err := is.Policy.CheckCSR(der, role, name)
	if err != nil {
		return nil, err
	}
	return is.Issue(req)
}

// Issue signs a leaf for a checked request. The leaf is built from the
// role's profile alone: one SPIFFE URI SAN, CN = name, KU digitalSignature,
// the profile's EKUs, CA:false, and a lifetime from the policy that never
// outlives the issuing CA.
func (is *Issuer) Issue(req *Request) (*x509.Certificate, error) {
	profile, ok := Profiles[req.Role]
	if !ok {
		return nil, fmt.Errorf("no certificate profile for role %q", req.Role)
	}
	id, err := identity.New(is.Policy.TrustDomain, req.Role, req.Name)
	if err != nil {
		return nil, err
	}
	if err := is.Policy.checkKey(req.PublicKey); err != nil {
		return nil, err
	}
	if !profile.HostNames && (len(req.DNSNames) > 0 || len(req.IPAddresses) > 0) {
		return nil, refuse(ReasonBadHostNames, "%s %s certificate carries no DNS or IP names", article(string(req.Role)), req.Role)
	}
	ips, err := parseIPs(req.IPAddresses)
	if err != nil {
		return nil, err
	}
	for _, n := range req.DNSNames {
		if err := validateDNSName(n); err != nil {
			return nil, err
		}
	}
	now := is.now()
	caCert := is.CA.Cert
	if !now.Before(caCert.NotAfter) {
		return nil, refuse(ReasonCAExpired, "the issuing CA expired at %s; rotate it", caCert.NotAfter.UTC().Format(time.RFC3339))
	}
	notAfter := now.Add(is.Policy.ValidityFor(req.Role))
	if notAfter.After(caCert.NotAfter) {
		notAfter = caCert.NotAfter
	}
	serial, err := NewSerial(is.rand())
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: req.Name},
		NotBefore:             now.Add(-Backdate),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           profile.ExtKeyUsage,
		BasicConstraintsValid: true,
		IsCA:                  false,
		URIs:                  []*url.URL{id.URL()},
		DNSNames:              req.DNSNames,
		IPAddresses:           ips,
	}
	if req.TPMEKHash != nil {
		ext, err := tpmBindingExtension(req.TPMEKHash)
		if err != nil {
			return nil, err
		}
		tmpl.ExtraExtensions = append(tmpl.ExtraExtensions, ext)
	}
	der, err := x509.CreateCertificate(is.rand(), tmpl, caCert, req.PublicKey, is.CA.Signer)
	if err != nil {
		return nil, fmt.Errorf("signing certificate for %q: %w", id.String(), err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parsing new certificate for %q: %w", id.String(), err)
	}
	return cert, nil
}

func parseIPs(in []string) ([]net.IP, error) {
	var out []net.IP
	for _, s := range in {
		ip := net.ParseIP(strings.TrimSpace(s))
		if ip == nil {
			return nil, refuse(ReasonBadHostNames, "%q is not an IP address", s)
		}
		out = append(out, ip)
	}
	return out, nil
}

// validateDNSName accepts host names of letters, digits, '-' and '.', in
// labels of 1 to 63 bytes (RFC 1123), 253 bytes at most, with one leading
// "*." wildcard label allowed.
func validateDNSName(name string) error {
	n := strings.TrimPrefix(name, "*.")
	if n == "" || len(n) > 253 {
		return refuse(ReasonBadHostNames, "DNS name %q must be 1 to 253 bytes", name)
	}
	for _, label := range strings.Split(n, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return refuse(ReasonBadHostNames, "DNS name %q has an empty, over-long or hyphen-edged label", name)
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c == '-' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) {
				return refuse(ReasonBadHostNames, "DNS name %q contains %q", name, string(c))
			}
		}
	}
	return nil
}

func article(word string) string {
	if strings.ContainsRune("aeiou", rune(word[0])) {
		return "an"
	}
	return "a"
}
