// Package pkidir is the on-disk layout of a fleet PKI, as `certs init`
// writes it and the provisioning service and the gateway read it:
//
//	root.crt, root.key          root CA (P-384); key encrypted (PKCS#8 PBES2)
//	issuing.crt, issuing.key    current issuing CA (P-256); key encrypted
//	retired/issuing-<serial>.*  earlier issuing CAs, trusted until they expire
//	bundle.pem                  the trust bundle: root + every live issuing CA
//	gateway.*, admin.*, service.*  leaves; .crt holds leaf then issuing CA
//	revoked.txt, crlnumber, crl.pem  offline revocation state and CRLs
//
// Key files are written with mode 0600, the directory with 0700, and no
// existing file is overwritten unless the caller forces it. CA keys are
// encrypted with a passphrase from FLEETKEY_CA_PASSPHRASE, a file, or, for
// a development PKI that was given none, ca.pass beside the keys.
package pkidir

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"fleetkey.dev/certs/authority"
	"fleetkey.dev/certs/identity"
	"fleetkey.dev/certs/keyfile"
	"fleetkey.dev/certs/trust"
)

// File names inside a PKI directory.
const (
	RootCert       = "root.crt"
	RootKey        = "root.key"
	IssuingCert    = "issuing.crt"
	IssuingKey     = "issuing.key"
	BundleFile     = "bundle.pem"
	RetiredDir     = "retired"
	PassphraseFile = "ca.pass"
	RevokedFile    = "revoked.txt"
	CRLNumberFile  = "crlnumber"
	CRLFile        = "crl.pem"
)

// Environment variables that carry the CA passphrase.
const (
	EnvPassphrase     = "FLEETKEY_CA_PASSPHRASE"
	EnvPassphraseFile = "FLEETKEY_CA_PASSPHRASE_FILE"
)

// MinPassphraseLength is the shortest passphrase accepted for new CA keys.
const MinPassphraseLength = 8

// maxFileBytes bounds every file this package reads.
const maxFileBytes = 1 << 20

// ErrNoPassphrase means no passphrase source was found.
var ErrNoPassphrase = errors.New("no CA passphrase: set " + EnvPassphrase + ", or " + EnvPassphraseFile + " or --passphrase-file to a file holding it")

// Options are shared by the operations that create keys and certificates.
// The zero value gives the defaults.
type Options struct {
	// Now is the clock; default time.Now.
	Now func() time.Time
	// Rand is the source of serials and passphrases; default crypto/rand.
	Rand io.Reader
	// Force allows existing files to be overwritten.
	Force bool
	// KDFIterations for the encrypted CA keys; 0 means keyfile's default.
	KDFIterations int
}

func (o *Options) now() time.Time {
	if o.Now != nil {
		return o.Now()
	}
	return time.Now()
}

func (o *Options) rand() io.Reader {
	if o.Rand != nil {
		return o.Rand
	}
	return rand.Reader
}

// Passphrase is a CA passphrase and where it came from (for messages; never
// the passphrase itself).
type Passphrase struct {
	Secret []byte
	Source string
}

// ResolvePassphrase finds the CA passphrase: the file named by flagFile,
// then $FLEETKEY_CA_PASSPHRASE, then the file named by
// $FLEETKEY_CA_PASSPHRASE_FILE, then ca.pass in dir. It returns
// ErrNoPassphrase when there is none.
func ResolvePassphrase(dir, flagFile string) (*Passphrase, error) {
	if flagFile != "" {
		return readPassphrase(flagFile, "--passphrase-file "+flagFile)
	}
	if s := os.Getenv(EnvPassphrase); s != "" {
		return &Passphrase{Secret: []byte(s), Source: "$" + EnvPassphrase}, nil
	}
	if f := os.Getenv(EnvPassphraseFile); f != "" {
		return readPassphrase(f, "$"+EnvPassphraseFile)
	}
	p := filepath.Join(dir, PassphraseFile)
	if _, err := os.Stat(p); err == nil {
		return readPassphrase(p, p)
	}
	return nil, ErrNoPassphrase
}

func readPassphrase(path, source string) (*Passphrase, error) {
	b, err := readFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading passphrase (%s): %w", source, err)
	}
	b = []byte(strings.TrimRight(string(b), "\r\n"))
	if len(b) == 0 {
		return nil, fmt.Errorf("passphrase file %q is empty", path)
	}
	return &Passphrase{Secret: b, Source: source}, nil
}

func readFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxFileBytes+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxFileBytes {
		return nil, fmt.Errorf("%q is larger than %d bytes", path, maxFileBytes)
	}
	return b, nil
}

// InitOptions configures Init.
type InitOptions struct {
	Options
	// TrustDomain of the fleet, e.g. "fleet.example". Required.
	TrustDomain string
	// Gateway, admin and service leaf names; defaults "gateway", "admin",
	// "service".
	GatewayName, AdminName, ServiceName string
	// GatewayDNS and GatewayIPs are the gateway's SANs; defaults
	// "localhost" and 127.0.0.1, ::1.
	GatewayDNS, GatewayIPs []string
	// Passphrase encrypts the CA keys. If nil, Init generates one and
	// writes it to ca.pass (mode 0600), for a development PKI.
	Passphrase *Passphrase
}

// Result says what an operation made, for the CLI to print.
type Result struct {
	Dir   string
	Files []string // written, relative to Dir
	// Generated passphrase file, when Init made one.
	PassphraseFile string
	Root           *x509.Certificate
	Issuing        *x509.Certificate
	Leaves         []*x509.Certificate
}

// Init creates a new PKI in dir: root and issuing CA, trust bundle, and the
// gateway, admin and service leaves. It checks that no file it would write
// exists (unless Force) before it writes any.
func Init(dir string, opts InitOptions) (*Result, error) {
	if err := identity.ValidateTrustDomain(opts.TrustDomain); err != nil {
		return nil, fmt.Errorf("--trust-domain: %w", err)
	}
	names := map[string]*string{"gateway": &opts.GatewayName, "admin": &opts.AdminName, "service": &opts.ServiceName}
	for def, p := range names {
		if *p == "" {
			*p = def
		}
		if err := identity.ValidateID(*p); err != nil {
			return nil, fmt.Errorf("%s name: %w", def, err)
		}
	}
	if len(opts.GatewayDNS) == 0 && len(opts.GatewayIPs) == 0 {
		opts.GatewayDNS = []string{"localhost"}
		opts.GatewayIPs = []string{"127.0.0.1", "::1"}
	}
	files := []string{RootCert, RootKey, IssuingCert, IssuingKey, BundleFile,
		"gateway.crt", "gateway.key", "admin.crt", "admin.key", "service.crt", "service.key"}
	if opts.Passphrase == nil {
		files = append(files, PassphraseFile)
	}
	if !opts.Force {
		for _, f := range files {
			if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
				return nil, fmt.Errorf("%w: %s already holds %s (a PKI exists there); pass --force to replace it", fs.ErrExist, dir, f)
			}
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating %s: %w", dir, err)
	}
	res := &Result{Dir: dir}
	pass := opts.Passphrase
	if pass == nil {
		secret := make([]byte, 24)
		if _, err := io.ReadFull(opts.rand(), secret); err != nil {
			return nil, fmt.Errorf("generating a passphrase: %w", err)
		}
		enc := base64.RawURLEncoding.EncodeToString(secret)
		pass = &Passphrase{Secret: []byte(enc), Source: filepath.Join(dir, PassphraseFile)}
		if err := res.write(PassphraseFile, []byte(enc+"\n"), 0o600, opts.Force); err != nil {
			return nil, err
		}
		res.PassphraseFile = pass.Source
	}
	if len(pass.Secret) < MinPassphraseLength {
		return nil, fmt.Errorf("CA passphrase (%s) is shorter than %d characters", pass.Source, MinPassphraseLength)
	}
	caOpts := authority.CAOptions{TrustDomain: opts.TrustDomain, Now: opts.Now, Rand: opts.Rand}
	root, err := authority.NewRoot(caOpts)
	if err != nil {
		return nil, err
	}
	issuing, err := authority.NewIssuing(root, caOpts)
	if err != nil {
		return nil, err
	}
	res.Root, res.Issuing = root.Cert, issuing.Cert
	if err := res.writeCA(RootCert, RootKey, root, pass, opts.Options); err != nil {
		return nil, err
	}
	if err := res.writeCA(IssuingCert, IssuingKey, issuing, pass, opts.Options); err != nil {
		return nil, err
	}
	bundle, err := trust.NewBundle([]*x509.Certificate{root.Cert}, []*x509.Certificate{issuing.Cert})
	if err != nil {
		return nil, err
	}
	if err := res.write(BundleFile, bundle.PEM(), 0o644, opts.Force); err != nil {
		return nil, err
	}
	iss := &authority.Issuer{CA: issuing, Policy: authority.Policy{TrustDomain: opts.TrustDomain}, Now: opts.Now, Rand: opts.Rand}
	leaves := []struct {
		file string
		req  authority.Request
	}{
		{"gateway", authority.Request{Role: identity.RoleGateway, Name: opts.GatewayName, DNSNames: opts.GatewayDNS, IPAddresses: opts.GatewayIPs}},
		{"admin", authority.Request{Role: identity.RoleAdmin, Name: opts.AdminName}},
		{"service", authority.Request{Role: identity.RoleService, Name: opts.ServiceName}},
	}
	for _, l := range leaves {
		cert, _, err := IssueLeaf(iss, l.req, filepath.Join(dir, l.file), opts.Force)
		if err != nil {
			return nil, err
		}
		res.Files = append(res.Files, l.file+".crt", l.file+".key")
		res.Leaves = append(res.Leaves, cert)
	}
	return res, nil
}

func (r *Result) write(name string, data []byte, perm os.FileMode, force bool) error {
	if err := keyfile.WriteFile(filepath.Join(r.Dir, name), data, perm, force); err != nil {
		return fmt.Errorf("writing %s: %w", name, err)
	}
	r.Files = append(r.Files, name)
	return nil
}

func (r *Result) writeCA(certName, keyName string, ca *authority.CA, pass *Passphrase, opts Options) error {
	keyPEM, err := keyfile.EncryptPKCS8(ca.Signer, pass.Secret, &keyfile.EncryptOptions{Iterations: opts.KDFIterations, Rand: opts.Rand})
	if err != nil {
		return fmt.Errorf("encrypting %s: %w", keyName, err)
	}
	if err := r.write(keyName, keyPEM, 0o600, opts.Force); err != nil {
		return err
	}
	return r.write(certName, trust.EncodePEM(ca.Cert), 0o644, opts.Force)
}

// IssueLeaf issues a leaf for req and writes prefix.crt (the leaf, then the
// issuing CA, as TLS peers want it). When req.PublicKey is nil it generates
// a P-256 key and writes it to prefix.key (unencrypted PKCS#8, mode 0600);
// with a key from a CSR no key file is written. It returns the paths written.
func IssueLeaf(iss *authority.Issuer, req authority.Request, prefix string, force bool) (*x509.Certificate, []string, error) {
	var key crypto.Signer
	if req.PublicKey == nil {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, nil, fmt.Errorf("generating key: %w", err)
		}
		key, req.PublicKey = k, k.Public()
	}
	paths := []string{prefix + ".crt"}
	if key != nil {
		paths = append(paths, prefix+".key")
	}
	if !force {
		for _, p := range paths {
			if _, err := os.Stat(p); err == nil {
				return nil, nil, fmt.Errorf("%w: %s exists; pass --force to replace it", fs.ErrExist, p)
			}
		}
	}
	cert, err := iss.Issue(&req)
	if err != nil {
		return nil, nil, err
	}
	if key != nil {
		keyPEM, err := keyfile.MarshalPrivateKey(key)
		if err != nil {
			return nil, nil, err
		}
		if err := keyfile.WriteFile(prefix+".key", keyPEM, 0o600, force); err != nil {
			return nil, nil, fmt.Errorf("writing %s: %w", prefix+".key", err)
		}
	}
	if err := keyfile.WriteFile(prefix+".crt", trust.EncodePEM(cert, iss.CA.Cert), 0o644, force); err != nil {
		return nil, nil, fmt.Errorf("writing %s: %w", prefix+".crt", err)
	}
	return cert, paths, nil
}
