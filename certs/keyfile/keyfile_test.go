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
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

var pass = []byte("a test passphrase")

// fast keeps the tests quick under -race; TestDefaultIterations uses the
// default.
var fast = &EncryptOptions{Iterations: 1000}

func keys(t testing.TB) map[string]crypto.Signer {
	t.Helper()
	p256, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	_, ed, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
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
			block, _ := pem.Decode(enc)
			if block == nil || block.Type != "ENCRYPTED PRIVATE KEY" {
				t.Fatalf("not an encrypted PKCS#8 PEM:\n%s", enc)
			}
			if bytes.Contains(block.Bytes, mustPKCS8(t, k)) {
				t.Fatal("the encrypted key contains the plaintext key")
			}
			for form, in := range map[string][]byte{"pem": enc, "der": block.Bytes} {
				got, err := DecryptPKCS8(in, pass)
				if err != nil || !samePublic(k, got) {
					t.Fatalf("DecryptPKCS8(%s): %v", form, err)
				}
			}
			if got, err := ParsePrivateKey(enc, pass); err != nil || !samePublic(k, got) {
				t.Fatalf("ParsePrivateKey(encrypted): %v", err)
			}
			plain, err := MarshalPrivateKey(k)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.HasPrefix(plain, []byte("-----BEGIN PRIVATE KEY-----")) {
				t.Fatalf("not a PKCS#8 PEM:\n%s", plain)
			}
			if got, err := ParsePrivateKey(plain, nil); err != nil || !samePublic(k, got) {
				t.Fatalf("ParsePrivateKey(PKCS#8): %v", err)
			}
			if ec, ok := k.(*ecdsa.PrivateKey); ok {
				der, err := x509.MarshalECPrivateKey(ec)
				if err != nil {
					t.Fatal(err)
				}
				sec1 := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})
				if got, err := ParsePrivateKey(sec1, nil); err != nil || !samePublic(k, got) {
					t.Fatalf("ParsePrivateKey(SEC 1): %v", err)
				}
			}
		})
	}
}

func mustPKCS8(t *testing.T, k crypto.Signer) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func TestDefaultIterations(t *testing.T) {
	t.Parallel()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	enc, err := EncryptPKCS8(k, pass, nil)
	if err != nil {
		t.Fatal(err)
	}
	kdf := parseKDF(t, enc)
	if kdf.IterationCount != DefaultIterations || !kdf.PRF.Algorithm.Equal(oidHMACSHA256) || len(kdf.Salt) != 16 || kdf.KeyLength != 0 {
		t.Fatalf("parameters = %d iterations, PRF %v, %d-byte salt, key length %d", kdf.IterationCount, kdf.PRF.Algorithm, len(kdf.Salt), kdf.KeyLength)
	}
	if got, err := DecryptPKCS8(enc, pass); err != nil || !samePublic(k, got) {
		t.Fatalf("DecryptPKCS8: %v", err)
	}
}

// parseKDF digs the PBKDF2 parameters out of an encrypted key.
func parseKDF(t *testing.T, enc []byte) pbkdf2Params {
	t.Helper()
	block, _ := pem.Decode(enc)
	if block == nil {
		t.Fatal("no PEM block")
	}
	info, err := parseDER[encryptedPrivateKeyInfo](block.Bytes, "info")
	if err != nil {
		t.Fatal(err)
	}
	params, err := parseDER[pbes2Params](info.Algorithm.Parameters.FullBytes, "pbes2")
	if err != nil {
		t.Fatal(err)
	}
	kdf, err := parseDER[pbkdf2Params](params.KeyDerivationFunc.Parameters.FullBytes, "kdf")
	if err != nil {
		t.Fatal(err)
	}
	return kdf
}

// spec describes an EncryptedPrivateKeyInfo for craft to build.
type spec struct {
	scheme, kdf, prf, cipher asn1.ObjectIdentifier
	iterations, keyLen       int
	iv, data                 []byte
	kdfTrailer               []byte // appended after the PBKDF2 parameters
}

// craft builds an EncryptedPrivateKeyInfo DER from valid-looking defaults
// changed by edit. The ciphertext is zeros, so it never decrypts.
func craft(t testing.TB, edit func(*spec)) []byte {
	t.Helper()
	s := spec{
		scheme: oidPBES2, kdf: oidPBKDF2, prf: oidHMACSHA256, cipher: oidAES256CBC,
		iterations: 1000, iv: make([]byte, 16), data: make([]byte, 32),
	}
	edit(&s)
	kdf, err := asn1.Marshal(pbkdf2Params{Salt: []byte("saltsaltsaltsalt"), IterationCount: s.iterations, KeyLength: s.keyLen, PRF: pkix.AlgorithmIdentifier{Algorithm: s.prf, Parameters: asn1.NullRawValue}})
	if err != nil {
		t.Fatal(err)
	}
	ivDER, err := asn1.Marshal(s.iv)
	if err != nil {
		t.Fatal(err)
	}
	params, err := asn1.Marshal(pbes2Params{
		KeyDerivationFunc: pkix.AlgorithmIdentifier{Algorithm: s.kdf, Parameters: asn1.RawValue{FullBytes: append(kdf, s.kdfTrailer...)}},
		EncryptionScheme:  pkix.AlgorithmIdentifier{Algorithm: s.cipher, Parameters: asn1.RawValue{FullBytes: ivDER}},
	})
	if err != nil {
		t.Fatal(err)
	}
	der, err := asn1.Marshal(encryptedPrivateKeyInfo{Algorithm: pkix.AlgorithmIdentifier{Algorithm: s.scheme, Parameters: asn1.RawValue{FullBytes: params}}, EncryptedData: s.data})
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func pemOf(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

func TestReadRefusals(t *testing.T) {
	t.Parallel()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	good, err := EncryptPKCS8(k, pass, fast)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(good)
	trailing := pemOf("ENCRYPTED PRIVATE KEY", append(bytes.Clone(block.Bytes), 0))
	sec1, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	legacy := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Headers: map[string]string{"Proc-Type": "4,ENCRYPTED", "DEK-Info": "AES-256-CBC,00000000000000000000000000000000"}, Bytes: sec1})
	trailingPlain, err := encryptPBES2(append(mustPKCS8(t, k), 0), pass, fast)
	if err != nil {
		t.Fatal(err)
	}
	enc := func(edit func(*spec)) []byte { return pemOf("ENCRYPTED PRIVATE KEY", craft(t, edit)) }
	cases := []struct {
		name    string
		in      []byte
		pass    []byte
		decrypt bool  // call DecryptPKCS8 rather than ParsePrivateKey
		target  error // errors.Is target, if any
		detail  string
	}{
		{name: "fail/wrong-passphrase", in: good, pass: []byte("not it"), target: ErrWrongPassphrase, detail: "wrong passphrase or corrupt key"},
		{name: "fail/wrong-passphrase-der", in: block.Bytes, pass: []byte("not it"), decrypt: true, target: ErrWrongPassphrase},
		{name: "fail/no-passphrase", in: good, target: ErrNeedPassphrase, detail: "needs a passphrase"},
		{name: "fail/empty-passphrase", in: block.Bytes, pass: []byte{}, decrypt: true, target: ErrNeedPassphrase},
		{name: "fail/no-pem", in: []byte("garbage"), pass: pass, detail: "no PEM private key"},
		{name: "fail/garbage-der", in: []byte("garbage"), pass: pass, decrypt: true, detail: "malformed encrypted private key"},
		{name: "fail/unknown-pem-type", in: pemOf("CERTIFICATE", []byte{0}), pass: pass, detail: `unsupported PEM block type "CERTIFICATE"`},
		{name: "fail/decrypt-unencrypted-pem", in: pemOf("PRIVATE KEY", []byte{0}), pass: pass, decrypt: true, detail: `PEM block is "PRIVATE KEY"`},
		{name: "fail/legacy-pem-encryption", in: legacy, pass: pass, detail: "legacy PEM encryption (DEK-Info)"},
		{name: "fail/garbage-pkcs8", in: pemOf("PRIVATE KEY", []byte("garbage")), detail: "parsing PRIVATE KEY"},
		{name: "fail/garbage-sec1", in: pemOf("EC PRIVATE KEY", []byte("garbage")), detail: "parsing EC PRIVATE KEY"},
		{name: "fail/trailing-bytes", in: trailing, pass: pass, detail: "malformed encrypted private key: 1 trailing bytes"},
		{name: "fail/trailing-bytes-in-plaintext", in: trailingPlain, pass: pass, target: ErrWrongPassphrase},
		{name: "fail/trailing-bytes-after-pkcs8", in: pemOf("PRIVATE KEY", append(mustPKCS8(t, k), 0)), detail: "parsing PRIVATE KEY: malformed private key: 1 trailing bytes"},
		{name: "fail/trailing-bytes-after-sec1", in: pemOf("EC PRIVATE KEY", append(bytes.Clone(sec1), 0)), detail: "parsing EC PRIVATE KEY: malformed private key: 1 trailing bytes"},
		{name: "fail/extra-field-in-kdf-algorithm", in: enc(func(s *spec) { s.kdfTrailer = []byte{5, 0} }), pass: pass, detail: "malformed PBES2 parameters: unexpected fields or not DER"},
		{name: "fail/too-many-iterations", in: enc(func(s *spec) { s.iterations = 10_000_001 }), pass: pass, detail: "PBKDF2 iteration count 10000001 is outside 1..10000000"},
		{name: "fail/huge-iterations", in: enc(func(s *spec) { s.iterations = 1 << 40 }), pass: pass, detail: "iteration count 1099511627776 is outside"},
		{name: "fail/zero-iterations", in: enc(func(s *spec) { s.iterations = 0 }), pass: pass, detail: "iteration count 0 is outside"},
		{name: "fail/unknown-scheme", in: enc(func(s *spec) { s.scheme = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 12, 1, 3} }), pass: pass, detail: "encrypted with 1.2.840.113549.1.12.1.3; only PBES2"},
		{name: "fail/unknown-kdf", in: enc(func(s *spec) { s.kdf = asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 11591, 4, 11} }), pass: pass, detail: "key derivation 1.3.6.1.4.1.11591.4.11 is not supported"},
		{name: "fail/unknown-cipher", in: enc(func(s *spec) { s.cipher = asn1.ObjectIdentifier{1, 2, 840, 113549, 3, 7} }), pass: pass, detail: "cipher 1.2.840.113549.3.7 is not supported"},
		{name: "fail/unknown-prf", in: enc(func(s *spec) { s.prf = asn1.ObjectIdentifier{1, 2, 840, 113549, 2, 5} }), pass: pass, detail: "PRF 1.2.840.113549.2.5 is not supported"},
		{name: "fail/key-length-mismatch", in: enc(func(s *spec) { s.keyLen = 16 }), pass: pass, detail: "key length 16 does not fit the cipher's 32"},
		{name: "fail/short-iv", in: enc(func(s *spec) { s.iv = s.iv[:8] }), pass: pass, detail: "cipher IV is 8 bytes; want 16"},
		{name: "fail/partial-block", in: enc(func(s *spec) { s.data = s.data[:20] }), pass: pass, detail: "20 bytes is not whole AES blocks"},
		{name: "fail/no-data", in: enc(func(s *spec) { s.data = nil }), pass: pass, detail: "0 bytes is not whole AES blocks"},
		{name: "fail/garbage-plaintext", in: enc(func(*spec) {}), pass: pass, target: ErrWrongPassphrase},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			read := ParsePrivateKey
			if c.decrypt {
				read = DecryptPKCS8
			}
			key, err := read(c.in, c.pass)
			if key != nil || err == nil {
				t.Fatalf("read succeeded: %T, %v", key, err)
			}
			if c.target != nil && !errors.Is(err, c.target) {
				t.Fatalf("err = %v, want %v", err, c.target)
			}
			if !strings.Contains(err.Error(), c.detail) {
				t.Fatalf("err = %v, want it to contain %q", err, c.detail)
			}
			if len(c.pass) > 0 && strings.Contains(err.Error(), string(c.pass)) {
				t.Fatalf("error reveals the passphrase: %v", err)
			}
		})
	}
}

func TestUnpad(t *testing.T) {
	t.Parallel()
	block := func(tail ...byte) []byte { return append(make([]byte, 32-len(tail)), tail...) }
	cases := []struct {
		name string
		in   []byte
		n    int // bytes of padding; -1 if refused
	}{
		{"ok/one", block(1), 1},
		{"ok/three", block(3, 3, 3), 3},
		{"ok/full-block", block(bytes.Repeat([]byte{16}, 16)...), 16},
		{"fail/zero", block(0), -1},
		{"fail/longer-than-a-block", block(bytes.Repeat([]byte{17}, 17)...), -1},
		{"fail/inconsistent", block(2, 3, 3), -1},
		{"fail/inconsistent-first-of-16", block(append([]byte{15}, bytes.Repeat([]byte{16}, 15)...)...), -1},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			got, ok := unpad(c.in)
			if c.n < 0 {
				if ok {
					t.Fatalf("unpad accepted %x", c.in)
				}
				return
			}
			if !ok || len(got) != len(c.in)-c.n {
				t.Fatalf("unpad = %d bytes, %v; want %d bytes", len(got), ok, len(c.in)-c.n)
			}
		})
	}
}

// unsupportedSigner is a crypto.Signer that PKCS#8 cannot hold.
type unsupportedSigner struct{ crypto.Signer }

func TestEncryptRefusals(t *testing.T) {
	t.Parallel()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name   string
		key    crypto.Signer
		pass   []byte
		opts   *EncryptOptions
		detail string
	}{
		{"fail/empty-passphrase", k, nil, fast, "empty passphrase"},
		{"fail/too-few-iterations", k, pass, &EncryptOptions{Iterations: 999}, "999 PBKDF2 iterations is outside 1000..10000000"},
		{"fail/negative-iterations", k, pass, &EncryptOptions{Iterations: -1}, "-1 PBKDF2 iterations is outside"},
		{"fail/too-many-iterations", k, pass, &EncryptOptions{Iterations: 10_000_001}, "10000001 PBKDF2 iterations is outside"},
		{"fail/unsupported-key", unsupportedSigner{k}, pass, fast, "encrypting key: x509: unknown key type"},
		{"fail/short-rand", k, pass, &EncryptOptions{Iterations: 1000, Rand: bytes.NewReader(make([]byte, 20))}, "reading IV: unexpected EOF"},
		{"fail/no-rand", k, pass, &EncryptOptions{Iterations: 1000, Rand: bytes.NewReader(nil)}, "reading salt: EOF"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			out, err := EncryptPKCS8(c.key, c.pass, c.opts)
			if out != nil || err == nil || !strings.Contains(err.Error(), c.detail) {
				t.Fatalf("EncryptPKCS8 = %d bytes, %v; want an error containing %q", len(out), err, c.detail)
			}
		})
	}
}

func TestEncryptUsesRand(t *testing.T) {
	t.Parallel()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	seed := bytes.Repeat([]byte{7}, 32)
	a, err := EncryptPKCS8(k, pass, &EncryptOptions{Iterations: 1000, Rand: bytes.NewReader(seed)})
	if err != nil {
		t.Fatal(err)
	}
	b, err := EncryptPKCS8(k, pass, &EncryptOptions{Iterations: 1000, Rand: bytes.NewReader(seed)})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, b) {
		t.Fatal("the same salt and IV gave different output")
	}
	if kdf := parseKDF(t, a); !bytes.Equal(kdf.Salt, seed[:16]) {
		t.Fatalf("salt = %x, want the first 16 bytes of Rand", kdf.Salt)
	}
	c, err := EncryptPKCS8(k, pass, fast)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(a, c) {
		t.Fatal("crypto/rand gave the fixed salt and IV")
	}
}

// TestOpenSSL checks interoperability both ways with OpenSSL.
func TestOpenSSL(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Skip("openssl is not on $PATH; skipping the OpenSSL interoperability tests")
	}
	dir := t.TempDir()
	write := func(t *testing.T, name string, data []byte) string {
		t.Helper()
		f := filepath.Join(dir, name)
		if err := os.WriteFile(f, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return f
	}
	passArg := "pass:" + string(pass)

	// OpenSSL reads what EncryptPKCS8 writes, and refuses a wrong passphrase.
	for name, k := range keys(t) {
		enc, err := EncryptPKCS8(k, pass, fast)
		if err != nil {
			t.Fatal(err)
		}
		f := write(t, "ours-"+name+".key", enc)
		t.Run("ok/openssl-reads-"+name, func(t *testing.T) {
			t.Parallel()
			pub := openssl(t, "pkey", "-in", f, "-passin", passArg, "-pubout", "-outform", "DER")
			want, err := x509.MarshalPKIXPublicKey(k.Public())
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(pub, want) {
				t.Fatal("openssl decrypted a different key")
			}
		})
		t.Run("fail/openssl-wrong-passphrase-"+name, func(t *testing.T) {
			t.Parallel()
			out, err := exec.Command("openssl", "pkey", "-in", f, "-passin", "pass:wrong", "-noout").CombinedOutput()
			var exit *exec.ExitError
			if !errors.As(err, &exit) {
				t.Fatalf("openssl with a wrong passphrase: err = %v, want a non-zero exit\n%s", err, out)
			}
		})
	}

	// DecryptPKCS8 reads what OpenSSL writes.
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	plain, err := MarshalPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	in := write(t, "plain.key", plain)
	cases := []struct {
		name   string
		args   []string
		sha1   bool // the PRF is left out, meaning the default HMAC-SHA1
		cipher asn1.ObjectIdentifier
	}{
		{"ok/pkcs8-aes256-sha256", []string{"pkcs8", "-topk8", "-in", in, "-v2", "aes256", "-v2prf", "hmacWithSHA256", "-passout", passArg}, false, oidAES256CBC},
		{"ok/pkcs8-aes128-sha1", []string{"pkcs8", "-topk8", "-in", in, "-v2", "aes128", "-v2prf", "hmacWithSHA1", "-passout", passArg}, true, oidAES128CBC},
		{"ok/pkcs8-aes192-sha512", []string{"pkcs8", "-topk8", "-in", in, "-v2", "aes192", "-v2prf", "hmacWithSHA512", "-passout", passArg}, false, oidAES192CBC},
		{"ok/pkcs8-aes256-sha384", []string{"pkcs8", "-topk8", "-in", in, "-v2", "aes256", "-v2prf", "hmacWithSHA384", "-passout", passArg}, false, oidAES256CBC},
		{"ok/genpkey-p256-aes128", []string{"genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-aes-128-cbc", "-pass", passArg}, false, oidAES128CBC},
		{"ok/genpkey-ed25519-aes128", []string{"genpkey", "-algorithm", "ED25519", "-aes-128-cbc", "-pass", passArg}, false, oidAES128CBC},
		{"ok/genpkey-rsa2048-aes256", []string{"genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-aes-256-cbc", "-pass", passArg}, false, oidAES256CBC},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			enc := openssl(t, c.args...)
			if kdf := parseKDF(t, enc); (len(kdf.PRF.Algorithm) == 0) != c.sha1 {
				t.Fatalf("PRF = %v; the test does not cover what it says", kdf.PRF.Algorithm)
			}
			want := openssl(t, "pkey", "-in", write(t, strings.TrimPrefix(c.name, "ok/")+".key", enc), "-passin", passArg, "-pubout", "-outform", "DER")
			got, err := DecryptPKCS8(enc, pass)
			if err != nil {
				t.Fatal(err)
			}
			if pub, err := x509.MarshalPKIXPublicKey(got.Public()); err != nil || !bytes.Equal(pub, want) {
				t.Fatalf("read a different key (%v)", err)
			}
			if _, err := DecryptPKCS8(enc, []byte("wrong")); !errors.Is(err, ErrWrongPassphrase) {
				t.Fatalf("wrong passphrase: err = %v, want ErrWrongPassphrase", err)
			}
		})
	}
	t.Run("ok/openssl-sec1", func(t *testing.T) {
		t.Parallel()
		if got, err := ParsePrivateKey(openssl(t, "ec", "-in", in), nil); err != nil || !samePublic(k, got) {
			t.Fatalf("SEC 1 key: %v", err)
		}
	})
}

// openssl runs openssl and returns its standard output.
func openssl(t *testing.T, args ...string) []byte {
	t.Helper()
	cmd := exec.Command("openssl", args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("openssl %s: %v\n%s", strings.Join(args, " "), err, stderr.Bytes())
	}
	return out
}

func FuzzDecryptPKCS8(f *testing.F) {
	for _, k := range keys(f) {
		enc, err := EncryptPKCS8(k, pass, fast)
		if err != nil {
			f.Fatal(err)
		}
		block, _ := pem.Decode(enc)
		f.Add(block.Bytes)
		f.Add(enc)
	}
	f.Add(craft(f, func(s *spec) { s.prf = oidHMACSHA1; s.cipher = oidAES128CBC }))
	f.Add(craft(f, func(s *spec) { s.iterations = 1 << 40 }))
	f.Add([]byte("garbage"))
	f.Add([]byte{})
	// Each input chooses its own iteration count; keep them all cheap.
	old := maxIterations
	f.Cleanup(func() { maxIterations = old })
	maxIterations = 5000
	f.Fuzz(func(t *testing.T, data []byte) {
		key, err := DecryptPKCS8(data, pass)
		if (key == nil) == (err == nil) {
			t.Fatalf("key %T and error %v", key, err)
		}
		if err != nil && strings.Contains(err.Error(), string(pass)) {
			t.Fatal("error reveals the passphrase")
		}
	})
}
