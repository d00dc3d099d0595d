package sessionkey

import (
	"bytes"
	"crypto"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/mlkem"
	"crypto/mlkem/mlkemtest"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/crypto/chacha20poly1305"
)

// Known-answer vectors for fkx1 (FKX1.md, Vectors), in
// testdata/vectors.json; testdata/README.md documents every field.
//
// The file is generated once and committed. TestVectors recomputes every
// value in it three ways: with the package's own functions (TH1..TH4,
// deriveHandshake, masterSecret, the traffic secrets, Sender and Receiver),
// with an implementation of FKX1.md written here from the spec's text alone
// (stdlib and x/crypto only), and through the state machines (Initiator and
// Responder) fed the recorded inputs. ECDSA signatures are randomized, so the
// vectors carry the signatures made: the checks verify them and recompute
// everything after them from their bytes.
//
// go test -run TestVectors -update rewrites the file. The generator derives
// every fixed input from a label, keeps the certificates and signatures
// already in the file while they still verify (so an update that changes
// nothing rewrites the same bytes), and otherwise signs with RFC 6979
// deterministic ECDSA.

var (
	updateVectors = flag.Bool("update", false, "rewrite testdata/vectors.json")
	sweepVectors  = flag.Bool("vectors.sweep", false, "check that a change to any single byte of testdata/vectors.json is refused (slow)")
)

const (
	vectorsPath   = "testdata/vectors.json"
	vectorsAbout  = "fkx1 known-answer vectors; see README.md beside this file and FKX1.md (Vectors). Regenerate with: go test -run TestVectors -update"
	vectorDevice  = "sensor-0001"
	vectorGateway = "gw-1"
)

// vectorTime is when the vectors' certificates are verified.
var vectorTime = time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC)

// hexBytes is a byte string written as lowercase hex in JSON.
type hexBytes []byte

func (h hexBytes) MarshalText() ([]byte, error) { return []byte(hex.EncodeToString(h)), nil }

func (h *hexBytes) UnmarshalText(b []byte) error {
	out, err := hex.DecodeString(string(b))
	*h = out
	return err
}

type vectorFile struct {
	About   string        `json:"about"`
	Vectors []suiteVector `json:"vectors"`
}

type suiteVector struct {
	Suite    Suite  `json:"suite"`
	DeviceID string `json:"device_id"`

	// Static identities (the same in every suite).
	VerifyTime  string   `json:"verify_time"`
	CACert      hexBytes `json:"ca_cert"`
	DeviceKey   hexBytes `json:"device_key"`
	DeviceCert  hexBytes `json:"device_cert"`
	GatewayKey  hexBytes `json:"gateway_key"`
	GatewayCert hexBytes `json:"gateway_cert"`

	// Ephemeral inputs.
	SidD         hexBytes `json:"sid_d"`
	SidG         hexBytes `json:"sid_g"`
	X25519D      hexBytes `json:"x25519_d"`
	MLKEMSeedD   hexBytes `json:"mlkem_seed_d,omitempty"`
	X25519G      hexBytes `json:"x25519_g"`
	MLKEMRandomG hexBytes `json:"mlkem_encaps_random_g,omitempty"`

	// Key exchange.
	ShareD   hexBytes `json:"share_d"`
	ShareG   hexBytes `json:"share_g"`
	X25519SS hexBytes `json:"x25519_ss"`
	MLKEMSS  hexBytes `json:"mlkem_ss,omitempty"`
	IKM      hexBytes `json:"ikm"`
	// MLKEMRejectSS is what the device's key decapsulates from share_g's
	// ciphertext with its first byte XOR 0x01 (implicit rejection): the
	// one value that depends on the second half (z) of mlkem_seed_d.
	MLKEMRejectSS hexBytes `json:"mlkem_reject_ss,omitempty"`

	// Messages.
	CredG hexBytes `json:"cred_g"`
	CredD hexBytes `json:"cred_d"`
	Msg1  hexBytes `json:"msg1"`
	Msg2  hexBytes `json:"msg2"`
	Msg3  hexBytes `json:"msg3"`
	Msg4  hexBytes `json:"msg4"`

	// Transcript and secrets, in the order they are computed.
	TH1  hexBytes `json:"th1"`
	TH2  hexBytes `json:"th2"`
	PRK  hexBytes `json:"prk"`
	FkG  hexBytes `json:"fk_g"`
	FkD  hexBytes `json:"fk_d"`
	SigG hexBytes `json:"sig_g"`
	FinG hexBytes `json:"fin_g"`
	TH3  hexBytes `json:"th3"`
	SigD hexBytes `json:"sig_d"`
	FinD hexBytes `json:"fin_d"`
	TH4  hexBytes `json:"th4"`
	MS   hexBytes `json:"ms"`
	KID  hexBytes `json:"kid"`

	Traffic   []trafficVector  `json:"traffic"`
	Envelopes []envelopeVector `json:"envelopes"`
}

type trafficVector struct {
	Direction  Direction `json:"direction"`
	Generation uint32    `json:"generation"`
	TS         hexBytes  `json:"ts"`
	Key        hexBytes  `json:"key"`
	IV         hexBytes  `json:"iv"`
}

type envelopeVector struct {
	Direction Direction `json:"direction"`
	Seq       uint64    `json:"seq"`
	Channel   string    `json:"channel"`
	Plaintext hexBytes  `json:"plaintext"`
	AAD       hexBytes  `json:"aad"`
	Nonce     hexBytes  `json:"nonce"`
	Envelope  hexBytes  `json:"envelope"`
}

// encodeVectors is the canonical form of the file.
func encodeVectors(f *vectorFile) ([]byte, error) {
	b, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// decodeVectors reads the file strictly: no unknown fields, nothing after
// the object, and exactly its canonical form (lowercase hex, this
// indentation), so that no byte of it goes unchecked.
func decodeVectors(data []byte) (*vectorFile, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var f vectorFile
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("decoding %s: %w", vectorsPath, err)
	}
	again, err := encodeVectors(&f)
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(again, data) {
		return nil, fmt.Errorf("%s is not in its canonical form (lowercase hex, two-space indent, final newline, no unknown fields): first difference at byte %d", vectorsPath, firstDiff(again, data))
	}
	if f.About != vectorsAbout {
		return nil, fmt.Errorf("about: %q, want %q", f.About, vectorsAbout)
	}
	if len(f.Vectors) != 2 || f.Vectors[0].Suite != Suite1 || f.Vectors[1].Suite != Suite2 {
		return nil, errors.New("want one vector for suite 1, then one for suite 2")
	}
	return &f, nil
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// checkVectorFile runs every check on the file's bytes.
func checkVectorFile(data []byte) error {
	f, err := decodeVectors(data)
	if err != nil {
		return err
	}
	var errs []error
	for i := range f.Vectors {
		v := &f.Vectors[i]
		for _, check := range []func(*suiteVector) error{checkVectorWithPackage, checkVectorWithSpec, checkVectorWithStateMachines} {
			if err := check(v); err != nil {
				errs = append(errs, fmt.Errorf("suite %d: %w", v.Suite, err))
			}
		}
	}
	return errors.Join(errs...)
}

func TestVectors(t *testing.T) {
	if *updateVectors {
		old, _ := os.ReadFile(vectorsPath)
		data, err := generateVectorFile(old)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Dir(vectorsPath), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(vectorsPath, data, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("wrote %s (%d bytes)", vectorsPath, len(data))
	}
	data, err := os.ReadFile(vectorsPath)
	if err != nil {
		t.Fatalf("%v (generate it with -update)", err)
	}
	f, err := decodeVectors(data)
	if err != nil {
		t.Fatal(err)
	}
	for i := range f.Vectors {
		v := &f.Vectors[i]
		t.Run(fmt.Sprintf("suite%d", v.Suite), func(t *testing.T) {
			t.Parallel()
			for name, check := range map[string]func(*suiteVector) error{
				"package":        checkVectorWithPackage,
				"spec":           checkVectorWithSpec,
				"state-machines": checkVectorWithStateMachines,
			} {
				if err := check(v); err != nil {
					t.Errorf("recomputed with the %s: %v", name, err)
				}
			}
		})
	}
}

// TestVectorsRegenerate checks that the generator, given the committed file,
// writes it again byte for byte: the file is exactly what the code derives
// from its fixed inputs, and -update is a no-op until something changes.
func TestVectorsRegenerate(t *testing.T) {
	t.Parallel()
	data, err := os.ReadFile(vectorsPath)
	if err != nil {
		t.Fatal(err)
	}
	again, err := generateVectorFile(data)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(again, data) {
		t.Fatalf("regenerating %s changes it at byte %d; run go test -run TestVectors -update if the change is intended", vectorsPath, firstDiff(again, data))
	}
}

// TestVectorsEveryByte changes each byte of the file in turn and checks
// that the checks of TestVectors refuse every version. It takes minutes,
// so it runs only with -vectors.sweep.
func TestVectorsEveryByte(t *testing.T) {
	if !*sweepVectors {
		t.Skip("run with -vectors.sweep")
	}
	data, err := os.ReadFile(vectorsPath)
	if err != nil {
		t.Fatal(err)
	}
	mutated := bytes.Clone(data)
	for i := range data {
		// A hex digit becomes another lowercase hex digit, so the change
		// survives decoding and must be caught by a recomputation.
		mutated[i] = data[i] ^ 1
		if data[i] == '9' {
			mutated[i] = 'a'
		}
		if err := checkVectorFile(mutated); err == nil {
			t.Errorf("byte %d changed from %q to %q and every check passed", i, data[i], mutated[i])
		}
		mutated[i] = data[i]
	}
}

// ---------------------------------------------------------------------------
// Fixed inputs

// fixedBytes derives a fixed input of n ≤ 64 bytes from a label.
func fixedBytes(label string, n int) []byte {
	h := sha512.Sum512([]byte("fkx1 vectors: " + label))
	return h[:n]
}

func vectorKey(label string) *ecdsa.PrivateKey {
	k, err := ecdsa.ParseRawPrivateKey(elliptic.P256(), fixedBytes(label, 32))
	if err != nil {
		panic(err) // a fixed label; a scalar ≥ n would show at once
	}
	return k
}

// rfc6979Signer signs deterministically (RFC 6979), whatever reader it is
// given: the generator's certificates and signatures do not change from run
// to run.
type rfc6979Signer struct{ *ecdsa.PrivateKey }

func (s rfc6979Signer) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return s.PrivateKey.Sign(nil, digest, opts)
}

// replaySigner returns a recorded r ‖ s signature, DER-encoded, after
// checking that it signs the digest asked for: the state machines then
// produce the recorded messages.
type replaySigner struct {
	pub *ecdsa.PublicKey
	sig []byte
}

func (s replaySigner) Public() crypto.PublicKey { return s.pub }

func (s replaySigner) Sign(_ io.Reader, digest []byte, _ crypto.SignerOpts) ([]byte, error) {
	if len(s.sig) != 64 {
		return nil, fmt.Errorf("recorded signature of %d bytes", len(s.sig))
	}
	r, ss := new(big.Int).SetBytes(s.sig[:32]), new(big.Int).SetBytes(s.sig[32:])
	if !ecdsa.Verify(s.pub, digest, r, ss) {
		return nil, errors.New("the recorded signature does not sign this transcript")
	}
	return asn1.Marshal(struct{ R, S *big.Int }{r, ss})
}

// vectorPlaintext is a record or command plaintext: u64(id) ‖ u64(unix_ms) ‖ body.
func vectorPlaintext(id uint64, at time.Time, body string) []byte {
	b := binary.BigEndian.AppendUint64(nil, id)
	b = binary.BigEndian.AppendUint64(b, uint64(at.UnixMilli()))
	return append(b, body...)
}

// vectorEnvelopes are the three envelopes of every suite: the first
// telemetry record, the first command after msg4, and a record after the
// 10-minute jump into generation 1.
func vectorEnvelopes() []envelopeVector {
	return []envelopeVector{
		{Direction: D2G, Seq: 0, Channel: "telemetry", Plaintext: vectorPlaintext(1, vectorTime, `{"temp_c":21.5}`)},
		{Direction: G2D, Seq: 1, Channel: "config", Plaintext: vectorPlaintext(1, vectorTime.Add(time.Second), `{"interval_s":60}`)},
		{Direction: D2G, Seq: 1 << 16, Channel: "telemetry", Plaintext: vectorPlaintext(2, vectorTime.Add(10*time.Minute), `{"temp_c":21.7}`)},
	}
}

// vectorIdentities returns the static certificates: those of old while
// they still verify with the fixed keys, or new ones signed by the fixed CA.
func vectorIdentities(old *suiteVector) (ca, dev, gw []byte, err error) {
	caKey, devKey, gwKey := vectorKey("ca key"), vectorKey("device key"), vectorKey("gateway key")
	if old != nil && checkStatic(old) == nil {
		c, _ := x509.ParseCertificate(old.CACert)
		if pub, ok := c.PublicKey.(*ecdsa.PublicKey); ok && pub.Equal(caKey.Public()) && bytes.Equal(old.DeviceKey, mustBytes(devKey)) && bytes.Equal(old.GatewayKey, mustBytes(gwKey)) {
			return old.CACert, old.DeviceCert, old.GatewayCert, nil
		}
	}
	notBefore := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "fkx1 test vectors CA"},
		NotBefore: notBefore, NotAfter: notBefore.AddDate(20, 0, 0),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	if ca, err = x509.CreateCertificate(nil, caTmpl, caTmpl, caKey.Public(), rfc6979Signer{caKey}); err != nil {
		return nil, nil, nil, err
	}
	caCert, err := x509.ParseCertificate(ca)
	if err != nil {
		return nil, nil, nil, err
	}
	leaf := func(serial int64, role, name string, key *ecdsa.PrivateKey, eku ...x509.ExtKeyUsage) ([]byte, error) {
		u, _ := url.Parse(fmt.Sprintf("spiffe://%s/%s/%s", testDomain, role, name))
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
			NotBefore: notBefore, NotAfter: notBefore.AddDate(10, 0, 0), URIs: []*url.URL{u},
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: eku}
		return x509.CreateCertificate(nil, tmpl, caCert, key.Public(), rfc6979Signer{caKey})
	}
	if dev, err = leaf(2, "device", vectorDevice, devKey, x509.ExtKeyUsageClientAuth); err != nil {
		return nil, nil, nil, err
	}
	if gw, err = leaf(3, "gateway", vectorGateway, gwKey, x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth); err != nil {
		return nil, nil, nil, err
	}
	return ca, dev, gw, nil
}

func mustBytes(k *ecdsa.PrivateKey) []byte {
	b, err := k.Bytes()
	if err != nil {
		panic(err)
	}
	return b
}

// generateVectorFile makes the file's bytes; old is the current file, if
// any, whose certificates and signatures are kept while they verify.
func generateVectorFile(old []byte) ([]byte, error) {
	var prev vectorFile
	if len(old) > 0 {
		_ = json.Unmarshal(old, &prev)
	}
	f := &vectorFile{About: vectorsAbout}
	for _, s := range []Suite{Suite1, Suite2} {
		var o *suiteVector
		for i := range prev.Vectors {
			if prev.Vectors[i].Suite == s {
				o = &prev.Vectors[i]
			}
		}
		v, err := generateVector(s, o)
		if err != nil {
			return nil, fmt.Errorf("suite %d: %w", s, err)
		}
		f.Vectors = append(f.Vectors, *v)
	}
	return encodeVectors(f)
}

// generateVector runs one handshake of suite s on the fixed inputs with
// the package's functions.
func generateVector(s Suite, old *suiteVector) (*suiteVector, error) {
	ca, devCert, gwCert, err := vectorIdentities(old)
	if err != nil {
		return nil, err
	}
	devKey, gwKey := vectorKey("device key"), vectorKey("gateway key")
	label := func(l string, n int) []byte { return fixedBytes(fmt.Sprintf("suite %d %s", s, l), n) }
	v := &suiteVector{
		Suite: s, DeviceID: vectorDevice, VerifyTime: vectorTime.Format(time.RFC3339),
		CACert: ca, DeviceKey: mustBytes(devKey), DeviceCert: devCert, GatewayKey: mustBytes(gwKey), GatewayCert: gwCert,
		SidD: label("sid_d", sidSize), SidG: label("sid_g", sidSize),
		X25519D: clamp(label("x25519_d", 32)), X25519G: clamp(label("x25519_g", 32)),
	}
	if s == Suite2 {
		v.MLKEMSeedD, v.MLKEMRandomG = label("mlkem_seed_d", mlkem.SeedSize), label("mlkem_encaps_random_g", 32)
	}
	// msg1.
	ks, shareD, err := NewDeviceKeyShare(s, bytes.NewReader(concat(v.X25519D, v.MLKEMSeedD)))
	if err != nil {
		return nil, err
	}
	v.ShareD = shareD
	if v.Msg1, err = (&Msg1{Suite: s, SidD: SID(v.SidD), Share: shareD}).Marshal(); err != nil {
		return nil, err
	}
	// The gateway's share, with derandomized ML-KEM encapsulation.
	v.ShareG, v.X25519SS, v.MLKEMSS, err = gatewayShare(s, shareD, v.X25519G, v.MLKEMRandomG)
	if err != nil {
		return nil, err
	}
	v.IKM = concat(v.MLKEMSS, v.X25519SS)
	if ikm, err := ks.Finish(v.ShareG); err != nil || !bytes.Equal(ikm, v.IKM) {
		return nil, fmt.Errorf("the device's IKM differs from the gateway's: %v", err)
	}
	if s == Suite2 {
		ikm, err := ks.Finish(rejectedShare(v.ShareG))
		if err != nil {
			return nil, err
		}
		v.MLKEMRejectSS = ikm[:32]
	}
	if v.CredG, err = AppendChain(nil, [][]byte{gwCert}); err != nil {
		return nil, err
	}
	if v.CredD, err = AppendChain(nil, [][]byte{devCert}); err != nil {
		return nil, err
	}
	// msg2: sign TH2 (or keep the old signature if it still signs it).
	v.TH1 = TH1(v.DeviceID, v.Msg1)
	m2 := &Msg2{Suite: s, SidD: SID(v.SidD), SidG: SID(v.SidG), Share: v.ShareG, Signed: Signed{Sig: make([]byte, 64), Fin: make([]byte, finSize)}}
	if _, err := m2.Marshal(v.CredG); err != nil {
		return nil, err
	}
	v.TH2 = TH2(v.TH1, m2.Star)
	hs, err := deriveHandshake(v.TH2, v.IKM)
	if err != nil {
		return nil, err
	}
	v.PRK, v.FkG, v.FkD = hs.prk, hs.fkG, hs.fkD
	if v.SigG, err = signOrKeep(gwKey, ContextGateway, v.TH2, old, func(o *suiteVector) []byte { return o.SigG }); err != nil {
		return nil, err
	}
	v.FinG = finish(hs.fkG, v.TH2, v.SigG)
	m2.Signed = Signed{Sig: v.SigG, Fin: v.FinG}
	if v.Msg2, err = m2.Marshal(v.CredG); err != nil {
		return nil, err
	}
	// msg3.
	m3 := &Msg3{Suite: s, SidD: SID(v.SidD), SidG: SID(v.SidG), Signed: Signed{Sig: make([]byte, 64), Fin: make([]byte, finSize)}}
	if _, err := m3.Marshal(v.CredD); err != nil {
		return nil, err
	}
	v.TH3 = TH3(v.TH2, v.SigG, v.FinG, m3.Star)
	if v.SigD, err = signOrKeep(devKey, ContextDevice, v.TH3, old, func(o *suiteVector) []byte { return o.SigD }); err != nil {
		return nil, err
	}
	v.FinD = finish(hs.fkD, v.TH3, v.SigD)
	m3.Signed = Signed{Sig: v.SigD, Fin: v.FinD}
	if v.Msg3, err = m3.Marshal(v.CredD); err != nil {
		return nil, err
	}
	v.TH4 = TH4(v.TH3, v.SigD, v.FinD)
	ms, kid := masterSecret(v.PRK, v.TH4)
	v.MS, v.KID = ms, kid[:]
	for _, x := range []Direction{D2G, G2D} {
		ts := trafficSecret0(ms, x)
		for g := uint32(0); g < 2; g++ {
			gen := keysOf(ts, g)
			v.Traffic = append(v.Traffic, trafficVector{Direction: x, Generation: g, TS: ts, Key: gen.key, IV: gen.iv[:]})
			ts = nextSecret(ts)
		}
	}
	// msg4 and the envelopes.
	senders := map[Direction]*Sender{D2G: NewSender(ms, kid, D2G, v.DeviceID, 0), G2D: NewSender(ms, kid, G2D, v.DeviceID, 0)}
	if v.Msg4, err = senders[G2D].Seal(KexChannel, nil); err != nil {
		return nil, err
	}
	for _, e := range vectorEnvelopes() {
		if e.Envelope, err = sealAt(senders[e.Direction], e.Seq, e.Channel, e.Plaintext); err != nil {
			return nil, err
		}
		gen := v.traffic(e.Direction, uint32(e.Seq>>16))
		e.AAD = appendAAD(nil, kid, e.Seq, v.DeviceID, e.Channel)
		e.Nonce = nonceFor(iv12(gen.IV), e.Seq)
		v.Envelopes = append(v.Envelopes, e)
	}
	return v, nil
}

// clamp is decodeScalar25519 of RFC 7748: the vectors store X25519
// scalars already clamped, so that every bit of them is significant.
func clamp(k []byte) []byte {
	k = bytes.Clone(k)
	k[0] &= 248
	k[31] &= 127
	k[31] |= 64
	return k
}

func clamped(k []byte) bool { return len(k) == 32 && bytes.Equal(clamp(k), k) }

// rejectedShare is share_g with the first byte of its ML-KEM ciphertext
// flipped, for the implicit-rejection value.
func rejectedShare(shareG []byte) []byte {
	b := bytes.Clone(shareG)
	b[0] ^= 0x01
	return b
}

func concat(parts ...[]byte) []byte {
	var out []byte
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// gatewayShare is GatewayKeyShare with the ML-KEM randomness given
// (crypto/mlkem/mlkemtest), which the package's function cannot take.
func gatewayShare(s Suite, shareD, x25519G, random []byte) (shareG, xss, mss []byte, err error) {
	d, _, ok := shareSizes(s)
	if !ok || len(shareD) != d {
		return nil, nil, nil, fmt.Errorf("share_d of %d bytes", len(shareD))
	}
	xk, err := ecdh.X25519().NewPrivateKey(x25519G)
	if err != nil {
		return nil, nil, nil, err
	}
	if xss, err = x25519(xk, shareD[len(shareD)-32:]); err != nil {
		return nil, nil, nil, err
	}
	if s == Suite1 {
		return xk.PublicKey().Bytes(), xss, nil, nil
	}
	ek, err := mlkem.NewEncapsulationKey768(shareD[:mlkem.EncapsulationKeySize768])
	if err != nil {
		return nil, nil, nil, err
	}
	mss, ct, err := mlkemtest.Encapsulate768(ek, random)
	if err != nil {
		return nil, nil, nil, err
	}
	return concat(ct, xk.PublicKey().Bytes()), xss, mss, nil
}

func signOrKeep(key *ecdsa.PrivateKey, context string, th []byte, old *suiteVector, pick func(*suiteVector) []byte) ([]byte, error) {
	if old != nil {
		if sig := pick(old); Verify(key.Public(), context, th, sig) == nil {
			return sig, nil
		}
	}
	return Sign(rfc6979Signer{key}, nil, context, th)
}

// sealAt seals at seq: it jumps to seq's generation and refuses to seal
// filler to get there.
func sealAt(s *Sender, seq uint64, channel string, pt []byte) ([]byte, error) {
	for s.Seq()>>16 < seq>>16 {
		if err := s.Jump(); err != nil {
			return nil, err
		}
	}
	if s.Seq() != seq {
		return nil, fmt.Errorf("the sender is at seq %d, not %d", s.Seq(), seq)
	}
	return s.Seal(channel, pt)
}

// iv12 is an iv as an array; a wrong length shows as a mismatch elsewhere.
func iv12(b []byte) (iv [12]byte) {
	copy(iv[:], b)
	return iv
}

func (v *suiteVector) traffic(x Direction, g uint32) trafficVector {
	for _, tv := range v.Traffic {
		if tv.Direction == x && tv.Generation == g {
			return tv
		}
	}
	return trafficVector{IV: make([]byte, 12)}
}

// ---------------------------------------------------------------------------
// Checks

// mismatches collects what a check found wrong.
type mismatches []error

func (m *mismatches) eq(field string, got, want []byte) {
	if bytes.Equal(got, want) {
		return
	}
	if len(got) <= 64 && len(want) <= 64 {
		*m = append(*m, fmt.Errorf("%s: computed %x, the vector has %x", field, got, want))
		return
	}
	*m = append(*m, fmt.Errorf("%s: computed %d bytes, the vector has %d; first difference at byte %d", field, len(got), len(want), firstDiff(got, want)))
}

func (m *mismatches) ok(what string, err error) {
	if err != nil {
		*m = append(*m, fmt.Errorf("%s: %w", what, err))
	}
}

func (m *mismatches) err() error { return errors.Join(*m...) }

// vectorStatic is a vector's parsed static identities.
type vectorStatic struct {
	at            time.Time
	ca, dev, gw   *x509.Certificate
	devKey, gwKey *ecdsa.PrivateKey
}

func parseStatic(v *suiteVector) (*vectorStatic, error) {
	st := &vectorStatic{}
	var err error
	if st.at, err = time.Parse(time.RFC3339, v.VerifyTime); err != nil {
		return nil, err
	}
	if !st.at.Equal(vectorTime) || v.VerifyTime != vectorTime.Format(time.RFC3339) {
		return nil, fmt.Errorf("verify_time %s, want %s", v.VerifyTime, vectorTime.Format(time.RFC3339))
	}
	if v.DeviceID != vectorDevice {
		return nil, fmt.Errorf("device_id %q, want %q", v.DeviceID, vectorDevice)
	}
	for _, c := range []struct {
		name string
		der  []byte
		out  **x509.Certificate
	}{{"ca_cert", v.CACert, &st.ca}, {"device_cert", v.DeviceCert, &st.dev}, {"gateway_cert", v.GatewayCert, &st.gw}} {
		if *c.out, err = x509.ParseCertificate(c.der); err != nil {
			return nil, fmt.Errorf("%s: %w", c.name, err)
		}
	}
	if st.devKey, err = ecdsa.ParseRawPrivateKey(elliptic.P256(), v.DeviceKey); err != nil {
		return nil, fmt.Errorf("device_key: %w", err)
	}
	if st.gwKey, err = ecdsa.ParseRawPrivateKey(elliptic.P256(), v.GatewayKey); err != nil {
		return nil, fmt.Errorf("gateway_key: %w", err)
	}
	return st, nil
}

// verifyChain is the fkx1 peer check for the vectors' PKI: the chain to
// the CA at verify_time, and the leaf's one SPIFFE ID.
func (st *vectorStatic) verifyChain(chain []*x509.Certificate, role, name string) error {
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(st.ca)
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: st.at, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return err
	}
	want := fmt.Sprintf("spiffe://%s/%s/%s", testDomain, role, name)
	if len(chain[0].URIs) != 1 || chain[0].URIs[0].String() != want {
		return fmt.Errorf("leaf names %v, want %s", chain[0].URIs, want)
	}
	return nil
}

// checkStatic checks the identities: the CA signs itself and both leaves,
// each key belongs to its certificate, and the leaves carry the right
// SPIFFE IDs.
func checkStatic(v *suiteVector) error {
	st, err := parseStatic(v)
	if err != nil {
		return err
	}
	var m mismatches
	if !st.ca.IsCA {
		m.ok("ca_cert", errors.New("not a CA"))
	}
	m.ok("ca_cert self-signature", st.ca.CheckSignatureFrom(st.ca))
	m.ok("device_cert", st.verifyChain([]*x509.Certificate{st.dev}, "device", v.DeviceID))
	m.ok("gateway_cert", st.verifyChain([]*x509.Certificate{st.gw}, "gateway", vectorGateway))
	if !st.devKey.PublicKey.Equal(st.dev.PublicKey) {
		m.ok("device_key", errors.New("not the key of device_cert"))
	}
	if !st.gwKey.PublicKey.Equal(st.gw.PublicKey) {
		m.ok("gateway_key", errors.New("not the key of gateway_cert"))
	}
	return m.err()
}

// exactReader serves parts and reports whether they were read to the end.
type exactReader struct{ *bytes.Reader }

func newExactReader(parts ...[]byte) exactReader {
	return exactReader{bytes.NewReader(concat(parts...))}
}

func (r exactReader) used(what string) error {
	if r.Len() != 0 {
		return fmt.Errorf("%s left %d of its fixed random bytes unread", what, r.Len())
	}
	return nil
}

// checkVectorWithPackage recomputes the vector with the package's own
// functions.
func checkVectorWithPackage(v *suiteVector) error {
	var m mismatches
	m.ok("static identities", checkStatic(v))
	st, err := parseStatic(v)
	if err != nil {
		return err
	}
	s := v.Suite
	if len(v.SidD) != sidSize || len(v.SidG) != sidSize {
		return fmt.Errorf("sids of %d and %d bytes", len(v.SidD), len(v.SidG))
	}
	if (s == Suite1) != (len(v.MLKEMSeedD) == 0 && len(v.MLKEMRandomG) == 0 && len(v.MLKEMSS) == 0 && len(v.MLKEMRejectSS) == 0) {
		m.ok("ML-KEM fields", errors.New("present in suite 1 or missing in suite 2"))
	}
	if !clamped(v.X25519D) || !clamped(v.X25519G) {
		m.ok("x25519_d, x25519_g", errors.New("not clamped scalars (RFC 7748)"))
	}
	// Key shares and IKM.
	rd := newExactReader(v.X25519D, v.MLKEMSeedD)
	ks, shareD, err := NewDeviceKeyShare(s, rd)
	if err != nil {
		return fmt.Errorf("NewDeviceKeyShare: %w", err)
	}
	m.ok("NewDeviceKeyShare", rd.used("NewDeviceKeyShare"))
	m.eq("share_d", shareD, v.ShareD)
	shareG, xss, mss, err := gatewayShare(s, v.ShareD, v.X25519G, v.MLKEMRandomG)
	if err != nil {
		return fmt.Errorf("share_g: %w", err)
	}
	m.eq("share_g", shareG, v.ShareG)
	m.eq("x25519_ss", xss, v.X25519SS)
	m.eq("mlkem_ss", mss, v.MLKEMSS)
	m.eq("ikm", concat(mss, xss), v.IKM)
	ikm, err := ks.Finish(v.ShareG)
	m.ok("DeviceKeyShare.Finish", err)
	m.eq("ikm (device side)", ikm, v.IKM)
	if s == Suite2 && len(v.ShareG) > 0 {
		ikm, err := ks.Finish(rejectedShare(v.ShareG))
		m.ok("DeviceKeyShare.Finish of a rejected ciphertext", err)
		if len(ikm) == 64 {
			m.eq("mlkem_reject_ss", ikm[:32], v.MLKEMRejectSS)
			m.eq("x25519 half of a rejected ciphertext's IKM", ikm[32:], v.X25519SS)
		}
	}
	// GatewayKeyShare takes no ML-KEM randomness: its X25519 half must
	// match, and its whole IKM must be what the device decapsulates.
	rg := newExactReader(v.X25519G)
	gShare, gIKM, err := GatewayKeyShare(s, v.ShareD, rg)
	m.ok("GatewayKeyShare", err)
	m.ok("GatewayKeyShare", rg.used("GatewayKeyShare"))
	if err == nil {
		_, g, _ := shareSizes(s)
		if len(gShare) != g || len(gIKM) != len(v.IKM) {
			m.ok("GatewayKeyShare", fmt.Errorf("share of %d and IKM of %d bytes", len(gShare), len(gIKM)))
		} else {
			m.eq("GatewayKeyShare's X25519 share", gShare[g-32:], v.ShareG[len(v.ShareG)-32:])
			m.eq("GatewayKeyShare's X25519 output", gIKM[len(gIKM)-32:], v.X25519SS)
			if s == Suite1 {
				m.eq("GatewayKeyShare's share", gShare, v.ShareG)
			}
			dIKM, err := ks.Finish(gShare)
			m.ok("Finish of GatewayKeyShare's share", err)
			m.eq("GatewayKeyShare's IKM as the device decapsulates it", dIKM, gIKM)
		}
	}
	// Credentials.
	credG, err := AppendChain(nil, [][]byte{v.GatewayCert})
	m.ok("AppendChain", err)
	m.eq("cred_g", credG, v.CredG)
	credD, err := AppendChain(nil, [][]byte{v.DeviceCert})
	m.ok("AppendChain", err)
	m.eq("cred_d", credD, v.CredD)
	// msg1.
	msg1, err := (&Msg1{Suite: s, SidD: SID(v.SidD), Share: v.ShareD}).Marshal()
	m.ok("Msg1.Marshal", err)
	m.eq("msg1", msg1, v.Msg1)
	if p1, err := ParseMsg1(v.Msg1); err != nil {
		m.ok("ParseMsg1", err)
	} else {
		m.eq("ParseMsg1 sid_d", p1.SidD[:], v.SidD)
		m.eq("ParseMsg1 share", p1.Share, v.ShareD)
		again, err := p1.Marshal()
		m.ok("ParseMsg1 re-encode", err)
		m.eq("msg1 re-encoded", again, v.Msg1)
	}
	// msg2 and the handshake secrets.
	th1 := TH1(v.DeviceID, v.Msg1)
	m.eq("th1", th1, v.TH1)
	m2 := &Msg2{Suite: s, SidD: SID(v.SidD), SidG: SID(v.SidG), Share: v.ShareG, Signed: Signed{Sig: v.SigG, Fin: v.FinG}}
	msg2, err := m2.Marshal(v.CredG)
	m.ok("Msg2.Marshal", err)
	m.eq("msg2", msg2, v.Msg2)
	th2 := TH2(v.TH1, m2.Star)
	m.eq("th2", th2, v.TH2)
	hs, err := deriveHandshake(v.TH2, v.IKM)
	if err != nil {
		return fmt.Errorf("deriveHandshake: %w", err)
	}
	m.eq("prk", hs.prk, v.PRK)
	m.eq("fk_g", hs.fkG, v.FkG)
	m.eq("fk_d", hs.fkD, v.FkD)
	m.ok("sig_g", Verify(st.gw.PublicKey, ContextGateway, v.TH2, v.SigG))
	m.eq("fin_g", finish(v.FkG, v.TH2, v.SigG), v.FinG)
	if !checkFinish(v.FkG, v.TH2, v.SigG, v.FinG) {
		m.ok("checkFinish", errors.New("refuses fin_g"))
	}
	if p2, err := ParseMsg2(v.Msg2); err != nil {
		m.ok("ParseMsg2", err)
	} else {
		m.eq("ParseMsg2 msg2*", p2.Star, m2.Star)
		m.eq("ParseMsg2 cred", p2.Cred.Raw, v.CredG)
		m.eq("ParseMsg2 sig", p2.Sig, v.SigG)
		m.eq("ParseMsg2 fin", p2.Fin, v.FinG)
		m.eq("ParseMsg2 share", p2.Share, v.ShareG)
		m.eq("ParseMsg2 sids", concat(p2.SidD[:], p2.SidG[:]), concat(v.SidD, v.SidG))
		again, err := p2.Marshal(p2.Cred.Raw)
		m.ok("ParseMsg2 re-encode", err)
		m.eq("msg2 re-encoded", again, v.Msg2)
	}
	// msg3.
	m3 := &Msg3{Suite: s, SidD: SID(v.SidD), SidG: SID(v.SidG), Signed: Signed{Sig: v.SigD, Fin: v.FinD}}
	msg3, err := m3.Marshal(v.CredD)
	m.ok("Msg3.Marshal", err)
	m.eq("msg3", msg3, v.Msg3)
	m.eq("th3", TH3(v.TH2, v.SigG, v.FinG, m3.Star), v.TH3)
	m.ok("sig_d", Verify(st.dev.PublicKey, ContextDevice, v.TH3, v.SigD))
	m.eq("fin_d", finish(v.FkD, v.TH3, v.SigD), v.FinD)
	if p3, err := ParseMsg3(v.Msg3); err != nil {
		m.ok("ParseMsg3", err)
	} else {
		m.eq("ParseMsg3 msg3*", p3.Star, m3.Star)
		m.eq("ParseMsg3 cred", p3.Cred.Raw, v.CredD)
		m.eq("ParseMsg3 sig", p3.Sig, v.SigD)
		m.eq("ParseMsg3 fin", p3.Fin, v.FinD)
		again, err := p3.Marshal(p3.Cred.Raw)
		m.ok("ParseMsg3 re-encode", err)
		m.eq("msg3 re-encoded", again, v.Msg3)
	}
	m.eq("th4", TH4(v.TH3, v.SigD, v.FinD), v.TH4)
	ms, kid := masterSecret(v.PRK, v.TH4)
	m.eq("ms", ms, v.MS)
	m.eq("kid", kid[:], v.KID)
	// Traffic secrets, keys and ivs.
	if len(v.Traffic) != 4 {
		m.ok("traffic", fmt.Errorf("%d entries, want 4", len(v.Traffic)))
	}
	for i, tv := range v.Traffic {
		x, g := []Direction{D2G, D2G, G2D, G2D}[i%4], uint32(i%2)
		if tv.Direction != x || tv.Generation != g {
			m.ok("traffic", fmt.Errorf("entry %d is %s generation %d, want %s generation %d", i, tv.Direction, tv.Generation, x, g))
			continue
		}
		ts := trafficSecret0(v.MS, x)
		if g == 1 {
			ts = nextSecret(ts)
		}
		gen := keysOf(ts, g)
		name := fmt.Sprintf("traffic %s g%d ", x, g)
		m.eq(name+"ts", ts, tv.TS)
		m.eq(name+"key", gen.key, tv.Key)
		m.eq(name+"iv", gen.iv[:], tv.IV)
	}
	// msg4 and the envelopes: sealed by a Sender, opened by a Receiver.
	if len(v.KID) != len(KID{}) {
		return errors.Join(append(m, fmt.Errorf("kid of %d bytes", len(v.KID)))...)
	}
	vkid := KID(v.KID)
	senders := map[Direction]*Sender{D2G: NewSender(v.MS, vkid, D2G, v.DeviceID, 0), G2D: NewSender(v.MS, vkid, G2D, v.DeviceID, 0)}
	receivers := map[Direction]*Receiver{D2G: NewReceiver(v.MS, vkid, D2G, v.DeviceID), G2D: NewReceiver(v.MS, vkid, G2D, v.DeviceID)}
	msg4, err := senders[G2D].Seal(KexChannel, nil)
	m.ok("sealing msg4", err)
	m.eq("msg4", msg4, v.Msg4)
	if len(v.Msg4) != msg4Size {
		m.ok("msg4", fmt.Errorf("%d bytes, want %d", len(v.Msg4), msg4Size))
	}
	if pt, err := receivers[G2D].Open(v.Msg4, KexChannel); err != nil || len(pt) != 0 {
		m.ok("opening msg4", fmt.Errorf("%d bytes of plaintext, %v", len(pt), err))
	}
	want := vectorEnvelopes()
	if len(v.Envelopes) != len(want) {
		m.ok("envelopes", fmt.Errorf("%d, want %d", len(v.Envelopes), len(want)))
	}
	for i, e := range v.Envelopes {
		name := fmt.Sprintf("envelope %d ", i)
		if i < len(want) && (e.Direction != want[i].Direction || e.Seq != want[i].Seq || e.Channel != want[i].Channel || !bytes.Equal(e.Plaintext, want[i].Plaintext)) {
			m.ok(name, fmt.Errorf("%s seq %d on %q is not the envelope the generator makes", e.Direction, e.Seq, e.Channel))
		}
		snd, rcv := senders[e.Direction], receivers[e.Direction]
		if snd == nil {
			m.ok(name, fmt.Errorf("direction %q", e.Direction))
			continue
		}
		env, err := sealAt(snd, e.Seq, e.Channel, e.Plaintext)
		m.ok(name+"seal", err)
		m.eq(name+"envelope", env, e.Envelope)
		tv := v.traffic(e.Direction, uint32(e.Seq>>16))
		m.eq(name+"aad", appendAAD(nil, vkid, e.Seq, v.DeviceID, e.Channel), e.AAD)
		m.eq(name+"nonce", nonceFor(iv12(tv.IV), e.Seq), e.Nonce)
		if k, seq, hl, err := ParseHeader(e.Envelope); err != nil || k != vkid || seq != e.Seq || hl != 5+uvarintLen(e.Seq) {
			m.ok(name+"ParseHeader", fmt.Errorf("kid %x seq %d header %d: %v", k, seq, hl, err))
		}
		pt, err := rcv.Open(e.Envelope, e.Channel)
		m.ok(name+"open", err)
		m.eq(name+"plaintext", pt, e.Plaintext)
	}
	return m.err()
}

// checkVectorWithStateMachines feeds the vector to an Initiator and a
// Responder whose randomness is the recorded ephemeral inputs and whose
// signers replay the recorded signatures, and checks that they send the
// recorded messages and agree on the epoch. The Responder's ML-KEM
// encapsulation cannot be derandomized (GatewayKeyShare draws from
// crypto/rand), so for suite 2 the gateway's side is checked up to its
// X25519 share.
func checkVectorWithStateMachines(v *suiteVector) error {
	st, err := parseStatic(v)
	if err != nil {
		return err
	}
	var m mismatches
	now := func() time.Time { return st.at }
	devID := Identity{Signer: replaySigner{&st.devKey.PublicKey, v.SigD}, Chain: [][]byte{v.DeviceCert}}
	gwID := Identity{Signer: replaySigner{&st.gwKey.PublicKey, v.SigG}, Chain: [][]byte{v.GatewayCert}}

	// The device.
	rd := newExactReader(v.SidD, v.X25519D, v.MLKEMSeedD)
	in, err := NewInitiator(InitiatorConfig{DeviceID: v.DeviceID, Suite: v.Suite, Identity: devID, Rand: rd, Now: now,
		VerifyGateway: func(chain []*x509.Certificate) error { return st.verifyChain(chain, "gateway", vectorGateway) }})
	if err != nil {
		return err
	}
	msg1, err := in.Start()
	m.ok("Initiator.Start", err)
	m.eq("msg1 from the Initiator", msg1, v.Msg1)
	msg3, err := in.HandleMsg2(v.Msg2, nil)
	m.ok("Initiator.HandleMsg2", err)
	m.ok("Initiator", rd.used("the Initiator"))
	m.eq("msg3 from the Initiator", msg3, v.Msg3)
	devEp, err := in.HandleMsg4(v.Msg4, nil)
	if err != nil {
		return errors.Join(append(m, fmt.Errorf("Initiator.HandleMsg4: %w", err))...)
	}
	m.eq("the Initiator's kid", devEp.KID[:], v.KID)

	// The gateway.
	rg := newExactReader(v.SidG, v.X25519G)
	cfg, err := NewResponderConfig(ResponderConfig{Suites: []Suite{v.Suite}, Identity: gwID, Rand: rg, Now: now,
		VerifyDevice: func(id string, chain []*x509.Certificate) error { return st.verifyChain(chain, "device", id) }})
	if err != nil {
		return err
	}
	resp := NewResponder(cfg, v.DeviceID)
	var gwEp *Epoch
	if v.Suite == Suite1 {
		msg2, err := resp.HandleMsg1(v.Msg1)
		m.ok("Responder.HandleMsg1", err)
		m.ok("Responder", rg.used("the Responder"))
		m.eq("msg2 from the Responder", msg2, v.Msg2)
		msg4, ep, err := resp.HandleMsg3(v.Msg3, nil, nil)
		m.ok("Responder.HandleMsg3", err)
		m.eq("msg4 from the Responder", msg4, v.Msg4)
		if ep != nil {
			m.eq("the Responder's kid", ep.KID[:], v.KID)
			gwEp = ep
		}
	} else {
		// Sign with the real key: the transcript is not the vector's.
		cfg.Identity.Signer = st.gwKey
		cfg.Rand = io.MultiReader(rg, rand.Reader)
		msg2, err := resp.HandleMsg1(v.Msg1)
		m.ok("Responder.HandleMsg1", err)
		if p2, err := ParseMsg2(msg2); err != nil {
			m.ok("the Responder's msg2", err)
		} else {
			m.eq("the Responder's sids", concat(p2.SidD[:], p2.SidG[:]), concat(v.SidD, v.SidG))
			m.eq("the Responder's X25519 share", p2.Share[len(p2.Share)-32:], v.ShareG[len(v.ShareG)-32:])
			m.eq("the Responder's cred_g", p2.Cred.Raw, v.CredG)
		}
	}

	// Envelopes: each direction's sender is the device's or the gateway's
	// epoch; the other side opens.
	for i, e := range v.Envelopes {
		name := fmt.Sprintf("envelope %d ", i)
		own, peer := devEp, gwEp
		if e.Direction == G2D {
			own, peer = gwEp, devEp
		}
		if own != nil {
			env, err := sealAt(own.Send, e.Seq, e.Channel, e.Plaintext)
			m.ok(name+"seal by the epoch", err)
			m.eq(name+"sealed by the epoch", env, e.Envelope)
		}
		if peer != nil {
			pt, err := peer.Recv.Open(e.Envelope, e.Channel)
			m.ok(name+"open by the epoch", err)
			m.eq(name+"opened by the epoch", pt, e.Plaintext)
		}
	}
	return m.err()
}

// ---------------------------------------------------------------------------
// FKX1.md from its text alone, without the package's functions

// specL is L(secret, label, context, n) of FKX1.md, Notation.
func specL(secret []byte, label string, context []byte, n int) []byte {
	l := "fkx1 " + label
	info := []byte{byte(n >> 8), byte(n), byte(len(l))}
	info = append(append(append(info, l...), byte(len(context))), context...)
	out, err := hkdf.Expand(sha256.New, secret, string(info), n)
	if err != nil {
		panic(err)
	}
	return out
}

func specLP(x []byte) []byte { return append([]byte{byte(len(x) >> 8), byte(len(x))}, x...) }

func specH(parts ...[]byte) []byte {
	h := sha256.Sum256(concat(parts...))
	return h[:]
}

func specVerify(pub *ecdsa.PublicKey, context string, th, sig []byte) error {
	if len(sig) != 64 {
		return fmt.Errorf("signature of %d bytes", len(sig))
	}
	d := sha256.Sum256(concat([]byte(context), []byte{0}, th))
	if !ecdsa.Verify(pub, d[:], new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])) {
		return errors.New("does not verify")
	}
	return nil
}

// checkVectorWithSpec recomputes the vector from FKX1.md's formulas with
// the standard library only.
func checkVectorWithSpec(v *suiteVector) error {
	st, err := parseStatic(v)
	if err != nil {
		return err
	}
	var m mismatches
	s := byte(v.Suite)
	xD, err := ecdh.X25519().NewPrivateKey(v.X25519D)
	if err != nil {
		return fmt.Errorf("x25519_d: %w", err)
	}
	xG, err := ecdh.X25519().NewPrivateKey(v.X25519G)
	if err != nil {
		return fmt.Errorf("x25519_g: %w", err)
	}
	// Suites.
	xPubD, xPubG := xD.PublicKey().Bytes(), xG.PublicKey().Bytes()
	ikm, err := xG.ECDH(xD.PublicKey())
	m.ok("X25519 (gateway side)", err)
	ikmD, err := xD.ECDH(xG.PublicKey())
	m.ok("X25519 (device side)", err)
	m.eq("x25519_ss (device side, spec)", ikmD, ikm)
	shareD, shareG := xPubD, xPubG
	m.eq("x25519_ss (spec)", ikm, v.X25519SS)
	if s == 2 {
		dk, err := mlkem.NewDecapsulationKey768(v.MLKEMSeedD)
		if err != nil {
			return fmt.Errorf("mlkem_seed_d: %w", err)
		}
		shareD = concat(dk.EncapsulationKey().Bytes(), xPubD)
		ss, ct, err := mlkemtest.Encapsulate768(dk.EncapsulationKey(), v.MLKEMRandomG)
		if err != nil {
			return err
		}
		shareG = concat(ct, xPubG)
		dss, err := dk.Decapsulate(ct)
		m.ok("ML-KEM decapsulation", err)
		m.eq("mlkem_ss (device side, spec)", dss, ss)
		rss, err := dk.Decapsulate(rejectedShare(ct))
		m.ok("ML-KEM decapsulation of a rejected ciphertext", err)
		m.eq("mlkem_reject_ss (spec)", rss, v.MLKEMRejectSS)
		m.eq("mlkem_ss (spec)", ss, v.MLKEMSS)
		ikm = concat(ss, ikm)
	}
	m.eq("share_d (spec)", shareD, v.ShareD)
	m.eq("share_g (spec)", shareG, v.ShareG)
	m.eq("ikm (spec)", ikm, v.IKM)
	// Credentials and messages.
	cred := func(der []byte) []byte { return concat([]byte{1, 0, 1}, specLP(der)) }
	credG, credD := cred(v.GatewayCert), cred(v.DeviceCert)
	m.eq("cred_g (spec)", credG, v.CredG)
	m.eq("cred_d (spec)", credD, v.CredD)
	msg1 := concat([]byte{1, 1, s}, v.SidD, shareD)
	m.eq("msg1 (spec)", msg1, v.Msg1)
	msg2s := concat([]byte{1, 2, s}, v.SidD, v.SidG, shareG, credG)
	m.eq("msg2 (spec)", concat(msg2s, specLP(v.SigG), v.FinG), v.Msg2)
	msg3s := concat([]byte{1, 3, s}, v.SidD, v.SidG, credD)
	m.eq("msg3 (spec)", concat(msg3s, specLP(v.SigD), v.FinD), v.Msg3)
	// The transcript and key schedule.
	th1 := specH([]byte("fkx1 TH1"), specLP([]byte(v.DeviceID)), msg1)
	th2 := specH(th1, msg2s)
	prk, err := hkdf.Extract(sha256.New, ikm, th2)
	if err != nil {
		return err
	}
	fkG, fkD := specL(prk, "fin g", nil, 32), specL(prk, "fin d", nil, 32)
	m.ok("sig_g (spec)", specVerify(&st.gwKey.PublicKey, "fkx1 gateway sig", th2, v.SigG))
	mac := func(k []byte, parts ...[]byte) []byte {
		h := hmac.New(sha256.New, k)
		h.Write(concat(parts...))
		return h.Sum(nil)[:16]
	}
	finG := mac(fkG, th2, specLP(v.SigG))
	th3 := specH(th2, specLP(v.SigG), finG, msg3s)
	m.ok("sig_d (spec)", specVerify(&st.devKey.PublicKey, "fkx1 device sig", th3, v.SigD))
	finD := mac(fkD, th3, specLP(v.SigD))
	th4 := specH(th3, specLP(v.SigD), finD)
	ms := specL(prk, "master", th4, 32)
	kid := specL(ms, "kid", nil, 4)
	for _, c := range []struct {
		name      string
		got, want []byte
	}{{"th1", th1, v.TH1}, {"th2", th2, v.TH2}, {"prk", prk, v.PRK}, {"fk_g", fkG, v.FkG}, {"fk_d", fkD, v.FkD},
		{"fin_g", finG, v.FinG}, {"th3", th3, v.TH3}, {"fin_d", finD, v.FinD}, {"th4", th4, v.TH4}, {"ms", ms, v.MS}, {"kid", kid, v.KID}} {
		m.eq(c.name+" (spec)", c.got, c.want)
	}
	keys := map[Direction][2][]byte{} // key and iv per generation, by direction
	ivs := map[Direction][2][]byte{}
	for i, tv := range v.Traffic {
		ts := specL(ms, string(tv.Direction), nil, 32)
		for range tv.Generation {
			ts = specL(ts, "upd", nil, 32)
		}
		name := fmt.Sprintf("traffic %d (spec) ", i)
		m.eq(name+"ts", ts, tv.TS)
		key, iv := specL(ts, "key", nil, 32), specL(ts, "iv", nil, 12)
		m.eq(name+"key", key, tv.Key)
		m.eq(name+"iv", iv, tv.IV)
		if tv.Generation < 2 {
			k, n := keys[tv.Direction], ivs[tv.Direction]
			k[tv.Generation], n[tv.Generation] = key, iv
			keys[tv.Direction], ivs[tv.Direction] = k, n
		}
	}
	// The envelope.
	seal := func(x Direction, seq uint64, channel string, pt []byte) (env, aad, nonce []byte) {
		g := seq >> 16
		if g > 1 || keys[x][g] == nil {
			m.ok("envelope", fmt.Errorf("no %s key for generation %d", x, g))
			return nil, nil, nil
		}
		hdr := binary.AppendUvarint(concat([]byte{1}, kid), seq)
		aad = concat(hdr, specLP([]byte(v.DeviceID)), specLP([]byte(channel)))
		nonce = bytes.Clone(ivs[x][g])
		for i := range 8 {
			nonce[4+i] ^= byte(seq >> (56 - 8*i))
		}
		a, err := chacha20poly1305.New(keys[x][g])
		if err != nil {
			m.ok("ChaCha20-Poly1305", err)
			return nil, nil, nil
		}
		return a.Seal(hdr, nonce, pt, aad), aad, nonce
	}
	msg4, _, _ := seal(G2D, 0, "kex", nil)
	m.eq("msg4 (spec)", msg4, v.Msg4)
	for i, e := range v.Envelopes {
		env, aad, nonce := seal(e.Direction, e.Seq, e.Channel, e.Plaintext)
		name := fmt.Sprintf("envelope %d (spec) ", i)
		m.eq(name+"envelope", env, e.Envelope)
		m.eq(name+"aad", aad, e.AAD)
		m.eq(name+"nonce", nonce, e.Nonce)
		over := 22 // FKX1.md, Envelope: overhead
		switch {
		case e.Seq >= 1<<14:
			over = 24
		case e.Seq >= 1<<7:
			over = 23
		}
		if len(e.Envelope)-len(e.Plaintext) != over {
			m.ok(name+"overhead", fmt.Errorf("%d bytes at seq %d, want %d", len(e.Envelope)-len(e.Plaintext), e.Seq, over))
		}
	}
	return m.err()
}
