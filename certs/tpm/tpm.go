// Package tpm keeps a device's key inside its TPM 2.0 and signs with it.
//
// It is shared by the device agent and by the provisioning service's tests.
//
// The device key is an ECC P-256 signing key made by the TPM under the
// storage root key (SRK, the TCG's ECC SRK template, so it is the same on
// every boot): non-restricted, fixedTPM, fixedParent, sensitiveDataOrigin.
// Its public and encrypted private parts (a blob only this TPM can load)
// are kept in the device's state directory and loaded again after a
// restart. Signer is a crypto.Signer over it, safe for concurrent use,
// used by crypto/tls for mTLS and by fkx1 for its handshake.
//
// Production builds need no cgo: the in-process simulator ("sim") is
// registered only by test code and by the simulator's TPM mode.
package tpm

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"encoding/asn1"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"strings"
	"sync"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"
)

// Opener opens a TPM named by the text after "NAME:" in a --tpm value.
type Opener func(arg string) (transport.TPMCloser, error)

var (
	openersMu sync.Mutex
	openers   = map[string]Opener{}
)

// Register makes Open accept "name" (and "name:ARG"); the simulator
// registers "sim".
func Register(name string, o Opener) {
	openersMu.Lock()
	defer openersMu.Unlock()
	openers[name] = o
}

// Open opens the TPM that spec names:
//
//	/dev/tpmrm0 (or another device path)   the kernel's resource manager
//	swtpm:unix:PATH                        swtpm's data socket (unixio)
//	swtpm:tcp:HOST:PORT                    swtpm's data socket (tcp)
//	sim                                    the in-process simulator, where registered
func Open(spec string) (*Device, error) {
	t, err := openTransport(spec)
	if err != nil {
		return nil, err
	}
	return &Device{t: t}, nil
}

func openTransport(spec string) (transport.TPMCloser, error) {
	switch {
	case strings.HasPrefix(spec, "swtpm:unix:"):
		return linuxudstpm.Open(strings.TrimPrefix(spec, "swtpm:unix:"))
	case strings.HasPrefix(spec, "swtpm:tcp:"):
		addr := strings.TrimPrefix(spec, "swtpm:tcp:")
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("swtpm at %s: %w", addr, err)
		}
		return transport.FromReadWriteCloser(c), nil
	case strings.HasPrefix(spec, "/"):
		if _, err := os.Stat(spec); err != nil {
			return nil, fmt.Errorf("TPM device: %w", err)
		}
		return linuxtpm.Open(spec)
	}
	name, arg, _ := strings.Cut(spec, ":")
	openersMu.Lock()
	o := openers[name]
	openersMu.Unlock()
	if o == nil {
		if name == "sim" {
			return nil, errors.New(`--tpm sim: the in-process TPM simulator is built only into tests and the fleet simulator; use /dev/tpmrm0 or swtpm:unix:PATH`)
		}
		return nil, fmt.Errorf("--tpm %q: want /dev/tpmrm0, swtpm:unix:PATH, swtpm:tcp:HOST:PORT or sim", spec)
	}
	return o(arg)
}

// Device is an open TPM. Its methods are safe for concurrent use: the
// TPM runs one command at a time anyway.
type Device struct {
	mu  sync.Mutex
	t   transport.TPMCloser
	srk *tpm2.CreatePrimaryResponse // kept loaded: one object slot
}

// Close flushes the SRK and closes the TPM connection.
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.srk != nil {
		d.flush(d.srk.ObjectHandle)
		d.srk = nil
	}
	return d.t.Close()
}

// KeyBlob is a TPM-made key as the state directory keeps it: its public
// area and its private area encrypted to the SRK (TPM2B structures).
type KeyBlob struct {
	Public, Private []byte
}

// DeviceKeyTemplate is the device key: ECC P-256 ECDSA-SHA256,
// non-restricted (it signs TLS handshakes and fkx1 transcripts, not only
// TPM-made structures), fixedTPM and fixedParent (it can never leave this
// TPM), sensitiveDataOrigin (the TPM made it).
var DeviceKeyTemplate = tpm2.TPMTPublic{
	Type:    tpm2.TPMAlgECC,
	NameAlg: tpm2.TPMAlgSHA256,
	ObjectAttributes: tpm2.TPMAObject{
		FixedTPM:            true,
		FixedParent:         true,
		SensitiveDataOrigin: true,
		UserWithAuth:        true,
		SignEncrypt:         true,
	},
	Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
		CurveID: tpm2.TPMECCNistP256,
		Scheme: tpm2.TPMTECCScheme{
			Scheme:  tpm2.TPMAlgECDSA,
			Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256}),
		},
	}),
}

// storageRoot returns the storage root key (deterministic from the
// template and the owner seed), creating it once per Device: creating a
// primary key is the slowest step of a signature. It stays loaded, one
// object slot of the three some TPMs have. Caller holds mu.
func (d *Device) storageRoot() (*tpm2.CreatePrimaryResponse, error) {
	if d.srk != nil {
		return d.srk, nil
	}
	rsp, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(tpm2.ECCSRKTemplate)}.Execute(d.t)
	if err != nil {
		return nil, fmt.Errorf("TPM: creating the storage root key: %w", err)
	}
	d.srk = rsp
	return rsp, nil
}

func (d *Device) flush(h tpm2.TPMHandle) {
	_, _ = tpm2.FlushContext{FlushHandle: h}.Execute(d.t)
}

// CreateDeviceKey has the TPM make a new device key and returns its blob
// and public key.
func (d *Device) CreateDeviceKey() (*KeyBlob, *ecdsa.PublicKey, error) {
	return d.CreateKey(DeviceKeyTemplate)
}

// CreateKey has the TPM make an ECC key from tmpl under the SRK (tests use
// it for keys the attestation must refuse).
func (d *Device) CreateKey(tmpl tpm2.TPMTPublic) (*KeyBlob, *ecdsa.PublicKey, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	srk, err := d.storageRoot()
	if err != nil {
		return nil, nil, err
	}
	rsp, err := tpm2.Create{
		ParentHandle: tpm2.NamedHandle{Handle: srk.ObjectHandle, Name: srk.Name},
		InPublic:     tpm2.New2B(tmpl),
	}.Execute(d.t)
	if err != nil {
		return nil, nil, fmt.Errorf("TPM: creating a key: %w", err)
	}
	pub, err := ecdsaPublic(rsp.OutPublic)
	if err != nil {
		return nil, nil, err
	}
	return &KeyBlob{Public: tpm2.Marshal(rsp.OutPublic), Private: tpm2.Marshal(rsp.OutPrivate)}, pub, nil
}

// ecdsaPublic is PublicKey for the ECC keys this package makes.
func ecdsaPublic(p tpm2.TPM2BPublic) (*ecdsa.PublicKey, error) {
	pub, err := p.Contents()
	if err != nil {
		return nil, fmt.Errorf("TPM: public area: %w", err)
	}
	k, err := PublicKey(pub)
	if err != nil {
		return nil, err
	}
	ek, ok := k.(*ecdsa.PublicKey)
	if !ok {
		return nil, errors.New("TPM: not an ECC key")
	}
	return ek, nil
}

// Signer is a crypto.Signer over a device key in the TPM. The key is
// loaded for each signature and flushed after it, so between signatures
// only the SRK holds an object slot (some TPMs have only 3).
type Signer struct {
	d    *Device
	pub  *ecdsa.PublicKey
	blob KeyBlob
}

// Signer checks a key blob and returns a signer over it.
func (d *Device) Signer(blob *KeyBlob) (*Signer, error) {
	tpub, err := tpm2.Unmarshal[tpm2.TPM2BPublic](blob.Public)
	if err != nil {
		return nil, fmt.Errorf("TPM key blob: public area: %w", err)
	}
	tpri, err := tpm2.Unmarshal[tpm2.TPM2BPrivate](blob.Private)
	if err != nil {
		return nil, fmt.Errorf("TPM key blob: private area: %w", err)
	}
	if !bytesEqual(tpm2.Marshal(tpub), blob.Public) || !bytesEqual(tpm2.Marshal(tpri), blob.Private) {
		return nil, errors.New("TPM key blob: trailing bytes after a TPM structure")
	}
	pub, err := ecdsaPublic(*tpub)
	if err != nil {
		return nil, err
	}
	contents, _ := tpub.Contents()
	a := contents.ObjectAttributes
	if !a.FixedTPM || !a.FixedParent || !a.SensitiveDataOrigin || !a.SignEncrypt || a.Restricted {
		return nil, errors.New("TPM key blob: not a fixedTPM, fixedParent, TPM-made, unrestricted signing key")
	}
	return &Signer{d: d, pub: pub, blob: KeyBlob{Public: tpm2.Marshal(tpub), Private: tpm2.Marshal(tpri)}}, nil
}

func bytesEqual(a, b []byte) bool { return string(a) == string(b) }

// Public returns the key's public half.
func (s *Signer) Public() crypto.PublicKey { return s.pub }

// Sign signs digest, a SHA-256 hash, with ECDSA inside the TPM, and
// returns the ASN.1 signature crypto/tls and x509 expect.
func (s *Signer) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if opts == nil || opts.HashFunc() != crypto.SHA256 || len(digest) != sha256.Size {
		return nil, fmt.Errorf("TPM device key signs SHA-256 digests only (got %v)", opts)
	}
	d := s.d
	d.mu.Lock()
	defer d.mu.Unlock()
	key, err := d.load(&s.blob)
	if err != nil {
		return nil, err
	}
	defer d.flush(key.ObjectHandle)
	rsp, err := tpm2.Sign{
		KeyHandle: tpm2.NamedHandle{Handle: key.ObjectHandle, Name: key.Name},
		Digest:    tpm2.TPM2BDigest{Buffer: digest},
		InScheme: tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgECDSA,
			Details: tpm2.NewTPMUSigScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSchemeHash{HashAlg: tpm2.TPMAlgSHA256})},
		Validation: tpm2.TPMTTKHashCheck{Tag: tpm2.TPMSTHashCheck},
	}.Execute(d.t)
	if err != nil {
		return nil, fmt.Errorf("TPM: signing: %w", err)
	}
	sig, err := rsp.Signature.Signature.ECDSA()
	if err != nil {
		return nil, fmt.Errorf("TPM: signature: %w", err)
	}
	return asn1.Marshal(struct{ R, S *big.Int }{new(big.Int).SetBytes(sig.SignatureR.Buffer), new(big.Int).SetBytes(sig.SignatureS.Buffer)})
}
