package keyfile

import (
	"bytes"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/subtle"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"hash"
	"io"
)

// DefaultIterations is the PBKDF2-HMAC-SHA256 iteration count for new
// encrypted keys (OWASP's 2023 figure for PBKDF2-SHA256).
const DefaultIterations = 600_000

// maxIterations caps what DecryptPKCS8 will do for a file it is handed: a
// hostile key file must not be able to make a process spin for minutes.
// It is a variable so the fuzz test can lower it.
var maxIterations = 10_000_000

// ErrWrongPassphrase means the key did not decrypt: the passphrase is wrong
// or the file is damaged. The two cannot be told apart (RFC 8018 has no
// integrity check), so the message names both.
var ErrWrongPassphrase = errors.New("wrong passphrase or corrupt key")

// ErrNeedPassphrase means the key is encrypted and no passphrase was given.
var ErrNeedPassphrase = errors.New("the key is encrypted and needs a passphrase")

// Object identifiers of RFC 8018 and NIST.
var (
	oidPBES2      = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 5, 13}
	oidPBKDF2     = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 5, 12}
	oidHMACSHA1   = asn1.ObjectIdentifier{1, 2, 840, 113549, 2, 7}
	oidHMACSHA256 = asn1.ObjectIdentifier{1, 2, 840, 113549, 2, 9}
	oidHMACSHA384 = asn1.ObjectIdentifier{1, 2, 840, 113549, 2, 10}
	oidHMACSHA512 = asn1.ObjectIdentifier{1, 2, 840, 113549, 2, 11}
	oidAES128CBC  = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 1, 2}
	oidAES192CBC  = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 1, 22}
	oidAES256CBC  = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 1, 42}
)

var prfs = map[string]func() hash.Hash{
	oidHMACSHA1.String():   sha1.New,
	oidHMACSHA256.String(): sha256.New,
	oidHMACSHA384.String(): sha512.New384,
	oidHMACSHA512.String(): sha512.New,
}

var cipherKeyLen = map[string]int{
	oidAES128CBC.String(): 16,
	oidAES192CBC.String(): 24,
	oidAES256CBC.String(): 32,
}

// encryptedPrivateKeyInfo is RFC 5958, section 3.
type encryptedPrivateKeyInfo struct {
	Algorithm     pkix.AlgorithmIdentifier
	EncryptedData []byte
}

// pbes2Params is RFC 8018, appendix A.4.
type pbes2Params struct {
	KeyDerivationFunc pkix.AlgorithmIdentifier
	EncryptionScheme  pkix.AlgorithmIdentifier
}

// pbkdf2Params is RFC 8018, appendix A.2. The salt is always the
// "specified" OCTET STRING choice; the PRF defaults to HMAC-SHA1.
type pbkdf2Params struct {
	Salt           []byte
	IterationCount int
	KeyLength      int                      `asn1:"optional"`
	PRF            pkix.AlgorithmIdentifier `asn1:"optional"`
}

// EncryptOptions tunes EncryptPKCS8. The zero value gives the defaults.
type EncryptOptions struct {
	// Iterations of PBKDF2; 0 means DefaultIterations.
	Iterations int
	// Rand supplies the salt and IV; nil means crypto/rand.Reader.
	Rand io.Reader
}

// EncryptPKCS8 encrypts a private key as a PEM "ENCRYPTED PRIVATE KEY"
// (PKCS#8 EncryptedPrivateKeyInfo, RFC 5958) with PBES2: PBKDF2-HMAC-SHA256
// over a 16-byte random salt, and AES-256-CBC with a random IV. That is
// what `openssl pkcs8 -topk8 -v2 aes256 -v2prf hmacWithSHA256` writes, and
// what `openssl pkey -passin` reads. The passphrase must not be empty, and
// the iteration count must be within 1000..10,000,000 (the upper bound is
// what DecryptPKCS8 accepts).
func EncryptPKCS8(key crypto.Signer, passphrase []byte, opts *EncryptOptions) ([]byte, error) {
	plain, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encrypting key: %w", err)
	}
	defer clear(plain)
	return encryptPBES2(plain, passphrase, opts)
}

// encryptPBES2 does EncryptPKCS8's work on a DER PrivateKeyInfo.
func encryptPBES2(plain, passphrase []byte, opts *EncryptOptions) ([]byte, error) {
	if len(passphrase) == 0 {
		return nil, errors.New("encrypting key: empty passphrase")
	}
	var o EncryptOptions
	if opts != nil {
		o = *opts
	}
	if o.Iterations == 0 {
		o.Iterations = DefaultIterations
	}
	if o.Iterations < 1000 || o.Iterations > maxIterations {
		return nil, fmt.Errorf("encrypting key: %d PBKDF2 iterations is outside 1000..%d", o.Iterations, maxIterations)
	}
	if o.Rand == nil {
		o.Rand = rand.Reader
	}
	salt, iv := make([]byte, 16), make([]byte, aes.BlockSize)
	if _, err := io.ReadFull(o.Rand, salt); err != nil {
		return nil, fmt.Errorf("encrypting key: reading salt: %w", err)
	}
	if _, err := io.ReadFull(o.Rand, iv); err != nil {
		return nil, fmt.Errorf("encrypting key: reading IV: %w", err)
	}
	dk, err := pbkdf2.Key(sha256.New, string(passphrase), salt, o.Iterations, 32)
	if err != nil {
		return nil, fmt.Errorf("encrypting key: %w", err)
	}
	defer clear(dk)
	block, err := aes.NewCipher(dk)
	if err != nil {
		return nil, fmt.Errorf("encrypting key: %w", err)
	}
	pad := aes.BlockSize - len(plain)%aes.BlockSize
	padded := make([]byte, len(plain)+pad)
	defer clear(padded)
	copy(padded, plain)
	for i := len(plain); i < len(padded); i++ {
		padded[i] = byte(pad)
	}
	ct := make([]byte, len(padded))
	cipher.NewCBCEncrypter(block, iv).CryptBlocks(ct, padded)

	der, err := marshalPBES2(salt, iv, o.Iterations, ct)
	if err != nil {
		return nil, fmt.Errorf("encrypting key: encoding: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: pemEncrypted, Bytes: der}), nil
}

// marshalPBES2 encodes the EncryptedPrivateKeyInfo that EncryptPKCS8 writes.
func marshalPBES2(salt, iv []byte, iterations int, ct []byte) ([]byte, error) {
	kdf, err := asn1.Marshal(pbkdf2Params{Salt: salt, IterationCount: iterations, PRF: pkix.AlgorithmIdentifier{Algorithm: oidHMACSHA256, Parameters: asn1.NullRawValue}})
	if err != nil {
		return nil, err
	}
	ivDER, err := asn1.Marshal(iv)
	if err != nil {
		return nil, err
	}
	params, err := asn1.Marshal(pbes2Params{
		KeyDerivationFunc: pkix.AlgorithmIdentifier{Algorithm: oidPBKDF2, Parameters: asn1.RawValue{FullBytes: kdf}},
		EncryptionScheme:  pkix.AlgorithmIdentifier{Algorithm: oidAES256CBC, Parameters: asn1.RawValue{FullBytes: ivDER}},
	})
	if err != nil {
		return nil, err
	}
	return asn1.Marshal(encryptedPrivateKeyInfo{
		Algorithm:     pkix.AlgorithmIdentifier{Algorithm: oidPBES2, Parameters: asn1.RawValue{FullBytes: params}},
		EncryptedData: ct,
	})
}

// parseDER parses der as one T. It refuses trailing bytes, and, since
// encoding/asn1 skips unexpected elements at the end of a SEQUENCE, it also
// refuses anything that does not encode back to exactly der.
func parseDER[T any](der []byte, what string) (T, error) {
	var v T
	rest, err := asn1.Unmarshal(der, &v)
	if err != nil {
		return v, fmt.Errorf("malformed %s: %w", what, err)
	}
	if len(rest) > 0 {
		return v, fmt.Errorf("malformed %s: %d trailing bytes", what, len(rest))
	}
	if re, err := asn1.Marshal(v); err != nil || !bytes.Equal(re, der) {
		return v, fmt.Errorf("malformed %s: unexpected fields or not DER", what)
	}
	return v, nil
}

// DecryptPKCS8 decrypts a PEM or DER EncryptedPrivateKeyInfo protected with
// PBES2: PBKDF2 (HMAC-SHA1, -SHA256, -SHA384 or -SHA512) and AES-128/192/256
// in CBC mode. Any other scheme is refused with its OID, and more than
// 10,000,000 PBKDF2 iterations is refused before any work is done. An empty
// passphrase gives ErrNeedPassphrase; one that does not decrypt the key
// gives ErrWrongPassphrase.
func DecryptPKCS8(data, passphrase []byte) (crypto.Signer, error) {
	if block, _ := pem.Decode(data); block != nil {
		if block.Type != pemEncrypted {
			return nil, fmt.Errorf("PEM block is %q; want %q", block.Type, pemEncrypted)
		}
		data = block.Bytes
	}
	if len(passphrase) == 0 {
		return nil, ErrNeedPassphrase
	}
	info, err := parseDER[encryptedPrivateKeyInfo](data, "encrypted private key")
	if err != nil {
		return nil, err
	}
	if !info.Algorithm.Algorithm.Equal(oidPBES2) {
		return nil, fmt.Errorf("encrypted with %s; only PBES2 (%s) is supported", info.Algorithm.Algorithm, oidPBES2)
	}
	params, err := parseDER[pbes2Params](info.Algorithm.Parameters.FullBytes, "PBES2 parameters")
	if err != nil {
		return nil, err
	}
	if !params.KeyDerivationFunc.Algorithm.Equal(oidPBKDF2) {
		return nil, fmt.Errorf("key derivation %s is not supported; only PBKDF2 (%s)", params.KeyDerivationFunc.Algorithm, oidPBKDF2)
	}
	keyLen, ok := cipherKeyLen[params.EncryptionScheme.Algorithm.String()]
	if !ok {
		return nil, fmt.Errorf("cipher %s is not supported; only AES-128/192/256-CBC", params.EncryptionScheme.Algorithm)
	}
	kdf, err := parseDER[pbkdf2Params](params.KeyDerivationFunc.Parameters.FullBytes, "PBKDF2 parameters")
	if err != nil {
		return nil, err
	}
	prf := sha1.New
	if len(kdf.PRF.Algorithm) > 0 {
		if prf, ok = prfs[kdf.PRF.Algorithm.String()]; !ok {
			return nil, fmt.Errorf("PBKDF2 PRF %s is not supported; only HMAC-SHA1/256/384/512", kdf.PRF.Algorithm)
		}
	}
	if kdf.IterationCount < 1 || kdf.IterationCount > maxIterations {
		return nil, fmt.Errorf("PBKDF2 iteration count %d is outside 1..%d", kdf.IterationCount, maxIterations)
	}
	if kdf.KeyLength != 0 && kdf.KeyLength != keyLen {
		return nil, fmt.Errorf("PBKDF2 key length %d does not fit the cipher's %d", kdf.KeyLength, keyLen)
	}
	if len(kdf.Salt) == 0 || len(kdf.Salt) > 1024 {
		return nil, fmt.Errorf("PBKDF2 salt of %d bytes is outside 1..1024", len(kdf.Salt))
	}
	iv, err := parseDER[[]byte](params.EncryptionScheme.Parameters.FullBytes, "cipher IV")
	if err != nil {
		return nil, err
	}
	if len(iv) != aes.BlockSize {
		return nil, fmt.Errorf("cipher IV is %d bytes; want %d", len(iv), aes.BlockSize)
	}
	ct := info.EncryptedData
	if len(ct) == 0 || len(ct)%aes.BlockSize != 0 {
		return nil, fmt.Errorf("encrypted data of %d bytes is not whole AES blocks", len(ct))
	}
	dk, err := pbkdf2.Key(prf, string(passphrase), kdf.Salt, kdf.IterationCount, keyLen)
	if err != nil {
		return nil, fmt.Errorf("deriving key: %w", err)
	}
	defer clear(dk)
	block, err := aes.NewCipher(dk)
	if err != nil {
		return nil, fmt.Errorf("decrypting key: %w", err)
	}
	plain := make([]byte, len(ct))
	defer clear(plain)
	cipher.NewCBCDecrypter(block, iv).CryptBlocks(plain, ct)
	plain, ok = unpad(plain)
	if !ok {
		return nil, ErrWrongPassphrase
	}
	key, err := x509.ParsePKCS8PrivateKey(plain)
	if err == nil {
		_, err = parseDER[asn1.RawValue](plain, "private key") // x509 ignores trailing bytes
	}
	if err != nil {
		return nil, ErrWrongPassphrase
	}
	signer, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("decrypted key of type %T cannot sign", key)
	}
	return signer, nil
}

// unpad strips PKCS#7 padding. It looks at every padding byte whatever
// their values, so its timing says little about where padding went wrong.
func unpad(b []byte) ([]byte, bool) {
	n := int(b[len(b)-1])
	good := subtle.ConstantTimeLessOrEq(1, n) & subtle.ConstantTimeLessOrEq(n, aes.BlockSize)
	for i := 1; i <= aes.BlockSize; i++ {
		inPad := subtle.ConstantTimeLessOrEq(i, n)
		match := subtle.ConstantTimeByteEq(b[len(b)-i], byte(n))
		good &= subtle.ConstantTimeSelect(inPad, match, 1)
	}
	if good != 1 {
		return nil, false
	}
	return b[:len(b)-n], true
}
