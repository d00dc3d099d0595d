package sessionkey

import (
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
)

// The transcript and key derivation of the handshake (FKX1.md, Handshake):
//
//	TH1  = H("fkx1 TH1" ‖ lp(device_id) ‖ msg1)
//	TH2  = H(TH1 ‖ msg2*)
//	PRK  = HKDF-Extract(salt = TH2, IKM)
//	fk_G = L(PRK, "fin g", "", 32)     fk_D = L(PRK, "fin d", "", 32)
//	fin  = HMAC(fk, TH ‖ lp(sig))[0:16]
//	TH3  = H(TH2 ‖ lp(sig_G) ‖ fin_G ‖ msg3*)
//	TH4  = H(TH3 ‖ lp(sig_D) ‖ fin_D)
//	MS   = L(PRK, "master", TH4, 32)
//	kid  = L(MS, "kid", "", 4)

// Signature contexts.
const (
	ContextGateway = "fkx1 gateway sig"
	ContextDevice  = "fkx1 device sig"
)

// finSize is the length of a finish value.
const finSize = 16

// lp is u16(len(x)) ‖ x.
func lp(dst, x []byte) []byte {
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(x)))
	return append(dst, x...)
}

// hashOf is H over the concatenation of parts.
func hashOf(parts ...[]byte) []byte {
	h := sha256.New()
	for _, p := range parts {
		h.Write(p)
	}
	return h.Sum(nil)
}

// TH1 starts the transcript from the device id and msg1.
func TH1(deviceID string, msg1 []byte) []byte {
	return hashOf([]byte("fkx1 TH1"), lp(nil, []byte(deviceID)), msg1)
}

// TH2 extends TH1 with msg2* (msg2 up to and including cred_G).
func TH2(th1, msg2Star []byte) []byte { return hashOf(th1, msg2Star) }

// TH3 extends TH2 with the gateway's signature and finish and msg3*.
func TH3(th2, sigG, finG, msg3Star []byte) []byte { return hashOf(th2, lp(nil, sigG), finG, msg3Star) }

// TH4 closes the transcript with the device's signature and finish.
func TH4(th3, sigD, finD []byte) []byte { return hashOf(th3, lp(nil, sigD), finD) }

// handshakeSecrets are the secrets derived from the shared secret; wipe
// them once they have served.
type handshakeSecrets struct {
	prk, fkG, fkD []byte
}

// deriveHandshake computes PRK = HKDF-Extract(TH2, IKM) and the finish
// keys.
func deriveHandshake(th2, ikm []byte) (*handshakeSecrets, error) {
	prk, err := hkdf.Extract(sha256.New, ikm, th2)
	if err != nil {
		return nil, err
	}
	return &handshakeSecrets{prk: prk, fkG: expandLabel(prk, "fin g", nil, 32), fkD: expandLabel(prk, "fin d", nil, 32)}, nil
}

func (h *handshakeSecrets) wipe() { wipe(h.prk, h.fkG, h.fkD) }

// finish is HMAC(fk, th ‖ lp(sig))[0:16].
func finish(fk, th, sig []byte) []byte {
	m := hmac.New(sha256.New, fk)
	m.Write(th)
	m.Write(lp(nil, sig))
	return m.Sum(nil)[:finSize]
}

// checkFinish compares a received finish value in constant time.
func checkFinish(fk, th, sig, got []byte) bool {
	return len(got) == finSize && hmac.Equal(finish(fk, th, sig), got)
}

// masterSecret is MS = L(PRK, "master", TH4, 32), and kid = L(MS, "kid", "", 4).
func masterSecret(prk, th4 []byte) (ms []byte, kid KID) {
	ms = expandLabel(prk, "master", th4, 32)
	copy(kid[:], expandLabel(ms, "kid", nil, 4))
	return ms, kid
}
