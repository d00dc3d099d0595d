package token

import (
	"bytes"
	"strings"
	"testing"
)

func TestNewParseMatch(t *testing.T) {
	t.Parallel()
	tok, id, hash, err := New(nil)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(tok, Prefix+id+"_") || len(tok) != MaxLength || !ValidID(id) {
		t.Fatalf("token %q, id %q", tok, id)
	}
	pid, phash, err := Parse(tok)
	if err != nil || pid != id || !Matches(phash, hash) {
		t.Fatalf("Parse: %q %v", pid, err)
	}
	other, _, otherHash, _ := New(nil)
	if other == tok || Matches(otherHash, hash) {
		t.Fatal("two tokens matched")
	}
	if Matches(phash, nil) || Matches(phash, hash[:31]) {
		t.Fatal("matched a short stored hash")
	}
	if _, _, _, err := New(bytes.NewReader([]byte("short"))); err == nil {
		t.Fatal("New with too little randomness")
	}
}

func TestParseRefusals(t *testing.T) {
	t.Parallel()
	tok, _, _, _ := New(nil)
	for _, bad := range []string{
		"", "fkt_", tok + "x", tok[:len(tok)-1], "xyz" + tok[3:],
		strings.Replace(tok, "_", "-", 2),
		Prefix + "AAAAAAAAAAAA_" + tok[len(tok)-43:], // upper-case id
		Prefix + "aaaaaaaaaaa1_" + tok[len(tok)-43:], // '1' is not base32
		tok[:len(tok)-43] + strings.Repeat("!", 43),
	} {
		if _, _, err := Parse(bad); err != ErrMalformed {
			t.Errorf("Parse(%q) = %v, want ErrMalformed", bad, err)
		}
	}
}

func FuzzParse(f *testing.F) {
	tok, _, _, _ := New(nil)
	f.Add(tok)
	f.Add("fkt_aaaaaaaaaaaa_")
	f.Fuzz(func(t *testing.T, s string) {
		id, hash, err := Parse(s)
		if err != nil {
			return
		}
		if !ValidID(id) || len(hash) != 32 || len(s) != MaxLength {
			t.Fatalf("Parse(%q) accepted id %q", s, id)
		}
	})
}
