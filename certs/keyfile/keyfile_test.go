package keyfile

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

var pass = []byte("a test passphrase")

// fast keeps the tests quick under -race; one test uses the default.
var fast = &EncryptOptions{Iterations: 1000}

func keys(t *testing.T) map[string]crypto.Signer {
	t.Helper()
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	_, ed, _ := ed25519.GenerateKey(rand.Reader)
	r, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	return map[string]crypto.Signer{"p256": p256, "p384": p384, "ed25519": ed, "rsa2048": r}
}

func samePublic(a, b crypto.Signer) bool {
	return a.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(b.Public())
}

func TestRoundTrip(t *testing.T) {
	t.Parallel()
	for name, k := range keys(t) {
		t.Run("ok/"+name, func(t *testing.T) {
			t.Parallel()
			enc, err := EncryptPKCS8(k, pass, fast)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.HasPrefix(enc, []byte("-----BEGIN ENCRYPTED PRIVATE KEY-----")) {
				t.Fatalf("not an encrypted PKCS#8 PEM:\n%s", enc)
			}
			got, err := ParsePrivateKey(enc, pass)
			if err != nil {
				t.Fatal(err)
			}
			if !samePublic(k, got) {
				t.Fatal("decrypted a different key")
			}
			plain, err := MarshalPrivateKey(k)
			if err != nil {
				t.Fatal(err)
			}
			if got, err := ParsePrivateKey(plain, nil); err != nil || !samePublic(k, got) {
				t.Fatalf("unencrypted round trip: %v", err)
			}
		})
	}
}

func TestDefaultIterations(t *testing.T) {
	t.Parallel()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	enc, err := EncryptPKCS8(k, pass, nil)
	if err != nil {
		t.Fatal(err)
	}
	kdf := parseKDF(t, enc)
	if kdf.IterationCount != DefaultIterations || !kdf.PRF.Algorithm.Equal(oidHMACSHA256) || len(kdf.Salt) != 16 {
		t.Fatalf("parameters = %d iterations, PRF %v, %d-byte salt", kdf.IterationCount, kdf.PRF.Algorithm, len(kdf.Salt))
	}
	if _, err := DecryptPKCS8(enc, pass); err != nil {
		t.Fatal(err)
	}
}

// parseKDF digs the PBKDF2 parameters out of an encrypted key.
func parseKDF(t *testing.T, enc []byte) pbkdf2Params {
	t.Helper()
	block, _ := pem.Decode(enc)
	var info encryptedPrivateKeyInfo
	var params pbes2Params
	var kdf pbkdf2Params
	if err := unmarshalExact(block.Bytes, &info, "info"); err != nil {
		t.Fatal(err)
	}
	if err := unmarshalExact(info.Algorithm.Parameters.FullBytes, &params, "pbes2"); err != nil {
		t.Fatal(err)
	}
	if err := unmarshalExact(params.KeyDerivationFunc.Parameters.FullBytes, &kdf, "kdf"); err != nil {
		t.Fatal(err)
	}
	return kdf
}

// craft builds an EncryptedPrivateKeyInfo with chosen parameters.
func craft(t *testing.T, kdfOID, prf, cipherOID asn1.ObjectIdentifier, iterations, keyLen int, iv, data []byte) []byte {
	t.Helper()
	kdf, err := asn1.Marshal(pbkdf2Params{Salt: []byte("saltsaltsaltsalt"), IterationCount: iterations, KeyLength: keyLen, PRF: pkix.AlgorithmIdentifier{Algorithm: prf, Parameters: asn1.NullRawValue}})
	if err != nil {
		t.Fatal(err)
	}
	ivDER, _ := asn1.Marshal(iv)
	params, _ := asn1.Marshal(pbes2Params{
		KeyDerivationFunc: pkix.AlgorithmIdentifier{Algorithm: kdfOID, Parameters: asn1.RawValue{FullBytes: kdf}},
		EncryptionScheme:  pkix.AlgorithmIdentifier{Algorithm: cipherOID, Parameters: asn1.RawValue{FullBytes: ivDER}},
	})
	der, _ := asn1.Marshal(encryptedPrivateKeyInfo{Algorithm: pkix.AlgorithmIdentifier{Algorithm: oidPBES2, Parameters: asn1.RawValue{FullBytes: params}}, EncryptedData: data})
	return der
}

func TestRefusals(t *testing.T) {
	t.Parallel()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	good, err := EncryptPKCS8(k, pass, fast)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(good)
	trailing := pem.EncodeToMemory(&pem.Block{Type: "ENCRYPTED PRIVATE KEY", Bytes: append(append([]byte(nil), block.Bytes...), 0)})
	iv := make([]byte, 16)
	data := make([]byte, 32)
	cases := []struct {
		name   string
		in     []byte
		pass   []byte
		target error
		detail string
	}{
		{"fail/wrong-passphrase", good, []byte("not it"), ErrWrongPassphrase, ""},
		{"fail/no-passphrase", good, nil, ErrNeedPassphrase, ""},
		{"fail/no-pem", []byte("garbage"), pass, nil, "no PEM private key"},
		{"fail/unknown-pem-type", []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), pass, nil, `PEM block "CERTIFICATE" is not a private key`},
		{"fail/trailing-bytes", trailing, pass, nil, "trailing bytes"},
		{"fail/too-many-iterations", pemOf(craft(t, oidPBKDF2, oidHMACSHA256, oidAES256CBC, 1<<30, 0, iv, data)), pass, nil, "iteration count 1073741824 is outside"},
		{"fail/zero-iterations", pemOf(craft(t, oidPBKDF2, oidHMACSHA256, oidAES256CBC, 0, 0, iv, data)), pass, nil, "iteration count 0 is outside"},
		{"fail/unknown-cipher", pemOf(craft(t, oidPBKDF2, oidHMACSHA256, asn1.ObjectIdentifier{1, 2, 840, 113549, 3, 7}, 1000, 0, iv, data)), pass, nil, "cipher 1.2.840.113549.3.7 is not supported"},
		{"fail/unknown-prf", pemOf(craft(t, oidPBKDF2, asn1.ObjectIdentifier{1, 2, 840, 113549, 2, 5}, oidAES256CBC, 1000, 0, iv, data)), pass, nil, "PRF 1.2.840.113549.2.5 is not supported"},
		{"fail/unknown-kdf", pemOf(craft(t, asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 11591, 4, 11}, oidHMACSHA256, oidAES256CBC, 1000, 0, iv, data)), pass, nil, "key derivation 1.3.6.1.4.1.11591.4.11 is not supported"},
		{"fail/key-length-mismatch", pemOf(craft(t, oidPBKDF2, oidHMACSHA256, oidAES256CBC, 1000, 16, iv, data)), pass, nil, "key length 16 does not fit"},
		{"fail/short-iv", pemOf(craft(t, oidPBKDF2, oidHMACSHA256, oidAES256CBC, 1000, 0, iv[:8], data)), pass, nil, "IV is 8 bytes"},
		{"fail/partial-block", pemOf(craft(t, oidPBKDF2, oidHMACSHA256, oidAES256CBC, 1000, 0, iv, data[:20])), pass, nil, "not whole AES blocks"},
		{"fail/garbage-plaintext", pemOf(craft(t, oidPBKDF2, oidHMACSHA256, oidAES256CBC, 1000, 0, iv, data)), pass, ErrWrongPassphrase, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			key, err := ParsePrivateKey(c.in, c.pass)
			if key != nil || err == nil {
				t.Fatalf("ParsePrivateKey succeeded")
			}
			if c.target != nil && !errors.Is(err, c.target) {
				t.Fatalf("err = %v, want %v", err, c.target)
			}
			if !strings.Contains(err.Error(), c.detail) {
				t.Fatalf("err = %v, want it to contain %q", err, c.detail)
			}
			if c.pass != nil && strings.Contains(err.Error(), string(c.pass)) {
				t.Fatalf("error reveals the passphrase: %v", err)
			}
		})
	}
	if _, err := EncryptPKCS8(k, nil, fast); err == nil {
		t.Error("encrypted with an empty passphrase")
	}
	if _, err := EncryptPKCS8(k, pass, &EncryptOptions{Iterations: 10}); err == nil {
		t.Error("encrypted with 10 iterations")
	}
}

func pemOf(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "ENCRYPTED PRIVATE KEY", Bytes: der})
}

// TestOpenSSL checks interoperability both ways with openssl, which nobody
// here wrote.
func TestOpenSSL(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Skip("openssl not installed; .ci/run installs it")
	}
	dir := t.TempDir()
	run := func(args ...string) []byte {
		t.Helper()
		out, err := exec.Command("openssl", args...).Output()
		if err != nil {
			t.Fatalf("openssl %s: %v", strings.Join(args, " "), err)
		}
		return out
	}
	for name, k := range keys(t) {
		t.Run("ok/openssl-reads-"+name, func(t *testing.T) {
			enc, err := EncryptPKCS8(k, pass, fast)
			if err != nil {
				t.Fatal(err)
			}
			f := filepath.Join(dir, name+".key")
			if err := os.WriteFile(f, enc, 0o600); err != nil {
				t.Fatal(err)
			}
			pub := run("pkey", "-in", f, "-passin", "pass:"+string(pass), "-pubout", "-outform", "DER")
			want, _ := x509.MarshalPKIXPublicKey(k.Public())
			if !bytes.Equal(pub, want) {
				t.Fatal("openssl decrypted a different key")
			}
			if err := exec.Command("openssl", "pkey", "-in", f, "-passin", "pass:wrong", "-noout").Run(); err == nil {
				t.Fatal("openssl accepted a wrong passphrase")
			}
		})
	}
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	plain, _ := MarshalPrivateKey(k)
	in := filepath.Join(dir, "plain.key")
	if err := os.WriteFile(in, plain, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ name, cipher, prf string }{
		{"ok/aes256-sha256", "aes256", "hmacWithSHA256"},
		{"ok/aes128-sha1", "aes128", "hmacWithSHA1"},
		{"ok/aes192-sha512", "aes192", "hmacWithSHA512"},
	} {
		t.Run(c.name, func(t *testing.T) {
			out := run("pkcs8", "-topk8", "-in", in, "-v2", c.cipher, "-v2prf", c.prf, "-passout", "pass:"+string(pass))
			got, err := ParsePrivateKey(out, pass)
			if err != nil {
				t.Fatal(err)
			}
			if !samePublic(k, got) {
				t.Fatal("read a different key")
			}
			if _, err := ParsePrivateKey(out, []byte("wrong")); !errors.Is(err, ErrWrongPassphrase) {
				t.Fatalf("wrong passphrase: %v", err)
			}
		})
	}
	// openssl's SEC 1 ("EC PRIVATE KEY") output reads too.
	sec1 := run("ec", "-in", in)
	if got, err := ParsePrivateKey(sec1, nil); err != nil || !samePublic(k, got) {
		t.Fatalf("SEC 1 key: %v", err)
	}
}

func TestWriteFile(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	p := filepath.Join(dir, "k.key")
	if err := WriteFile(p, []byte("first"), 0o600, false); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(p)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode = %v, %v", fi.Mode().Perm(), err)
	}
	err = WriteFile(p, []byte("second"), 0o600, false)
	if !errors.Is(err, fs.ErrExist) || !strings.Contains(err.Error(), "refusing to overwrite") {
		t.Fatalf("second write: %v", err)
	}
	if b, _ := os.ReadFile(p); string(b) != "first" {
		t.Fatalf("original changed to %q", b)
	}
	if err := WriteFile(p, []byte("third"), 0o644, true); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(p); string(b) != "third" {
		t.Fatalf("overwrite gave %q", b)
	}
	if fi, _ := os.Stat(p); fi.Mode().Perm() != 0o644 {
		t.Fatalf("mode after overwrite = %v", fi.Mode().Perm())
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("temporary files left behind: %v", entries)
	}
	if err := WriteFile(filepath.Join(dir, "missing", "k"), nil, 0o600, false); err == nil {
		t.Fatal("wrote into a missing directory")
	}
}

func FuzzDecryptPKCS8(f *testing.F) {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	enc, err := EncryptPKCS8(k, pass, fast)
	if err != nil {
		f.Fatal(err)
	}
	block, _ := pem.Decode(enc)
	f.Add(block.Bytes)
	f.Add(enc)
	f.Add([]byte("garbage"))
	maxIterations = 5000 // keep each input cheap
	f.Fuzz(func(t *testing.T, data []byte) {
		key, err := DecryptPKCS8(data, pass)
		if err == nil && key == nil {
			t.Fatal("no key and no error")
		}
		if err != nil && strings.Contains(err.Error(), string(pass)) {
			t.Fatal("error reveals the passphrase")
		}
	})
}
