package attest

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"math/big"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"fleetkey.dev/certs/tpm"
	"fleetkey.dev/certs/tpm/tpmsim"
)

var simMu sync.Mutex

// device is a simulated TPM with its EK, an AK and a device key.
type device struct {
	d        *tpm.Device
	ek       *tpm.EK
	ak, key  *tpm.KeyBlob
	ekPub    *tpm2.TPMTPublic
	akPub    *tpm2.TPMTPublic
	keyPub   *tpm2.TPMTPublic
	nonce    []byte
	attest   []byte
	sig      []byte
	ekHash   []byte
	allowAll func([]byte) (bool, error)
}

func newDevice(t *testing.T) *device {
	t.Helper()
	simMu.Lock()
	d, err := tpm.Open("sim")
	if err != nil {
		simMu.Unlock()
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close(); simMu.Unlock() })
	v := &device{d: d}
	if v.ek, err = d.EK(); err != nil {
		t.Fatal(err)
	}
	if v.ak, err = d.CreateAK(); err != nil {
		t.Fatal(err)
	}
	if v.key, _, err = d.CreateDeviceKey(); err != nil {
		t.Fatal(err)
	}
	must := func(p *tpm2.TPMTPublic, err error) *tpm2.TPMTPublic {
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	v.ekPub, v.akPub, v.keyPub = must(ParsePublic(v.ek.Public, "ek")), must(ParsePublic(v.ak.Public, "ak")), must(ParsePublic(v.key.Public, "key"))
	v.nonce = make([]byte, 32)
	rand.Read(v.nonce)
	if v.attest, v.sig, err = d.Certify(v.ak, v.key, v.nonce); err != nil {
		t.Fatal(err)
	}
	if v.ekHash, err = EKHash(v.ek.Key); err != nil {
		t.Fatal(err)
	}
	hash := v.ekHash
	v.allowAll = func(h []byte) (bool, error) { return bytes.Equal(h, hash), nil }
	return v
}

func reasonOf(err error) string {
	var e *Error
	if errors.As(err, &e) {
		return e.Reason
	}
	return ""
}

func TestAttestationAccepted(t *testing.T) {
	v := newDevice(t)
	trust := &EKTrust{Allowed: v.allowAll}
	hash, how, err := trust.Check(v.ek.Key, nil, time.Now())
	if err != nil || how != "allowlist" || !bytes.Equal(hash, v.ekHash) {
		t.Fatalf("EK: %v %s", err, how)
	}
	if err := CheckAK(v.akPub); err != nil {
		t.Fatal(err)
	}
	ch, err := MakeChallenge(rand.Reader, v.ekPub, v.akPub)
	if err != nil {
		t.Fatal(err)
	}
	got, err := v.d.ActivateCredential(v.ak, ch.IDObject, ch.EncSecret)
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.CheckActivation(got); err != nil {
		t.Fatal(err)
	}
	if err := CheckCertify(v.akPub, v.keyPub, v.attest, v.sig, v.nonce); err != nil {
		t.Fatal(err)
	}
	if _, err := CheckDeviceKey(v.keyPub); err != nil {
		t.Fatal(err)
	}
}

// TestAttestationRefusals: each refusal the issue lists, with its reason.
func TestAttestationRefusals(t *testing.T) {
	v := newDevice(t)
	check := func(name, want string, err error) {
		t.Helper()
		if got := reasonOf(err); got != want {
			t.Errorf("%s: reason %q (%v); want %q", name, got, err, want)
		}
	}
	// An EK not on the allowlist, with no trusted EK certificate.
	_, _, err := (&EKTrust{Allowed: func([]byte) (bool, error) { return false, nil }}).Check(v.ek.Key, nil, time.Now())
	check("unknown EK", "ek-untrusted", err)
	// An AK that is not restricted (the device key, presented as an AK).
	check("unrestricted AK", "ak-not-restricted", CheckAK(v.keyPub))
	// A certified key that is not fixedTPM, or was imported.
	soft := *v.keyPub
	soft.ObjectAttributes.FixedTPM = false
	_, err = CheckDeviceKey(&soft)
	check("key not fixedTPM", "key-not-fixed", err)
	imported := *v.keyPub
	imported.ObjectAttributes.SensitiveDataOrigin = false
	_, err = CheckDeviceKey(&imported)
	check("imported key", "key-imported", err)
	// The attestation does not name that key (its attributes differ, so
	// its name does).
	check("certify of another key", "certify-name", CheckCertify(v.akPub, &soft, v.attest, v.sig, v.nonce))
	// A wrong activation secret.
	ch, err := MakeChallenge(rand.Reader, v.ekPub, v.akPub)
	if err != nil {
		t.Fatal(err)
	}
	check("wrong secret", "activation-failed", ch.CheckActivation(make([]byte, 32)))
	// A credential made for another AK does not activate with this one.
	other, _ := v.d.CreateAK()
	otherPub, _ := ParsePublic(other.Public, "ak")
	ch2, _ := MakeChallenge(rand.Reader, v.ekPub, otherPub)
	if got, err := v.d.ActivateCredential(v.ak, ch2.IDObject, ch2.EncSecret); err == nil && ch2.CheckActivation(got) == nil {
		t.Error("a credential for another AK activated")
	}
	// Qualifying data from another session.
	check("nonce of another session", "certify-nonce", CheckCertify(v.akPub, v.keyPub, v.attest, v.sig, make([]byte, 32)))
	// Signed by another AK.
	check("another AK's signature", "certify-signature", CheckCertify(otherPub, v.keyPub, v.attest, v.sig, v.nonce))
	// Trailing bytes after a TPM structure.
	_, err = ParsePublic(append(bytes.Clone(v.ak.Public), 0), "ak")
	check("trailing bytes (public)", "malformed-ak", err)
	check("trailing bytes (attest)", "malformed-certify-info", CheckCertify(v.akPub, v.keyPub, append(bytes.Clone(v.attest), 0), v.sig, v.nonce))
	check("trailing bytes (signature)", "malformed-certify-signature", CheckCertify(v.akPub, v.keyPub, v.attest, append(bytes.Clone(v.sig), 0), v.nonce))
	// A tampered attestation.
	bad := bytes.Clone(v.attest)
	bad[len(bad)-1] ^= 1
	if err := CheckCertify(v.akPub, v.keyPub, bad, v.sig, v.nonce); err == nil {
		t.Error("a tampered attestation verified")
	}
	_, err = ParsePublic(make([]byte, MaxStructure+1), "ek")
	check("oversized", "malformed-ek", err)
}

func FuzzParseAttestation(f *testing.F) {
	// Seeds: real structures from the simulated TPM.
	simMu.Lock()
	if d, err := tpm.Open("sim"); err == nil {
		ek, _ := d.EK()
		ak, _ := d.CreateAK()
		key, _, _ := d.CreateDeviceKey()
		nonce := bytes.Repeat([]byte{7}, 32)
		if attest, sig, err := d.Certify(ak, key, nonce); err == nil {
			f.Add(ak.Public, key.Public, attest, sig, nonce)
			f.Add(ek.Public, ak.Public, attest[:len(attest)/2], sig, nonce)
		}
		d.Close()
	}
	simMu.Unlock()
	f.Add([]byte{0, 1, 2}, []byte{}, []byte{0xff, 0x54, 0x43, 0x47}, []byte{0}, []byte{})
	f.Fuzz(func(t *testing.T, akb, keyb, attest, sig, nonce []byte) {
		ak, err := ParsePublic(akb, "ak")
		if err != nil {
			return
		}
		_ = CheckAK(ak)
		key, err := ParsePublic(keyb, "key")
		if err != nil {
			return
		}
		_, _ = CheckDeviceKey(key)
		if CheckCertify(ak, key, attest, sig, nonce) == nil && CheckCertify(ak, key, append(bytes.Clone(attest), 0), sig, nonce) == nil {
			t.Fatal("accepted an attestation with a trailing byte")
		}
	})
}

// TestEKCertificatePath: a TPM manufactured by swtpm_setup holds an EK
// certificate from swtpm's local CA; with that CA configured as a
// manufacturer root, the EK is trusted without the allowlist, and the
// challenge works with its (RSA) EK.
func TestEKCertificatePath(t *testing.T) {
	spec := tpmsim.StartSWTPM(t, true)
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	for pool, path := range map[*x509.CertPool]string{roots: "/var/lib/swtpm-localca/swtpm-localca-rootca-cert.pem", inter: "/var/lib/swtpm-localca/issuercert.pem"} {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Skipf("swtpm's local CA: %v", err)
		}
		pool.AppendCertsFromPEM(b)
	}
	d, err := tpm.Open(spec)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	ek, err := d.EK()
	if err != nil {
		t.Fatal(err)
	}
	if ek.Cert == nil {
		t.Fatal("no EK certificate")
	}
	trust := &EKTrust{Allowed: func([]byte) (bool, error) { return false, nil }, Roots: roots, Intermediates: inter}
	if _, how, err := trust.Check(ek.Key, ek.Cert, time.Now()); err != nil || how != "ek-certificate" {
		t.Fatalf("EK certificate path: %v %s", err, how)
	}
	// The certificate must be for this EK.
	other, _ := rsa.GenerateKey(rand.Reader, 2048)
	if _, _, err := trust.Check(&other.PublicKey, ek.Cert, time.Now()); reasonOf(err) != "ek-cert-mismatch" {
		t.Fatalf("another key with this certificate: %v", err)
	}
	// Another manufacturer's roots do not vouch for it.
	if _, _, err := (&EKTrust{Roots: x509.NewCertPool()}).Check(ek.Key, ek.Cert, time.Now()); reasonOf(err) != "ek-untrusted" {
		t.Fatalf("untrusted manufacturer: %v", err)
	}
	ak, err := d.CreateAK()
	if err != nil {
		t.Fatal(err)
	}
	ekPub, _ := ParsePublic(ek.Public, "ek")
	akPub, _ := ParsePublic(ak.Public, "ak")
	ch, err := MakeChallenge(rand.Reader, ekPub, akPub)
	if err != nil {
		t.Fatal(err)
	}
	got, err := d.ActivateCredential(ak, ch.IDObject, ch.EncSecret)
	if err != nil || ch.CheckActivation(got) != nil {
		t.Fatalf("activation with the RSA EK: %v", err)
	}
}

// TestEKCertificateCriticalSAN: TCG EK certificates have an empty subject
// and a critical SAN naming the TPM (manufacturer, model, version) as a
// directoryName, which Go leaves unhandled and Verify would refuse. That
// one extension is tolerated; any other unhandled critical one is not.
func TestEKCertificateCriticalSAN(t *testing.T) {
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "TPM Manufacturer Root"}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
	caDER, _ := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	ca, _ := x509.ParseCertificate(caDER)
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	ekKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tpmName := pkix.Name{ExtraNames: []pkix.AttributeTypeAndValue{
		{Type: asn1.ObjectIdentifier{2, 23, 133, 2, 1}, Value: "id:414D4400"}, // TPM manufacturer
		{Type: asn1.ObjectIdentifier{2, 23, 133, 2, 2}, Value: "model"},
		{Type: asn1.ObjectIdentifier{2, 23, 133, 2, 3}, Value: "id:00010002"},
	}}
	rdn, _ := asn1.Marshal(tpmName.ToRDNSequence())
	san, _ := asn1.Marshal([]asn1.RawValue{{Class: asn1.ClassContextSpecific, Tag: 4, IsCompound: true, Bytes: rdn}})
	ekCert := func(extra ...pkix.Extension) []byte {
		der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: big.NewInt(2), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageKeyAgreement, ExtraExtensions: append([]pkix.Extension{{Id: oidSAN, Critical: true, Value: san}}, extra...)}, ca, ekKey.Public(), caKey)
		if err != nil {
			t.Fatal(err)
		}
		return der
	}
	// Go itself refuses such a certificate.
	c, err := x509.ParseCertificate(ekCert())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err == nil {
		t.Fatal("Go accepted the critical SAN: this tolerance is no longer needed")
	}
	trust := &EKTrust{Roots: roots}
	if _, how, err := trust.Check(ekKey.Public(), ekCert(), time.Now()); err != nil || how != "ek-certificate" {
		t.Fatalf("an EK certificate with the TCG critical SAN: %v", err)
	}
	other := pkix.Extension{Id: asn1.ObjectIdentifier{1, 2, 3, 4}, Critical: true, Value: []byte{5, 0}}
	if _, _, err := trust.Check(ekKey.Public(), ekCert(other), time.Now()); reasonOf(err) != "ek-untrusted" {
		t.Fatalf("another unhandled critical extension: %v", err)
	}
}
