// Package keyfile reads and writes private keys at rest.
//
// CA keys are stored encrypted as PKCS#8 EncryptedPrivateKeyInfo with PBES2
// (RFC 8018): PBKDF2-HMAC-SHA256, 600,000 iterations, AES-256-CBC. That is
// the scheme OpenSSL 3 itself writes for `openssl pkcs8 -topk8` and
// `openssl genpkey -aes256` (with far fewer iterations), so `openssl pkey
// -passin` opens fleetkey's keys and fleetkey opens OpenSSL's; it needs
// nothing beyond the standard library, and PBKDF2-SHA256 at 600,000
// iterations is OWASP's current figure. PBES2 has no integrity check, so a
// wrong passphrase shows up as bad padding or a PKCS#8 structure that does
// not parse; both are reported as ErrWrongPassphrase. Reading is bounded:
// a key file chooses its own iteration count, so counts above 10,000,000
// are refused before any work is done.
//
// Leaf keys (gateway, service, admin, device) are unencrypted PKCS#8, since
// the daemons that use them start unattended; they rely on mode 0600.
// WriteFile writes atomically, sets the mode explicitly (umask cannot widen
// it), and by default refuses to replace an existing file.
package keyfile

import (
	"crypto"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// PEM block types.
const (
	pemEncrypted = "ENCRYPTED PRIVATE KEY"
	pemPKCS8     = "PRIVATE KEY"
	pemSEC1      = "EC PRIVATE KEY"
)

// ParsePrivateKey reads a PEM private key: "ENCRYPTED PRIVATE KEY" (which
// needs the passphrase; ErrNeedPassphrase without one), "PRIVATE KEY"
// (PKCS#8) or "EC PRIVATE KEY" (SEC 1).
func ParsePrivateKey(data, passphrase []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New("no PEM private key found")
	}
	if _, ok := block.Headers["DEK-Info"]; ok {
		return nil, fmt.Errorf("%s uses legacy PEM encryption (DEK-Info), which is not supported; want %q", block.Type, pemEncrypted)
	}
	var key any
	var err error
	switch block.Type {
	case pemEncrypted:
		return DecryptPKCS8(block.Bytes, passphrase)
	case pemPKCS8:
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	case pemSEC1:
		key, err = x509.ParseECPrivateKey(block.Bytes)
	default:
		return nil, fmt.Errorf("unsupported PEM block type %q; want %q, %q or %q", block.Type, pemEncrypted, pemPKCS8, pemSEC1)
	}
	if err == nil {
		_, err = parseDER[asn1.RawValue](block.Bytes, "private key") // x509 ignores trailing bytes
	}
	if err != nil {
		return nil, fmt.Errorf("parsing %s: %w", block.Type, err)
	}
	signer, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("key of type %T cannot sign", key)
	}
	return signer, nil
}

// MarshalPrivateKey encodes a key as unencrypted PKCS#8 PEM ("PRIVATE KEY").
func MarshalPrivateKey(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encoding private key: %w", err)
	}
	defer clear(der)
	return pem.EncodeToMemory(&pem.Block{Type: pemPKCS8, Bytes: der}), nil
}

// WriteFile writes data to path with exactly mode perm (key files use
// 0600). It writes a temporary file in the same directory, sets its mode
// explicitly (so the umask cannot change it) before any data goes in, syncs
// it, and then moves it into place, so a reader never sees half a file.
// Unless overwrite is set, an existing path is left untouched and the error
// wraps fs.ErrExist; the check and the move are one step (a hard link), so
// of two concurrent writers exactly one wins.
func WriteFile(path string, data []byte, perm fs.FileMode, overwrite bool) error {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	tmp, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return fmt.Errorf("writing %q: %w", path, err)
	}
	defer os.Remove(tmp.Name()) // after a rename or link, only the spare name (or nothing) is left
	if err := writeSync(tmp, data, perm); err != nil {
		return fmt.Errorf("writing %q: %w", path, err)
	}
	if overwrite {
		err = os.Rename(tmp.Name(), path)
	} else if err = os.Link(tmp.Name(), path); errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("refusing to overwrite existing %q: %w", path, fs.ErrExist)
	}
	if err != nil {
		return fmt.Errorf("writing %q: %w", path, err)
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync() // make the new name durable; best effort
		d.Close()
	}
	return nil
}

// writeSync sets f's mode, writes data, syncs and closes f.
func writeSync(f *os.File, data []byte, perm fs.FileMode) error {
	err := f.Chmod(perm)
	if err == nil {
		_, err = f.Write(data)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}
