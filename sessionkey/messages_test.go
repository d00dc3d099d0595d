package sessionkey

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

func TestMessages(t *testing.T) {
	t.Parallel()
	cred, _ := AppendChain(nil, [][]byte{bytes.Repeat([]byte{0x30}, 300)})
	sig, fin := bytes.Repeat([]byte{9}, 64), bytes.Repeat([]byte{8}, 16)
	for _, suite := range []Suite{Suite1, Suite2} {
		d, g, _ := shareSizes(suite)
		m1 := &Msg1{Suite: suite, SidD: SID{1}, Share: bytes.Repeat([]byte{1}, d)}
		b1, err := m1.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		p1, err := ParseMsg1(b1)
		if err != nil || p1.SidD != m1.SidD || !bytes.Equal(p1.Share, m1.Share) {
			t.Fatalf("msg1 suite %d: %v", suite, err)
		}
		m2 := &Msg2{Suite: suite, SidD: SID{1}, SidG: SID{2}, Share: bytes.Repeat([]byte{2}, g), Signed: Signed{Sig: sig, Fin: fin}}
		b2, err := m2.Marshal(cred)
		if err != nil {
			t.Fatal(err)
		}
		p2, err := ParseMsg2(b2)
		if err != nil || p2.SidG != m2.SidG || !bytes.Equal(p2.Star, m2.Star) || !bytes.Equal(p2.Cred.Raw, cred) || !bytes.Equal(p2.Sig, sig) {
			t.Fatalf("msg2 suite %d: %v", suite, err)
		}
		if !bytes.HasSuffix(p2.Star, cred) {
			t.Fatal("msg2* does not end with cred_G")
		}
		m3 := &Msg3{Suite: suite, SidD: SID{1}, SidG: SID{2}, Signed: Signed{Sig: sig, Fin: fin}}
		b3, err := m3.Marshal(cred)
		if err != nil {
			t.Fatal(err)
		}
		if p3, err := ParseMsg3(b3); err != nil || !bytes.Equal(p3.Star, m3.Star) || !bytes.Equal(p3.Fin, fin) {
			t.Fatalf("msg3 suite %d: %v", suite, err)
		}
		for name, bad := range map[string][]byte{
			"msg1-trailing":  append(append([]byte(nil), b1...), 0),
			"msg1-short":     b1[:len(b1)-1],
			"msg2-trailing":  append(append([]byte(nil), b2...), 0),
			"msg2-short":     b2[:len(b2)-1],
			"msg1-as-msg2":   b1,
			"msg2-version":   append([]byte{2}, b2[1:]...),
			"msg2-suite":     append([]byte{1, 2, 9}, b2[3:]...),
			"msg2-huge":      append(append([]byte(nil), b2[:3]...), make([]byte, MaxKexMessage)...),
			"msg3-trailing":  append(append([]byte(nil), b3...), 0),
			"msg3-truncated": b3[:20],
		} {
			var err error
			switch {
			case strings.HasPrefix(name, "msg1") && name != "msg1-as-msg2":
				_, err = ParseMsg1(bad)
			case name == "msg1-as-msg2" || strings.HasPrefix(name, "msg2"):
				_, err = ParseMsg2(bad)
			default:
				_, err = ParseMsg3(bad)
			}
			if err == nil {
				t.Fatalf("suite %d, %s: accepted", suite, name)
			}
			if !errors.Is(err, ErrMessage) && !errors.Is(err, ErrCredential) {
				t.Fatalf("suite %d, %s: %v", suite, name, err)
			}
		}
	}
	kid := KID{9, 8, 7, 6}
	if got, err := ParseHint(MarshalHint(kid)); err != nil || got != kid {
		t.Fatalf("hint: %v", err)
	}
	if _, err := ParseHint([]byte{1, 0x10, 1}); !errors.Is(err, ErrMessage) {
		t.Fatal("short hint accepted")
	}
	if _, err := (&Msg1{Suite: Suite1, Share: make([]byte, 31)}).Marshal(); err == nil {
		t.Fatal("msg1 with a short share")
	}
}

func FuzzParseMessages(f *testing.F) {
	cred, _ := AppendChain(nil, [][]byte{[]byte("leaf")})
	b2, _ := (&Msg2{Suite: Suite1, Share: make([]byte, 32), Signed: Signed{Sig: make([]byte, 64), Fin: make([]byte, 16)}}).Marshal(cred)
	b3, _ := (&Msg3{Suite: Suite1, Signed: Signed{Sig: make([]byte, 64), Fin: make([]byte, 16)}}).Marshal(cred)
	b1, _ := (&Msg1{Suite: Suite1, Share: make([]byte, 32)}).Marshal()
	for _, b := range [][]byte{b1, b2, b3, MarshalHint(KID{})} {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if m, err := ParseMsg2(b); err == nil {
			again, err := m.Marshal(m.Cred.Raw)
			if err != nil || !bytes.Equal(again, b) {
				t.Fatal("msg2 does not re-encode to its bytes")
			}
		}
		if m, err := ParseMsg3(b); err == nil {
			again, err := m.Marshal(m.Cred.Raw)
			if err != nil || !bytes.Equal(again, b) {
				t.Fatal("msg3 does not re-encode to its bytes")
			}
		}
		if m, err := ParseMsg1(b); err == nil {
			again, err := m.Marshal()
			if err != nil || !bytes.Equal(again, b) {
				t.Fatal("msg1 does not re-encode to its bytes")
			}
		}
		_, _ = ParseHint(b)
	})
}
