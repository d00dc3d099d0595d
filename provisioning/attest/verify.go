// Package attest checks TPM attestation for enrollment ("TPM attestation"
// in the design): that the endorsement key (EK) is one the fleet trusts,
// that the attestation key (AK) is a restricted signing key in the same
// TPM (credential activation), and that the AK certified the device key,
// a fixedTPM key, with the session's nonce. The TPM structures arrive as
// their TPM2B/TPMT encodings and are parsed strictly: a trailing byte after
// a structure is a refusal.
package attest

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"
	"io"
	"math/big"
	"time"

	"github.com/google/go-tpm/tpm2"

	"fleetkey.dev/certs/tpm"
)

// MaxStructure bounds one TPM structure in a request (an RSA-2048 public
// area is about 300 bytes).
const MaxStructure = 2048

// Error is a refusal with a reason code for metrics and the audit log.
type Error struct {
	Reason  string
	Message string
}

func (e *Error) Error() string { return e.Message }

func refuse(reason, format string, args ...any) *Error {
	return &Error{Reason: reason, Message: fmt.Sprintf(format, args...)}
}

// strict decodes one TPM structure from b and refuses trailing bytes.
func strict[T tpm2.Marshallable, P interface {
	*T
	tpm2.Unmarshallable
}](b []byte, what string) (*T, error) {
	if len(b) == 0 || len(b) > MaxStructure {
		return nil, refuse("malformed-"+what, "%s: %d bytes; want 1 to %d", what, len(b), MaxStructure)
	}
	v, err := tpm2.Unmarshal[T, P](b)
	if err != nil {
		return nil, refuse("malformed-"+what, "%s is not a TPM structure: %v", what, err)
	}
	if !bytes.Equal(tpm2.Marshal(*v), b) {
		return nil, refuse("malformed-"+what, "%s: trailing bytes after the TPM structure", what)
	}
	return v, nil
}

// ParsePublic reads a TPM2B_PUBLIC.
func ParsePublic(b []byte, what string) (*tpm2.TPMTPublic, error) {
	p, err := strict[tpm2.TPM2BPublic](b, what)
	if err != nil {
		return nil, err
	}
	c, err := p.Contents()
	if err != nil {
		return nil, refuse("malformed-"+what, "%s: %v", what, err)
	}
	return c, nil
}

// EKHash is what a TPM-bound certificate and the allowlist name an EK by:
// the SHA-256 of its public key's SubjectPublicKeyInfo (DER), the same as
// `openssl pkey -pubin -outform DER | sha256sum` over the EK certificate's
// key.
func EKHash(pub crypto.PublicKey) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, err
	}
	h := sha256.Sum256(der)
	return h[:], nil
}

// EKTrust decides whether an EK is the fleet's.
type EKTrust struct {
	// Allowed reports whether an EK hash is on the allowlist.
	Allowed func(hash []byte) (bool, error)
	// Roots are the TPM manufacturers' CAs; an EK certificate that chains
	// to one, for the same key, makes the EK trusted.
	Roots, Intermediates *x509.CertPool
}

// oidSAN is subjectAltName. TCG EK certificates carry it critical, naming
// the TPM's manufacturer, model and version as a directoryName, which Go
// does not handle, so Verify refuses them.
var oidSAN = asn1.ObjectIdentifier{2, 5, 29, 17}

// Check returns the EK's hash if the EK is trusted, saying how.
func (t *EKTrust) Check(ek crypto.PublicKey, certDER []byte, now time.Time) (hash []byte, how string, err error) {
	hash, err = EKHash(ek)
	if err != nil {
		return nil, "", refuse("ek-unsupported", "the EK's key cannot be encoded: %v", err)
	}
	if t.Allowed != nil {
		ok, err := t.Allowed(hash)
		if err != nil {
			return nil, "", err
		}
		if ok {
			return hash, "allowlist", nil
		}
	}
	if len(certDER) == 0 || t.Roots == nil {
		return nil, "", refuse("ek-untrusted", "EK %x is not on the allowlist, and no EK certificate from a trusted manufacturer came with it", hash)
	}
	if len(certDER) > 8192 {
		return nil, "", refuse("ek-cert-invalid", "EK certificate of %d bytes", len(certDER))
	}
	cert, err := x509.ParseCertificate(certDER)
	if err != nil {
		return nil, "", refuse("ek-cert-invalid", "EK certificate: %v", err)
	}
	if !samePublicKey(cert.PublicKey, ek) {
		return nil, "", refuse("ek-cert-mismatch", "the EK certificate is for another key than the EK")
	}
	// Exactly the TCG's critical SAN is tolerated: it names the TPM, not
	// a host, and nothing here reads it.
	kept := cert.UnhandledCriticalExtensions[:0]
	for _, oid := range cert.UnhandledCriticalExtensions {
		if !oid.Equal(oidSAN) {
			kept = append(kept, oid)
		}
	}
	cert.UnhandledCriticalExtensions = kept
	if _, err := cert.Verify(x509.VerifyOptions{Roots: t.Roots, Intermediates: t.Intermediates, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, "", refuse("ek-untrusted", "EK %x: its certificate does not chain to a trusted TPM manufacturer: %v", hash, err)
	}
	return hash, "ek-certificate", nil
}

func samePublicKey(a, b crypto.PublicKey) bool {
	e, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && e.Equal(b)
}

// CheckAK refuses an attestation key that is not a restricted signing key
// made in and bound to its TPM.
func CheckAK(pub *tpm2.TPMTPublic) error {
	a := pub.ObjectAttributes
	switch {
	case !a.Restricted:
		return refuse("ak-not-restricted", "the AK is not restricted: it could sign a forged attestation")
	case !a.SignEncrypt || a.Decrypt:
		return refuse("ak-not-signing", "the AK is not a signing-only key")
	case !a.FixedTPM || !a.FixedParent || !a.SensitiveDataOrigin:
		return refuse("ak-not-fixed", "the AK is not fixedTPM, fixedParent and made in the TPM")
	case pub.NameAlg != tpm2.TPMAlgSHA256:
		return refuse("ak-name-alg", "the AK's name algorithm is not SHA-256")
	}
	if _, err := tpm.PublicKey(pub); err != nil {
		return refuse("ak-key", "the AK's key: %v", err)
	}
	return nil
}

// CheckDeviceKey refuses a certified key that could exist outside the TPM
// or that is not a P-256 signing key.
func CheckDeviceKey(pub *tpm2.TPMTPublic) (*ecdsa.PublicKey, error) {
	a := pub.ObjectAttributes
	switch {
	case !a.FixedTPM || !a.FixedParent:
		return nil, refuse("key-not-fixed", "the certified key is not fixedTPM and fixedParent: it may exist outside this TPM")
	case !a.SensitiveDataOrigin:
		return nil, refuse("key-imported", "the certified key was imported, not made in the TPM")
	case !a.SignEncrypt || a.Restricted:
		return nil, refuse("key-usage", "the certified key is not an unrestricted signing key")
	}
	k, err := tpm.PublicKey(pub)
	if err != nil {
		return nil, refuse("key-type", "the certified key: %v", err)
	}
	ek, ok := k.(*ecdsa.PublicKey)
	if !ok || ek.Curve != elliptic.P256() {
		return nil, refuse("key-type", "the certified key is not ECDSA P-256")
	}
	return ek, nil
}

// Challenge is what the service sends for credential activation.
type Challenge struct {
	IDObject, EncSecret []byte
	// Secret is what the device must send back.
	Secret []byte
}

// MakeChallenge encrypts a fresh secret to the EK for the AK's name:
// only the TPM that holds both can recover it.
func MakeChallenge(rnd io.Reader, ek, ak *tpm2.TPMTPublic) (*Challenge, error) {
	key, err := tpm2.ImportEncapsulationKey(ek)
	if err != nil {
		return nil, refuse("ek-unsupported", "the EK cannot encrypt a credential: %v", err)
	}
	name, err := tpm2.ObjectName(ak)
	if err != nil {
		return nil, refuse("ak-key", "the AK's name: %v", err)
	}
	secret := make([]byte, 32)
	if _, err := io.ReadFull(rnd, secret); err != nil {
		return nil, err
	}
	id, enc, err := tpm2.CreateCredential(rnd, key, name.Buffer, secret)
	if err != nil {
		return nil, fmt.Errorf("making the credential: %w", err)
	}
	return &Challenge{IDObject: id, EncSecret: enc, Secret: secret}, nil
}

// CheckActivation compares the device's answer in constant time.
func (c *Challenge) CheckActivation(got []byte) error {
	if subtle.ConstantTimeCompare(got, c.Secret) != 1 {
		return refuse("activation-failed", "the credential was not activated: the AK and the EK are not in one TPM")
	}
	return nil
}

// CheckCertify verifies that the AK certified key with nonce as
// qualifying data.
func CheckCertify(ak, key *tpm2.TPMTPublic, attest, sig, nonce []byte) error {
	a2b, err := strict[tpm2.TPM2BAttest](attest, "certify-info")
	if err != nil {
		return err
	}
	info, err := a2b.Contents() // checks TPM_GENERATED_VALUE
	if err != nil {
		return refuse("malformed-certify-info", "certify info: %v", err)
	}
	if info.Type != tpm2.TPMSTAttestCertify {
		return refuse("certify-type", "the attestation is not a TPM2_Certify")
	}
	if subtle.ConstantTimeCompare(info.ExtraData.Buffer, nonce) != 1 {
		return refuse("certify-nonce", "the attestation's qualifying data is not this session's nonce")
	}
	certified, err := info.Attested.Certify()
	if err != nil {
		return refuse("malformed-certify-info", "certify info: %v", err)
	}
	name, err := tpm2.ObjectName(key)
	if err != nil {
		return refuse("key-type", "the certified key's name: %v", err)
	}
	if !bytes.Equal(certified.Name.Buffer, name.Buffer) {
		return refuse("certify-name", "the attestation certifies another key than the one presented")
	}
	ts, err := strict[tpm2.TPMTSignature](sig, "certify-signature")
	if err != nil {
		return err
	}
	akKey, err := tpm.PublicKey(ak)
	if err != nil {
		return refuse("ak-key", "the AK's key: %v", err)
	}
	digest := sha256.Sum256(attest[2:]) // the TPMS_ATTEST inside the TPM2B
	switch k := akKey.(type) {
	case *ecdsa.PublicKey:
		es, err := ts.Signature.ECDSA()
		if err != nil || es.Hash != tpm2.TPMAlgSHA256 {
			return refuse("certify-signature", "the attestation's signature is not ECDSA with SHA-256")
		}
		if !ecdsa.Verify(k, digest[:], new(big.Int).SetBytes(es.SignatureR.Buffer), new(big.Int).SetBytes(es.SignatureS.Buffer)) {
			return refuse("certify-signature", "the AK's signature over the attestation does not verify")
		}
	case *rsa.PublicKey:
		rs, err := ts.Signature.RSASSA()
		if err != nil || rs.Hash != tpm2.TPMAlgSHA256 {
			return refuse("certify-signature", "the attestation's signature is not RSASSA with SHA-256")
		}
		if rsa.VerifyPKCS1v15(k, crypto.SHA256, digest[:], rs.Sig.Buffer) != nil {
			return refuse("certify-signature", "the AK's signature over the attestation does not verify")
		}
	default:
		return refuse("ak-key", "the AK's key type")
	}
	return nil
}

// ErrSession is wrapped by every session refusal.
var ErrSession = errors.New("attestation session")
