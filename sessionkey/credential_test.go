package sessionkey

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"testing"
)

func TestCredentials(t *testing.T) {
	t.Parallel()
	leaf, inter := bytes.Repeat([]byte{0x30}, 400), bytes.Repeat([]byte{0x31}, 300)
	enc, err := AppendChain(nil, [][]byte{leaf, inter})
	if err != nil {
		t.Fatal(err)
	}
	c, rest, err := ParseCredential(append(enc, 0xAA))
	if err != nil || len(c.Chain) != 2 || !bytes.Equal(c.Chain[0], leaf) || !bytes.Equal(rest, []byte{0xAA}) || !bytes.Equal(c.Raw, enc) {
		t.Fatalf("chain round trip: %v", err)
	}
	ref := AppendRef(nil, leaf)
	c, _, err = ParseCredential(ref)
	if err != nil || !c.IsRef || c.LeafRef != sha256.Sum256(leaf) || len(c.Raw) != 33 {
		t.Fatalf("reference round trip: %v", err)
	}

	header := func(count int, lens ...int) []byte {
		b := binary.BigEndian.AppendUint16([]byte{CredChain}, uint16(count))
		for _, n := range lens {
			b = binary.BigEndian.AppendUint16(b, uint16(n))
			b = append(b, make([]byte, n)...)
		}
		return b
	}
	cases := []struct {
		name string
		in   []byte
	}{
		{"fail/empty", nil},
		{"fail/unknown-type", []byte{0x02, 0, 1}},
		{"fail/short-ref", []byte{CredRef, 1, 2}},
		{"fail/zero-certs", header(0)},
		{"fail/five-certs", header(5, 1, 1, 1, 1, 1)},
		{"fail/empty-cert", header(1, 0)},
		{"fail/truncated", header(2, 10)},
		{"fail/over-8192", header(2, 5000, 5000)},
		{"fail/huge-length", append(header(1), 0xff, 0xff)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if _, _, err := ParseCredential(tc.in); !errors.Is(err, ErrCredential) {
				t.Fatalf("ParseCredential = %v", err)
			}
		})
	}
	if _, err := AppendChain(nil, [][]byte{make([]byte, 5000), make([]byte, 5000)}); !errors.Is(err, ErrCredential) {
		t.Fatalf("encoding an oversized chain: %v", err)
	}
	if _, err := AppendChain(nil, nil); !errors.Is(err, ErrCredential) {
		t.Fatalf("encoding an empty chain: %v", err)
	}
}

func FuzzParseCredential(f *testing.F) {
	enc, _ := AppendChain(nil, [][]byte{[]byte("leaf"), []byte("issuing")})
	f.Add(enc)
	f.Add(AppendRef(nil, []byte("leaf")))
	f.Add([]byte{CredChain, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		c, rest, err := ParseCredential(b)
		if err != nil {
			return
		}
		if len(c.Raw)+len(rest) != len(b) || !bytes.Equal(c.Raw, b[:len(c.Raw)]) {
			t.Fatal("Raw is not exactly the bytes parsed")
		}
		if !c.IsRef {
			if len(c.Chain) < 1 || len(c.Chain) > 4 || len(c.Raw) > 8192 {
				t.Fatalf("accepted a chain of %d certificates, %d bytes", len(c.Chain), len(c.Raw))
			}
			again, err := AppendChain(nil, c.Chain)
			if err != nil || !bytes.Equal(again, c.Raw) {
				t.Fatal("re-encoding differs")
			}
		}
	})
}
