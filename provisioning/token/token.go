// Package token makes and checks enrollment tokens.
//
// A token reads fkt_<id>_<secret>: a 12-character public id, used to find
// the token's record, and a 256-bit secret. Only the SHA-256 of the secret
// is stored; a presented secret is hashed and compared in constant time. A
// plain hash (no KDF) is enough because the secret is random, not chosen by
// a person: there is nothing to guess.
package token

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base32"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Prefix starts every token, so that a leaked one is easy to recognise
// (secret scanners, logs).
const Prefix = "fkt_"

const (
	idLen     = 12
	secretLen = 32
	// encoded lengths
	secretChars = 43 // base64url of 32 bytes, unpadded
	// MaxLength bounds what Parse looks at.
	MaxLength = len(Prefix) + idLen + 1 + secretChars
)

var idEncoding = base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)

// ErrMalformed means the string is not a fleetkey token at all.
var ErrMalformed = errors.New("malformed enrollment token: want fkt_<id>_<secret>")

// New makes a token from r (crypto/rand.Reader if nil). It returns the
// token to give the operator once, its id, and the hash to store.
func New(r io.Reader) (tok, id string, hash []byte, err error) {
	if r == nil {
		r = rand.Reader
	}
	raw := make([]byte, 8+secretLen)
	if _, err := io.ReadFull(r, raw); err != nil {
		return "", "", nil, fmt.Errorf("making a token: %w", err)
	}
	id = idEncoding.EncodeToString(raw[:8])[:idLen]
	secret := base64.RawURLEncoding.EncodeToString(raw[8:])
	sum := sha256.Sum256([]byte(secret))
	return Prefix + id + "_" + secret, id, sum[:], nil
}

// Parse splits a presented token into its id and the SHA-256 of its
// secret. It checks the shape only; Matches checks the secret.
func Parse(tok string) (id string, hash []byte, err error) {
	if len(tok) != MaxLength || !strings.HasPrefix(tok, Prefix) {
		return "", nil, ErrMalformed
	}
	rest := tok[len(Prefix):]
	id, secret, ok := strings.Cut(rest, "_")
	if !ok || !ValidID(id) || len(secret) != secretChars {
		return "", nil, ErrMalformed
	}
	if _, err := base64.RawURLEncoding.DecodeString(secret); err != nil {
		return "", nil, ErrMalformed
	}
	sum := sha256.Sum256([]byte(secret))
	return id, sum[:], nil
}

// Matches compares a presented secret's hash with the stored one in
// constant time.
func Matches(presented, stored []byte) bool {
	return len(stored) == sha256.Size && subtle.ConstantTimeCompare(presented, stored) == 1
}

// ValidID reports whether s has the shape of a token id (for admin paths).
func ValidID(s string) bool {
	if len(s) != idLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= 'a' && c <= 'z' || c >= '2' && c <= '7') {
			return false
		}
	}
	return true
}
