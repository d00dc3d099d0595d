package sessionkey

import (
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/mlkem"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"fmt"
	"math/big"
	"testing"

	"golang.org/x/crypto/chacha20poly1305"
)

// Benchmarks of fkx1. As elsewhere in the repository (scripts/benchtable.awk),
// a benchmark named X/floor is the comparison for its siblings X/...: the
// bench table shows their median time over the floor's, measured in the
// same run.

// BenchmarkHandshake measures the CPU each side spends on one handshake:
// the device's Start, HandleMsg2 and HandleMsg4, and the gateway's
// HandleMsg1 and HandleMsg3. The other side's work runs with the timer
// stopped. Goal: fleetkey/floor ≤ 1.3 for each side and suite.
//
// The floor is the sum of the side's primitives, called directly on the
// same bytes in the same run:
//
//   - X25519: a fresh key pair and one ECDH; suite 2 adds ML-KEM-768 key
//     generation and decapsulation (device) or the encapsulation key's
//     parsing and encapsulation (gateway);
//   - one ECDSA P-256 signature, and one verification of the peer's;
//   - the peer's certificate: x509.ParseCertificate of its leaf and
//     Certificate.Verify against the CA (the leaf is issued directly by
//     it). A side cannot skip this, or the handshake authenticates no one;
//     its share of the floor is the x509 row beside it;
//   - SHA-256 of the transcript (TH1 to TH4 over the same message bytes),
//     HKDF-Extract and the 11 HKDF-Expand of the key schedule (fin g, fin
//     d, master, kid, and the two directions of the epoch), the two finish
//     HMACs, and ChaCha20-Poly1305 over msg4.
//
// What fleetkey adds on top: parsing and encoding the messages, the
// responder's bookkeeping (replay memory, rate limit, pending state), the
// SPIFFE checks of the test verifier, the Sender and Receiver of the new
// epoch, wiping, and allocations.
func BenchmarkHandshake(b *testing.B) {
	for _, suite := range []Suite{Suite1, Suite2} {
		b.Run(fmt.Sprintf("suite%d", suite), func(b *testing.B) {
			h := newBenchHandshake(b, suite)
			b.Run("device", func(b *testing.B) {
				b.Run("floor", h.deviceFloor)
				b.Run("x509", func(b *testing.B) { h.x509(b, h.gwDER) })
				b.Run("fleetkey", h.deviceSide)
			})
			b.Run("gateway", func(b *testing.B) {
				b.Run("floor", h.gatewayFloor)
				b.Run("x509", func(b *testing.B) { h.x509(b, h.devDER) })
				b.Run("fleetkey", h.gatewaySide)
			})
		})
	}
}

// benchHandshake holds the identities and one reference handshake whose
// bytes the floors work on.
type benchHandshake struct {
	suite          Suite
	device         string
	icfg           InitiatorConfig
	rcfg           *ResponderConfig
	devKey, gwKey  *ecdsa.PrivateKey
	devDER, gwDER  []byte
	roots          *x509.CertPool
	msgs           [4][]byte
	m2             *Msg2
	m3             *Msg3
	sigGDER        []byte // sig_G and sig_D as ASN.1, for ecdsa.VerifyASN1
	sigDDER        []byte
	infos          map[string]string // HKDF info of each label
	msg4AAD, nonce []byte
}

func newBenchHandshake(b *testing.B, suite Suite) *benchHandshake {
	p := fleetPKI(b)
	h := &benchHandshake{suite: suite, device: "bench-dev", roots: p.pool, infos: map[string]string{}}
	devID, gwID := p.leaf(b, "device", h.device), p.leaf(b, "gateway", "bench-gw")
	h.devKey, h.gwKey = devID.Signer.(*ecdsa.PrivateKey), gwID.Signer.(*ecdsa.PrivateKey)
	h.devDER, h.gwDER = devID.Chain[0], gwID.Chain[0]
	h.icfg = InitiatorConfig{DeviceID: h.device, Suite: suite, Identity: devID, VerifyGateway: p.gatewayVerifier()}
	var err error
	if h.rcfg, err = NewResponderConfig(ResponderConfig{Identity: gwID, VerifyDevice: p.deviceVerifier()}); err != nil {
		b.Fatal(err)
	}
	in := h.initiator(b)
	resp := NewResponder(h.rcfg, h.device)
	if h.msgs[0], err = in.Start(); err != nil {
		b.Fatal(err)
	}
	if h.msgs[1], err = resp.HandleMsg1(h.msgs[0]); err != nil {
		b.Fatal(err)
	}
	if h.msgs[2], err = in.HandleMsg2(h.msgs[1], nil); err != nil {
		b.Fatal(err)
	}
	if h.msgs[3], _, err = resp.HandleMsg3(h.msgs[2], nil, nil); err != nil {
		b.Fatal(err)
	}
	if _, err = in.HandleMsg4(h.msgs[3], nil); err != nil {
		b.Fatal(err)
	}
	if h.m2, err = ParseMsg2(h.msgs[1]); err != nil {
		b.Fatal(err)
	}
	if h.m3, err = ParseMsg3(h.msgs[2]); err != nil {
		b.Fatal(err)
	}
	h.sigGDER, h.sigDDER = derSig(b, h.m2.Sig), derSig(b, h.m3.Sig)
	for _, l := range []struct {
		label string
		n     int
	}{{"fin g", 32}, {"fin d", 32}, {"kid", 4}, {"d2g", 32}, {"g2d", 32}, {"key", 32}, {"iv", 12}, {"upd", 32}} {
		h.infos[l.label] = string(expandInfo(l.label, nil, l.n))
	}
	kid, _, _, _ := ParseHeader(h.msgs[3])
	h.msg4AAD = appendAAD(nil, kid, 0, h.device, KexChannel)
	h.nonce = make([]byte, chacha20poly1305.NonceSize)
	return h
}

func (h *benchHandshake) initiator(b *testing.B) *Initiator {
	in, err := NewInitiator(h.icfg)
	if err != nil {
		b.Fatal(err)
	}
	return in
}

// expandInfo is the HkdfLabel of L (FKX1.md, Notation), built once for
// the floors.
func expandInfo(label string, context []byte, n int) []byte {
	l := labelPrefix + label
	info := []byte{byte(n >> 8), byte(n), byte(len(l))}
	info = append(append(info, l...), byte(len(context)))
	return append(info, context...)
}

func derSig(b *testing.B, rs []byte) []byte {
	der, err := asn1.Marshal(struct{ R, S *big.Int }{new(big.Int).SetBytes(rs[:32]), new(big.Int).SetBytes(rs[32:])})
	if err != nil {
		b.Fatal(err)
	}
	return der
}

func (h *benchHandshake) deviceSide(b *testing.B) {
	in := h.initiator(b)
	b.ReportAllocs()
	for b.Loop() {
		m1, err := in.Start()
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		resp := NewResponder(h.rcfg, h.device)
		m2, err := resp.HandleMsg1(m1)
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		m3, err := in.HandleMsg2(m2, nil)
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		m4, _, err := resp.HandleMsg3(m3, nil, nil)
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		if _, err := in.HandleMsg4(m4, nil); err != nil {
			b.Fatal(err)
		}
	}
}

func (h *benchHandshake) gatewaySide(b *testing.B) {
	in := h.initiator(b)
	b.ReportAllocs()
	for b.Loop() {
		b.StopTimer()
		resp := NewResponder(h.rcfg, h.device)
		m1, err := in.Start()
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		m2, err := resp.HandleMsg1(m1)
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		m3, err := in.HandleMsg2(m2, nil)
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		if _, _, err := resp.HandleMsg3(m3, nil, nil); err != nil {
			b.Fatal(err)
		}
	}
}

// x509 is the certificate part of a floor alone: parse the peer's leaf
// and verify it against the CA.
func (h *benchHandshake) x509(b *testing.B, der []byte) {
	b.ReportAllocs()
	for b.Loop() {
		h.verifyPeer(b, der)
	}
}

func (h *benchHandshake) verifyPeer(b *testing.B, der []byte) *ecdsa.PublicKey {
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: h.roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		b.Fatal(err)
	}
	return cert.PublicKey.(*ecdsa.PublicKey)
}

// floorHash is SHA-256 over parts, as the transcript hashes are.
func floorHash(parts ...[]byte) []byte {
	d := sha256.New()
	for _, p := range parts {
		d.Write(p)
	}
	return d.Sum(nil)
}

func floorMAC(key []byte, parts ...[]byte) []byte {
	m := hmac.New(sha256.New, key)
	for _, p := range parts {
		m.Write(p)
	}
	return m.Sum(nil)[:16]
}

func (h *benchHandshake) expand(b *testing.B, secret []byte, label string, n int) []byte {
	out, err := hkdf.Expand(sha256.New, secret, h.infos[label], n)
	if err != nil {
		b.Fatal(err)
	}
	return out
}

// schedule is the key schedule after TH4 that both sides run: MS, kid, one
// direction's sender (TS, key, iv) and the other's receiver (TS, key, iv,
// and TS of the next generation).
func (h *benchHandshake) schedule(b *testing.B, prk, th4 []byte) (key []byte) {
	ms, err := hkdf.Expand(sha256.New, prk, string(expandInfo("master", th4, 32)), 32)
	if err != nil {
		b.Fatal(err)
	}
	h.expand(b, ms, "kid", 4)
	send := h.expand(b, ms, "d2g", 32)
	h.expand(b, send, "key", 32)
	h.expand(b, send, "iv", 12)
	recv := h.expand(b, ms, "g2d", 32)
	key = h.expand(b, recv, "key", 32)
	h.expand(b, recv, "iv", 12)
	h.expand(b, recv, "upd", 32)
	return key
}

func (h *benchHandshake) deviceFloor(b *testing.B) {
	m1, m4 := h.msgs[0], h.msgs[3]
	ct := h.m2.Share[:len(h.m2.Share)-32]
	gX, err := ecdh.X25519().NewPublicKey(h.m2.Share[len(h.m2.Share)-32:])
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		// msg1: the ephemeral keys.
		x, err := ecdh.X25519().GenerateKey(rand.Reader)
		if err != nil {
			b.Fatal(err)
		}
		_ = x.PublicKey().Bytes()
		var dk *mlkem.DecapsulationKey768
		if h.suite == Suite2 {
			if dk, err = mlkem.GenerateKey768(); err != nil {
				b.Fatal(err)
			}
			_ = dk.EncapsulationKey().Bytes()
		}
		th1 := floorHash([]byte("fkx1 TH1"), lp(nil, []byte(h.device)), m1)
		// msg2: the shared secret, the transcript, the gateway's
		// certificate, finish and signature. The ciphertext was made for
		// another key: decapsulation rejects it implicitly, in the same time.
		ikm, err := x.ECDH(gX)
		if err != nil {
			b.Fatal(err)
		}
		if h.suite == Suite2 {
			ss, err := dk.Decapsulate(ct)
			if err != nil {
				b.Fatal(err)
			}
			ikm = append(ss, ikm...)
		}
		th2 := floorHash(th1, h.m2.Star)
		prk, err := hkdf.Extract(sha256.New, ikm, th2)
		if err != nil {
			b.Fatal(err)
		}
		fkG, fkD := h.expand(b, prk, "fin g", 32), h.expand(b, prk, "fin d", 32)
		pub := h.verifyPeer(b, h.gwDER)
		hmac.Equal(floorMAC(fkG, th2, lp(nil, h.m2.Sig)), h.m2.Fin)
		d := sha256.Sum256(signedMessage(ContextGateway, th2))
		if !ecdsa.VerifyASN1(pub, d[:], h.sigGDER) {
			b.Fatal("sig_G")
		}
		// msg3: sign and finish.
		th3 := floorHash(th2, lp(nil, h.m2.Sig), h.m2.Fin, h.m3.Star)
		d = sha256.Sum256(signedMessage(ContextDevice, th3))
		if _, err := ecdsa.SignASN1(rand.Reader, h.devKey, d[:]); err != nil {
			b.Fatal(err)
		}
		fin := floorMAC(fkD, th3, lp(nil, h.m3.Sig))
		// msg4: the epoch's keys, and msg4's tag (under other keys here,
		// so it fails, in the same time).
		th4 := floorHash(th3, lp(nil, h.m3.Sig), fin)
		key := h.schedule(b, prk, th4)
		aead, err := chacha20poly1305.New(key)
		if err != nil {
			b.Fatal(err)
		}
		_, _ = aead.Open(nil, h.nonce, m4[6:], h.msg4AAD)
	}
}

func (h *benchHandshake) gatewayFloor(b *testing.B) {
	m1 := h.msgs[0]
	p1, err := ParseMsg1(m1)
	if err != nil {
		b.Fatal(err)
	}
	dX, err := ecdh.X25519().NewPublicKey(p1.Share[len(p1.Share)-32:])
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		// msg1: the key exchange.
		x, err := ecdh.X25519().GenerateKey(rand.Reader)
		if err != nil {
			b.Fatal(err)
		}
		_ = x.PublicKey().Bytes()
		ikm, err := x.ECDH(dX)
		if err != nil {
			b.Fatal(err)
		}
		if h.suite == Suite2 {
			ek, err := mlkem.NewEncapsulationKey768(p1.Share[:mlkem.EncapsulationKeySize768])
			if err != nil {
				b.Fatal(err)
			}
			ss, _ := ek.Encapsulate()
			ikm = append(ss, ikm...)
		}
		th1 := floorHash([]byte("fkx1 TH1"), lp(nil, []byte(h.device)), m1)
		th2 := floorHash(th1, h.m2.Star)
		prk, err := hkdf.Extract(sha256.New, ikm, th2)
		if err != nil {
			b.Fatal(err)
		}
		fkG, fkD := h.expand(b, prk, "fin g", 32), h.expand(b, prk, "fin d", 32)
		d := sha256.Sum256(signedMessage(ContextGateway, th2))
		if _, err := ecdsa.SignASN1(rand.Reader, h.gwKey, d[:]); err != nil {
			b.Fatal(err)
		}
		floorMAC(fkG, th2, lp(nil, h.m2.Sig))
		// msg3: the device's certificate, finish and signature.
		pub := h.verifyPeer(b, h.devDER)
		th3 := floorHash(th2, lp(nil, h.m2.Sig), h.m2.Fin, h.m3.Star)
		hmac.Equal(floorMAC(fkD, th3, lp(nil, h.m3.Sig)), h.m3.Fin)
		d = sha256.Sum256(signedMessage(ContextDevice, th3))
		if !ecdsa.VerifyASN1(pub, d[:], h.sigDDER) {
			b.Fatal("sig_D")
		}
		// msg4: the epoch's keys and msg4.
		th4 := floorHash(th3, lp(nil, h.m3.Sig), h.m3.Fin)
		key := h.schedule(b, prk, th4)
		aead, err := chacha20poly1305.New(key)
		if err != nil {
			b.Fatal(err)
		}
		aead.Seal(make([]byte, 6, msg4Size), h.nonce, nil, h.msg4AAD)
	}
}

var benchSizes = []int{64, 256}

// BenchmarkSeal seals one envelope. The floor is ChaCha20-Poly1305 alone
// (the cipher made from the key, and Seal into a reused buffer) over the
// same plaintext and an AAD of the same size; fleetkey adds the header and
// AAD, the nonce and the new envelope's allocation.
func BenchmarkSeal(b *testing.B) {
	for _, size := range benchSizes {
		b.Run(fmt.Sprintf("%dB", size), func(b *testing.B) {
			pt := make([]byte, size)
			b.Run("floor", func(b *testing.B) {
				key, nonce := testMS, make([]byte, chacha20poly1305.NonceSize)
				aad := appendAAD(nil, testKID, 1, "sensor-0001", "telemetry")
				dst := make([]byte, 0, 6+size+tagSize)
				b.SetBytes(int64(size))
				b.ReportAllocs()
				for b.Loop() {
					aead, err := chacha20poly1305.New(key)
					if err != nil {
						b.Fatal(err)
					}
					dst = aead.Seal(dst[:0], nonce, pt, aad)
				}
			})
			b.Run("fleetkey", func(b *testing.B) {
				s := NewSender(testMS, testKID, D2G, "sensor-0001", 0)
				b.SetBytes(int64(size))
				b.ReportAllocs()
				for b.Loop() {
					if _, err := s.Seal("telemetry", pt); err != nil {
						b.Fatal(err)
					}
				}
			})
		})
	}
}

// BenchmarkOpen opens one envelope, in sequence, with the replay window.
// The floor is ChaCha20-Poly1305's Open of the same ciphertext into a
// reused buffer; fleetkey adds the header, the window and the plaintext's
// allocation. The envelopes come from a ring of 4096 sealed beforehand; a
// fresh receiver takes over, with the timer stopped, each time the ring
// wraps.
func BenchmarkOpen(b *testing.B) {
	const ring = 4096
	for _, size := range benchSizes {
		b.Run(fmt.Sprintf("%dB", size), func(b *testing.B) {
			pt := make([]byte, size)
			s := NewSender(testMS, testKID, D2G, "sensor-0001", 0)
			envs := make([][]byte, ring)
			for i := range envs {
				var err error
				if envs[i], err = s.Seal("telemetry", pt); err != nil {
					b.Fatal(err)
				}
			}
			b.Run("floor", func(b *testing.B) {
				gen := keysOf(trafficSecret0(testMS, D2G), 0)
				env := envs[1]
				_, seq, hl, _ := ParseHeader(env)
				nonce := nonceFor(gen.iv, seq)
				aad := appendAAD(nil, testKID, seq, "sensor-0001", "telemetry")
				dst := make([]byte, 0, size)
				b.SetBytes(int64(size))
				b.ReportAllocs()
				for b.Loop() {
					aead, err := chacha20poly1305.New(gen.key)
					if err != nil {
						b.Fatal(err)
					}
					if dst, err = aead.Open(dst[:0], nonce, env[hl:], aad); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.Run("fleetkey", func(b *testing.B) {
				r := NewReceiver(testMS, testKID, D2G, "sensor-0001")
				i := 0
				b.SetBytes(int64(size))
				b.ReportAllocs()
				for b.Loop() {
					if i == ring {
						b.StopTimer()
						r, i = NewReceiver(testMS, testKID, D2G, "sensor-0001"), 0
						b.StartTimer()
					}
					if _, err := r.Open(envs[i], "telemetry"); err != nil {
						b.Fatal(err)
					}
					i++
				}
			})
		})
	}
}

// BenchmarkEnvelopeOverhead seals 64 bytes at the last seq of each
// uvarint length and reports the envelope's overhead in bytes (FKX1.md,
// Envelope: 22 B for seq < 2^7, 23 B below 2^14, 24 B below 2^21) as the
// metric overhead-B. Each iteration seals at the same seq, from a copy of
// a sender already in that seq's generation.
func BenchmarkEnvelopeOverhead(b *testing.B) {
	for _, c := range []struct {
		name string
		seq  uint64
		want int
	}{{"seq=127", 1<<7 - 1, 22}, {"seq=16383", 1<<14 - 1, 23}, {"seq=2097151", 1<<21 - 1, 24}} {
		b.Run(c.name, func(b *testing.B) {
			base := NewSender(testMS, testKID, D2G, "sensor-0001", c.seq)
			if err := base.advanceTo(uint32(c.seq >> 16)); err != nil {
				b.Fatal(err)
			}
			base.lastSent = int64(c.seq >> 16) // as if it had sent in this generation all along
			pt := make([]byte, 64)
			var env []byte
			b.SetBytes(int64(len(pt)))
			b.ReportAllocs()
			for b.Loop() {
				s := *base
				var err error
				if env, err = s.Seal("telemetry", pt); err != nil {
					b.Fatal(err)
				}
			}
			if _, seq, _, err := ParseHeader(env); err != nil || seq != c.seq {
				b.Fatalf("sealed at seq %d, want %d: %v", seq, c.seq, err)
			}
			over := len(env) - len(pt)
			if over != c.want {
				b.Fatalf("overhead %d B at seq %d, want %d", over, c.seq, c.want)
			}
			b.ReportMetric(float64(over), "overhead-B")
		})
	}
}
