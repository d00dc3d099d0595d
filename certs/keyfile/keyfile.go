// Package keyfile reads and writes private keys at rest.
//
// CA keys are stored encrypted as PKCS#8 EncryptedPrivateKeyInfo with PBES2
// (RFC 8018): PBKDF2-HMAC-SHA256, 600,000 iterations, AES-256-CBC. That is
// the scheme OpenSSL 3 writes by default for `openssl pkcs8 -topk8 -v2`,
// so `openssl pkey -passin` opens fleetkey's keys and fleetkey opens
// OpenSSL's. PBES2 has no integrity check, so a wrong passphrase shows up
// as bad padding or a PKCS#8 structure that does not parse; both are
// reported as ErrWrongPassphrase. Reading is bounded: iteration counts
// above 10,000,000 are refused before any work is done.
//
// Leaf keys (gateway, service, admin, device) are unencrypted PKCS#8, since
// the daemons that use them start unattended; they rely on mode 0600.
// WriteFile writes atomically, sets the mode explicitly (umask cannot widen
// it), and by default refuses to replace an existing file.
package keyfile

import (
	"crypto"
	"crypto/x509"
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
		return nil, fmt.Errorf("PEM block %q is not a private key this reads (want %q, %q or %q)", block.Type, pemEncrypted, pemPKCS8, pemSEC1)
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

// WriteFile writes data to path with exactly mode perm. It writes a
// temporary file in the same directory, syncs it, and then moves it into
// place, so a reader never sees half a file. Unless overwrite is set, an
// existing path is left untouched and the error wraps fs.ErrExist; the
// check and the move are one step (a hard link), so two writers cannot both
// win.
func WriteFile(path string, data []byte, perm fs.FileMode, overwrite bool) (err error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	tmp, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return err
	}
	tmpName := tmp.Name()
	defer func() {
		if tmp != nil {
			tmp.Close()
		}
		os.Remove(tmpName) // after a rename or link this removes the spare name only
	}()
	if err := tmp.Chmod(perm); err != nil {
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		return err
	}
	if err := tmp.Sync(); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	tmp = nil
	if overwrite {
		err = os.Rename(tmpName, path)
	} else if err = os.Link(tmpName, path); errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("refusing to overwrite existing %q: %w", path, fs.ErrExist)
	}
	if err != nil {
		return err
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync() // make the new name durable; best effort
		d.Close()
	}
	return nil
}
