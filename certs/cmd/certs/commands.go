package main

import (
	"fmt"
	"io"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"time"

	"fleetkey.dev/certs/authority"
	"fleetkey.dev/certs/identity"
	"fleetkey.dev/certs/keyfile"
	"fleetkey.dev/certs/pkidir"
)

func cmdInit(args []string, out io.Writer) error {
	f := newFlags("init", `Usage: certs init --dir DIR --trust-domain TD [--gateway-dns NAMES] [--gateway-ip IPS]

Creates a fleet PKI in DIR: root CA (P-384), issuing CA (P-256), bundle.pem,
and gateway, admin and service certificates with their keys.

Example:
  FLEETKEY_CA_PASSPHRASE='correct horse battery' certs init --dir ./pki --trust-domain fleet.example --gateway-dns gw.fleet.example --gateway-ip 10.0.0.5`, out)
	dir := f.String("dir", "", "directory to create the PKI in (required)")
	td := f.String("trust-domain", "", "SPIFFE trust domain of the fleet, e.g. fleet.example (required)")
	var dns, ips listFlag
	f.Var(&dns, "gateway-dns", "DNS names of the gateway, comma-separated (default localhost, with IPs 127.0.0.1 and ::1)")
	f.Var(&ips, "gateway-ip", "IP addresses of the gateway, comma-separated")
	gwName := f.String("gateway-name", "gateway", "name in the gateway's SPIFFE ID")
	adminName := f.String("admin-name", "admin", "name in the admin's SPIFFE ID")
	serviceName := f.String("service-name", "service", "name in the service's SPIFFE ID")
	passFile := f.String("passphrase-file", "", "file holding the passphrase for the CA keys")
	iterations := f.Int("kdf-iterations", keyfile.DefaultIterations, "PBKDF2 iterations protecting the CA keys (at least 10000)")
	force := f.Bool("force", false, "overwrite an existing PKI in DIR")
	if err := f.parse(args); err != nil {
		return err
	}
	if *dir == "" || *td == "" {
		return usageErr("--dir and --trust-domain are required\nhint: certs init --dir ./pki --trust-domain fleet.example")
	}
	if err := checkIterations(*iterations); err != nil {
		return err
	}
	pass, err := pkidir.ResolvePassphrase("", *passFile)
	if err != nil && err != pkidir.ErrNoPassphrase {
		return err
	}
	res, err := pkidir.Init(*dir, pkidir.InitOptions{
		TrustDomain: *td, GatewayName: *gwName, AdminName: *adminName, ServiceName: *serviceName,
		GatewayDNS: dns, GatewayIPs: ips, Passphrase: pass, Options: pkidir.Options{Force: *force, KDFIterations: *iterations},
	})
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "created a fleet PKI for trust domain %q in %s\n", *td, res.Dir)
	fmt.Fprintf(out, "  root CA     %s (until %s)\n", res.Root.Subject.CommonName, res.Root.NotAfter.UTC().Format("2006-01-02"))
	fmt.Fprintf(out, "  issuing CA  %s (until %s)\n", res.Issuing.Subject.CommonName, res.Issuing.NotAfter.UTC().Format("2006-01-02"))
	for _, l := range res.Leaves {
		fmt.Fprintf(out, "  leaf        %s (until %s)\n", l.URIs[0], l.NotAfter.UTC().Format("2006-01-02"))
	}
	fmt.Fprintf(out, "files: %s\n", strings.Join(res.Files, " "))
	if res.PassphraseFile != "" {
		fmt.Fprintf(out, "warning: no passphrase was given, so one was generated into %s.\n", res.PassphraseFile)
		fmt.Fprintf(out, "         Fine for development; for production keep it off this machine and use --passphrase-file.\n")
	}
	return nil
}

func cmdIssue(args []string, out io.Writer) error {
	f := newFlags("issue", `Usage: certs issue --dir DIR --role gateway|service|admin --name N [--dns NAMES] [--ip IPS] [--csr FILE] [--out PREFIX]

Issues a gateway, service or admin certificate from the issuing CA in DIR.
Without --csr a P-256 key is generated and written beside the certificate;
with --csr the key stays where the CSR was made. Device certificates come
from the provisioning service, not from here.

Example:
  certs issue --dir ./pki --role gateway --name gw2 --dns gw2.fleet.example`, out)
	dir := f.String("dir", "", "PKI directory (required)")
	role := f.String("role", "", "gateway, service or admin (required)")
	name := f.String("name", "", "name in the SPIFFE ID (required)")
	var dns, ips listFlag
	f.Var(&dns, "dns", "DNS names (gateway and service only), comma-separated")
	f.Var(&ips, "ip", "IP addresses (gateway and service only), comma-separated")
	csrFile := f.String("csr", "", "PKCS#10 request (PEM or DER) to take the public key from")
	outPrefix := f.String("out", "", "path prefix of the written files (default DIR/ROLE-NAME)")
	validity := f.String("validity", "", "certificate lifetime, e.g. 30d or 720h (default: the role's policy)")
	passFile := f.String("passphrase-file", "", "file holding the CA passphrase")
	force := f.Bool("force", false, "overwrite existing files")
	if err := f.parse(args); err != nil {
		return err
	}
	if *dir == "" || *role == "" || *name == "" {
		return usageErr("--dir, --role and --name are required\nhint: certs issue --dir ./pki --role service --name ingest")
	}
	r, err := identity.ParseRole(*role)
	if err != nil {
		return usageErr("--role: %v", err)
	}
	if r == identity.RoleDevice {
		return usageErr("--role device: device certificates are issued by the provisioning service from the device's own CSR")
	}
	bundle, err := pkidir.LoadBundle(*dir)
	if err != nil {
		return err
	}
	policy := authority.Policy{TrustDomain: bundle.TrustDomain()}
	if *validity != "" {
		d, err := parseDuration(*validity)
		if err != nil {
			return usageErr("--validity: %v", err)
		}
		policy.Validity = map[identity.Role]time.Duration{r: d}
	}
	if err := policy.Validate(); err != nil {
		return err
	}
	req := &authority.Request{Role: r, Name: *name, DNSNames: dns, IPAddresses: ips}
	if *csrFile != "" {
		raw, err := os.ReadFile(*csrFile)
		if err != nil {
			return err
		}
		der, err := authority.DecodeCSR(raw)
		if err != nil {
			return err
		}
		checked, err := policy.CheckCSR(der, r, *name)
		if err != nil {
			return err
		}
		req.PublicKey = checked.PublicKey
	}
	pass, err := pkidir.ResolvePassphrase(*dir, *passFile)
	if err != nil {
		return err
	}
	ca, err := pkidir.LoadIssuing(*dir, pass)
	if err != nil {
		return err
	}
	prefix := *outPrefix
	if prefix == "" {
		prefix = filepath.Join(*dir, string(r)+"-"+*name)
	}
	cert, paths, err := pkidir.IssueLeaf(&authority.Issuer{CA: ca, Policy: policy}, *req, prefix, *force)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "issued %s (serial %x, until %s)\nfiles: %s\n", cert.URIs[0], cert.SerialNumber,
		cert.NotAfter.UTC().Format("2006-01-02T15:04:05Z"), strings.Join(paths, " "))
	return nil
}

func cmdCRL(args []string, out io.Writer) error {
	f := newFlags("crl", `Usage: certs crl --dir DIR [--revoke SERIAL,...] [--reason R] [--lifetime 7d]

Adds serials to DIR/revoked.txt (if --revoke is given) and signs fresh CRLs:
DIR/crl.pem with the current issuing CA, and one per retired issuing CA.
Serials are hex, as 'certs inspect' and 'openssl x509 -serial' print them.

Example:
  certs crl --dir ./pki --revoke 4f1a...c2 --reason keyCompromise
  openssl crl -in ./pki/crl.pem -CAfile ./pki/issuing.crt -noout`, out)
	dir := f.String("dir", "", "PKI directory (required)")
	var revoke listFlag
	f.Var(&revoke, "revoke", "serial numbers to revoke (hex), comma-separated")
	reason := f.String("reason", "unspecified", "RFC 5280 reason: unspecified, keyCompromise, superseded, cessationOfOperation, ...")
	lifetime := f.String("lifetime", "7d", "how long the CRL is valid (its nextUpdate)")
	passFile := f.String("passphrase-file", "", "file holding the CA passphrase")
	if err := f.parse(args); err != nil {
		return err
	}
	if *dir == "" {
		return usageErr("--dir is required\nhint: certs crl --dir ./pki")
	}
	life, err := parseDuration(*lifetime)
	if err != nil {
		return usageErr("--lifetime: %v", err)
	}
	var serials []*big.Int
	for _, s := range revoke {
		n, err := pkidir.ParseSerial(s)
		if err != nil {
			return usageErr("--revoke: %v", err)
		}
		serials = append(serials, n)
	}
	pass, err := pkidir.ResolvePassphrase(*dir, *passFile)
	if err != nil {
		return err
	}
	if len(serials) > 0 {
		n, err := pkidir.Revoke(*dir, serials, *reason, time.Now())
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "revoked %d new serial(s)\n", n)
	}
	res, err := pkidir.WriteCRLs(*dir, pass, life, pkidir.Options{})
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "signed CRLs: %s\n", strings.Join(res.Files, " "))
	return nil
}

func cmdRotate(args []string, out io.Writer) error {
	f := newFlags("rotate-issuing", `Usage: certs rotate-issuing --dir DIR

Rolls the issuing CA over: a new issuing CA signs from now on, the old one
moves to DIR/retired/ and stays in bundle.pem until it expires, so every
certificate it issued keeps working. Needs the root key.

Example:
  certs rotate-issuing --dir ./pki`, out)
	dir := f.String("dir", "", "PKI directory (required)")
	passFile := f.String("passphrase-file", "", "file holding the CA passphrase")
	iterations := f.Int("kdf-iterations", keyfile.DefaultIterations, "PBKDF2 iterations protecting the new issuing CA key (at least 10000)")
	if err := f.parse(args); err != nil {
		return err
	}
	if *dir == "" {
		return usageErr("--dir is required\nhint: certs rotate-issuing --dir ./pki")
	}
	if err := checkIterations(*iterations); err != nil {
		return err
	}
	pass, err := pkidir.ResolvePassphrase(*dir, *passFile)
	if err != nil {
		return err
	}
	res, err := pkidir.Rotate(*dir, pass, pkidir.Options{KDFIterations: *iterations})
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "new issuing CA %s (until %s)\nfiles: %s\ndistribute the new %s to gateways and devices\n",
		res.Issuing.Subject.CommonName, res.Issuing.NotAfter.UTC().Format("2006-01-02"), strings.Join(res.Files, " "), pkidir.BundleFile)
	return nil
}

// minIterations is the least PBKDF2 work the CLI accepts for a CA key.
const minIterations = 10_000

func checkIterations(n int) error {
	if n < minIterations {
		return usageErr("--kdf-iterations %d is below the minimum %d", n, minIterations)
	}
	return nil
}
