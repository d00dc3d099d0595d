package agent

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/smallstep/pkcs7"

	"fleetkey.dev/certs/identity"
	"fleetkey.dev/certs/keyfile"
	"fleetkey.dev/certs/trust"
)

// EST paths (RFC 7030, 3.2.2).
const (
	estPrefix   = "/.well-known/est/"
	maxESTReply = 64 << 10
)

// EnrollOptions are what a factory station gives a device.
type EnrollOptions struct {
	// Provisioning is the service's base URL (https://host:port).
	Provisioning string
	// RootCAs authenticate the provisioning service (the fleet root,
	// handed to the device out of band).
	RootCAs *x509.CertPool
	Token   string
	ID      string
	// Key is the device key; nil generates a P-256 key in memory (a TPM
	// key goes here in issue 6).
	Key     crypto.Signer
	Timeout time.Duration // default 30 s
	// TPM, when set (/dev/tpmrm0, swtpm:unix:PATH, sim...), makes the key
	// inside that TPM and enrolls through TPM attestation (/attest/v1).
	TPM string
}

// Enroll generates the device key, enrolls through EST simpleenroll,
// fetches the fleet's CA certificates, and stores key (0600), certificate,
// bundle and agent.json in the state directory. An already enrolled
// directory is refused.
func (s *State) Enroll(ctx context.Context, o EnrollOptions) (*x509.Certificate, error) {
	if err := identity.ValidateID(o.ID); err != nil {
		return nil, err
	}
	base, err := estBase(o.Provisioning)
	if err != nil {
		return nil, err
	}
	if o.Token == "" {
		return nil, errors.New("an enrollment token is required (--token)")
	}
	for _, f := range []string{KeyFile, TPMKeyFile} {
		if _, err := os.Stat(s.path(f)); err == nil {
			return nil, fmt.Errorf("%s already holds an enrolled device; use a fresh directory", s.Dir)
		}
	}
	if err := os.MkdirAll(s.Dir, 0o700); err != nil {
		return nil, err
	}
	if o.TPM != "" {
		client := estClient(o.RootCAs, nil, o.Timeout)
		bundle, err := fetchCACerts(ctx, client, base)
		if err != nil {
			return nil, err
		}
		leaf, err := s.enrollTPM(ctx, o, client, strings.TrimSuffix(o.Provisioning, "/"), bundle)
		if err != nil {
			return nil, err
		}
		if err := os.WriteFile(s.path(BundleFile), bundle.PEM(), 0o644); err != nil {
			return nil, err
		}
		return leaf, s.WriteMeta(Meta{ID: o.ID, Provisioning: strings.TrimSuffix(o.Provisioning, "/")})
	}
	key := o.Key
	if key == nil {
		if key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
			return nil, err
		}
	}
	client := estClient(o.RootCAs, nil, o.Timeout)
	bundle, err := fetchCACerts(ctx, client, base)
	if err != nil {
		return nil, err
	}
	leaf, err := requestCert(ctx, client, base+"simpleenroll", key, o.ID, "Bearer "+o.Token)
	if err != nil {
		return nil, err
	}
	if _, err := bundle.Verify([]*x509.Certificate{leaf}, trust.VerifyOptions{Roles: []identity.Role{identity.RoleDevice}}); err != nil {
		return nil, fmt.Errorf("the provisioning service returned a certificate this fleet does not trust: %w", err)
	}
	if err := os.WriteFile(s.path(BundleFile), bundle.PEM(), 0o644); err != nil {
		return nil, err
	}
	if err := s.storeCredentials(key, leaf, false); err != nil {
		return nil, err
	}
	if err := s.WriteMeta(Meta{ID: o.ID, Provisioning: strings.TrimSuffix(o.Provisioning, "/")}); err != nil {
		return nil, err
	}
	return leaf, nil
}

// Renew re-enrolls through EST simplereenroll, authenticated by the
// current certificate (cur) over mTLS. A software key is replaced by a new
// one, and the new pair replaces the old only once it is complete on disk;
// a TPM key stays (the service renews a TPM-bound device only for its
// attested key), and only the certificate is replaced.
func (s *State) Renew(ctx context.Context, cur *Credentials, timeout time.Duration) (*Credentials, error) {
	meta, err := s.ReadMeta()
	if err != nil {
		return nil, err
	}
	base, err := estBase(meta.Provisioning)
	if err != nil {
		return nil, err
	}
	if cur.TPM {
		mtls := cur.TLS()
		leaf, err := requestCert(ctx, estClient(cur.Bundle.RootPool(), &mtls, timeout), base+"simplereenroll", cur.Signer, meta.ID, "")
		if err != nil {
			return nil, err
		}
		if _, err := cur.Bundle.Verify([]*x509.Certificate{leaf}, trust.VerifyOptions{Roles: []identity.Role{identity.RoleDevice}, RequireTPM: true}); err != nil {
			return nil, fmt.Errorf("renewed certificate not trusted as TPM-bound: %w", err)
		}
		if err := keyfile.WriteFile(s.path(CertFile), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leaf.Raw}), 0o644, true); err != nil {
			return nil, err
		}
		return &Credentials{Signer: cur.Signer, Leaf: leaf, Bundle: cur.Bundle, TPM: true, closer: cur.closer}, nil
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	mtls := cur.TLS()
	client := estClient(cur.Bundle.RootPool(), &mtls, timeout)
	leaf, err := requestCert(ctx, client, base+"simplereenroll", key, meta.ID, "")
	if err != nil {
		return nil, err
	}
	if _, err := cur.Bundle.Verify([]*x509.Certificate{leaf}, trust.VerifyOptions{Roles: []identity.Role{identity.RoleDevice}}); err != nil {
		return nil, fmt.Errorf("renewed certificate not trusted: %w", err)
	}
	if err := s.storeCredentials(key, leaf, true); err != nil {
		return nil, err
	}
	return &Credentials{Signer: key, Leaf: leaf, Bundle: cur.Bundle}, nil
}

func estBase(provisioning string) (string, error) {
	u, err := url.Parse(provisioning)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return "", fmt.Errorf("provisioning URL %q: want https://host:port", provisioning)
	}
	return strings.TrimSuffix(provisioning, "/") + estPrefix, nil
}

func estClient(roots *x509.CertPool, cert *tls.Certificate, timeout time.Duration) *http.Client {
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: roots}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	return &http.Client{Timeout: timeout, Transport: &http.Transport{TLSClientConfig: cfg, TLSHandshakeTimeout: 10 * time.Second}}
}

// fetchCACerts reads /cacerts: the issuing CAs and the roots.
func fetchCACerts(ctx context.Context, c *http.Client, base string) (*trust.Bundle, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"cacerts", nil)
	if err != nil {
		return nil, err
	}
	certs, err := doEST(c, req)
	if err != nil {
		return nil, fmt.Errorf("EST cacerts: %w", err)
	}
	var roots, issuing []*x509.Certificate
	for _, cert := range certs {
		if bytes.Equal(cert.RawSubject, cert.RawIssuer) && cert.CheckSignatureFrom(cert) == nil {
			roots = append(roots, cert)
		} else {
			issuing = append(issuing, cert)
		}
	}
	b, err := trust.NewBundle(roots, issuing)
	if err != nil {
		return nil, fmt.Errorf("EST cacerts: %w", err)
	}
	return b, nil
}

// requestCert sends a CSR for id and returns the certificate issued.
func requestCert(ctx context.Context, c *http.Client, endpoint string, key crypto.Signer, id, auth string) (*x509.Certificate, error) {
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: id}}, key)
	if err != nil {
		return nil, err
	}
	body := base64.StdEncoding.EncodeToString(der)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, strings.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/pkcs10")
	req.Header.Set("Content-Transfer-Encoding", "base64")
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	certs, err := doEST(c, req)
	if err != nil {
		return nil, fmt.Errorf("EST %s: %w", endpoint[strings.LastIndexByte(endpoint, '/')+1:], err)
	}
	for _, c := range certs {
		if samePublicKey(c.PublicKey, key.Public()) {
			return c, nil
		}
	}
	return nil, errors.New("no certificate returned is for this device's key")
}

// doEST performs an EST request and decodes the base64 PKCS#7 certs-only
// reply. A refusal is returned with the service's own message.
func doEST(c *http.Client, req *http.Request) ([]*x509.Certificate, error) {
	resp, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxESTReply+1))
	if err != nil {
		return nil, err
	}
	if len(body) > maxESTReply {
		return nil, fmt.Errorf("reply larger than %d bytes", maxESTReply)
	}
	if resp.StatusCode != http.StatusOK {
		msg := strings.TrimSpace(string(body))
		if len(msg) > 300 {
			msg = msg[:300]
		}
		if ra := resp.Header.Get("Retry-After"); ra != "" {
			msg += " (retry after " + ra + " s)"
		}
		return nil, fmt.Errorf("refused with %s: %s", resp.Status, msg)
	}
	der, err := base64.StdEncoding.DecodeString(strings.Map(func(r rune) rune {
		if r == '\r' || r == '\n' || r == ' ' || r == '\t' {
			return -1
		}
		return r
	}, string(body)))
	if err != nil {
		return nil, fmt.Errorf("reply is not base64: %w", err)
	}
	p7, err := pkcs7.Parse(der)
	if err != nil {
		return nil, fmt.Errorf("reply is not PKCS#7: %w", err)
	}
	if len(p7.Certificates) == 0 {
		return nil, errors.New("reply holds no certificate")
	}
	return p7.Certificates, nil
}
