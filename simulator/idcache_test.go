package simulator

import (
	"bytes"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"fleetkey.dev/certs/authority"
	"fleetkey.dev/certs/pkidir"
	"fleetkey.dev/device-agent/agent"
)

// cacheFleet makes a fleet PKI (real CAs, cheap key encryption) and opens
// its issuing CA.
func cacheFleet(t testing.TB) *Fleet {
	t.Helper()
	pki := filepath.Join(t.TempDir(), "pki")
	if _, err := pkidir.Init(pki, pkidir.InitOptions{TrustDomain: "fleet.test", Options: pkidir.Options{KDFIterations: 1000}}); err != nil {
		t.Fatal(err)
	}
	f, err := OpenFleet(pki)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func cacheSum(f *Fleet) [sha256.Size]byte { return sha256.Sum256(f.issuer.CA.Cert.Raw) }

func cacheMint(t testing.TB, f *Fleet, dir string, n int) *CacheReport {
	t.Helper()
	r, err := f.MintCachedReport(dir, n)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Creds) != n || r.Minted+r.Loaded != n {
		t.Fatalf("%d identities, %d minted + %d loaded, for %d asked", len(r.Creds), r.Minted, r.Loaded, n)
	}
	return r
}

// cacheCheck: every identity is deviceID(i), issued by f's CA, and its key
// is the certificate's.
func cacheCheck(t testing.TB, f *Fleet, creds []*agent.Credentials) {
	t.Helper()
	for i, c := range creds {
		if c == nil || c.Leaf == nil || c.Signer == nil || c.Bundle != f.bundle {
			t.Fatalf("identity %d is incomplete: %+v", i, c)
		}
		if c.Leaf.Subject.CommonName != deviceID(i) {
			t.Fatalf("identity %d is %q", i, c.Leaf.Subject.CommonName)
		}
		if err := c.Leaf.CheckSignatureFrom(f.issuer.CA.Cert); err != nil {
			t.Fatalf("identity %d: %v", i, err)
		}
		if !c.Leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(c.Signer.Public()) {
			t.Fatalf("identity %d: the key is not the certificate's", i)
		}
	}
}

func cacheSerials(creds []*agent.Credentials) []string {
	s := make([]string, len(creds))
	for i, c := range creds {
		s[i] = c.Leaf.SerialNumber.String()
	}
	return s
}

func cacheRead(t testing.TB, f *Fleet, path string) []rawIdentity {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	recs, err := decodeCache(data, cacheSum(f))
	if err != nil {
		t.Fatal(err)
	}
	return recs
}

func cacheWrite(t testing.TB, f *Fleet, path string, recs []rawIdentity) {
	t.Helper()
	data, err := encodeCache(cacheSum(f), recs)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestMintCacheReuse: the first call mints and writes the cache; the
// second loads the very same identities and writes nothing.
func TestMintCacheReuse(t *testing.T) {
	t.Parallel()
	f := cacheFleet(t)
	dir := filepath.Join(t.TempDir(), "cache")
	creds, minted, loaded, err := f.MintCached(dir, 6)
	if err != nil || minted != 6 || loaded != 0 {
		t.Fatalf("first run: minted %d, loaded %d, %v", minted, loaded, err)
	}
	cacheCheck(t, f, creds)
	sum := cacheSum(f)
	sub := filepath.Join(dir, fmt.Sprintf("%x", sum[:16]))
	path := filepath.Join(sub, CacheFile)
	for p, want := range map[string]os.FileMode{dir: 0o700 | os.ModeDir, sub: 0o700 | os.ModeDir, path: 0o600} {
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode() != want {
			t.Errorf("%s: mode %v, want %v", p, st.Mode(), want)
		}
	}
	if entries, _ := os.ReadDir(sub); len(entries) != 1 {
		t.Errorf("the cache directory holds %d entries; a temporary file was left?", len(entries))
	}
	before, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(before, []byte("FKSIMID1")) {
		t.Fatalf("the cache starts %q", before[:8])
	}

	r := cacheMint(t, f, dir, 6)
	if r.Minted != 0 || r.Loaded != 6 || r.Rejected != 0 || r.Note != "" || r.Path != path {
		t.Fatalf("second run: %+v", r)
	}
	cacheCheck(t, f, r.Creds)
	if got, want := cacheSerials(r.Creds), cacheSerials(creds); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("serials %v, want %v", got, want)
	}
	for i := range creds {
		if !r.Creds[i].Signer.(interface{ Equal(crypto.PrivateKey) bool }).Equal(creds[i].Signer) {
			t.Fatalf("identity %d: a different private key", i)
		}
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(after, before) {
		t.Fatal("a run that minted nothing rewrote the cache")
	}
}

// TestMintCacheGrowShrink: asking for more mints only the extra; asking
// for fewer loads the first ones and keeps the rest in the file.
func TestMintCacheGrowShrink(t *testing.T) {
	t.Parallel()
	f := cacheFleet(t)
	dir := t.TempDir()
	first := cacheMint(t, f, dir, 4)
	more := cacheMint(t, f, dir, 7)
	if more.Minted != 3 || more.Loaded != 4 {
		t.Fatalf("growing to 7: %+v", more)
	}
	cacheCheck(t, f, more.Creds)
	if got, want := cacheSerials(more.Creds)[:4], cacheSerials(first.Creds); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("the first 4 changed: %v, want %v", got, want)
	}
	if n := len(cacheRead(t, f, more.Path)); n != 7 {
		t.Fatalf("the cache holds %d identities, want 7", n)
	}
	fewer := cacheMint(t, f, dir, 2)
	if fewer.Minted != 0 || fewer.Loaded != 2 || fmt.Sprint(cacheSerials(fewer.Creds)) != fmt.Sprint(cacheSerials(first.Creds)[:2]) {
		t.Fatalf("shrinking to 2: %+v", fewer)
	}
	// Re-minting one of the first 2 rewrites the file, keeping the other 5.
	recs := cacheRead(t, f, more.Path)
	recs[1], recs[0] = recs[0], recs[1]
	cacheWrite(t, f, more.Path, recs)
	r := cacheMint(t, f, dir, 2)
	if r.Minted != 2 || r.Rejected != 2 || !strings.Contains(r.Note, "is for spiffe://fleet.test/device/sim-00001") {
		t.Fatalf("two swapped identities: %+v", r)
	}
	cacheCheck(t, f, r.Creds)
	all := cacheMint(t, f, dir, 7)
	if all.Minted != 0 || fmt.Sprint(cacheSerials(all.Creds)[2:]) != fmt.Sprint(cacheSerials(more.Creds)[2:]) {
		t.Fatalf("the identities past 2 were not kept: %+v", all)
	}
	if empty := cacheMint(t, f, dir, 0); empty.Minted != 0 || empty.Loaded != 0 {
		t.Fatalf("none asked for: %+v", empty)
	}
	if _, err := f.MintCachedReport(dir, -1); err == nil {
		t.Fatal("-1 identities accepted")
	}
}

// TestMintCacheCorrupt: a damaged cache is minted again, in whole or in
// part, never used with a wrong key and never a panic.
func TestMintCacheCorrupt(t *testing.T) {
	t.Parallel()
	f := cacheFleet(t)
	const n = 4
	orig := cacheMint(t, f, t.TempDir(), n)
	pristine, err := os.ReadFile(orig.Path)
	if err != nil {
		t.Fatal(err)
	}
	recs := cacheRead(t, f, orig.Path)
	rebuild := func(edit func(r []rawIdentity)) []byte {
		r := make([]rawIdentity, len(recs))
		for i, x := range recs {
			r[i] = rawIdentity{cert: bytes.Clone(x.cert), key: bytes.Clone(x.key)}
		}
		edit(r)
		b, err := encodeCache(cacheSum(f), r)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	edit := func(fn func(b []byte) []byte) []byte { return fn(bytes.Clone(pristine)) }
	other := cacheFleet(t).mintOne
	cases := []struct {
		name   string
		data   []byte
		minted int
		note   string
	}{
		{"empty", nil, n, "too short"},
		{"wrong-magic", edit(func(b []byte) []byte { b[7] = '2'; return b }), n, "does not start with"},
		{"other-ca-header", edit(func(b []byte) []byte { b[9] ^= 1; return b }), n, "another issuing CA"},
		{"truncated", pristine[:len(pristine)-10], n, "truncated in identity 3"},
		{"truncated-header", pristine[:20], n, "too short"},
		{"trailing-byte", append(bytes.Clone(pristine), 0), n, "follow the last"},
		{"count-huge", edit(func(b []byte) []byte { binary.BigEndian.PutUint32(b[cacheHead-4:], 1<<31); return b }), n, "claims"},
		{"count-more", edit(func(b []byte) []byte { binary.BigEndian.PutUint32(b[cacheHead-4:], n+1); return b }), n, "truncated in identity 4"},
		{"length-flipped", edit(func(b []byte) []byte { b[cacheHead] ^= 0x40; return b }), n, "identity 0"},
		{"cert-signature-flipped", rebuild(func(r []rawIdentity) { r[1].cert[len(r[1].cert)-2] ^= 1 }), 1, "sim-00001"},
		{"cert-garbage", rebuild(func(r []rawIdentity) { r[2].cert = []byte("not a certificate") }), 1, "sim-00002: certificate"},
		{"key-flipped", rebuild(func(r []rawIdentity) { r[0].key[cachePrivOffset(t, r[0].key)] ^= 1 }), 1, "sim-00000: the private key is not the certificate's"},
		// The public key stored beside the private one is not trusted: the
		// key is still the certificate's.
		{"key-public-copy-flipped", rebuild(func(r []rawIdentity) { r[0].key[len(r[0].key)-1] ^= 1 }), 0, ""},
		{"key-missing", rebuild(func(r []rawIdentity) { r[3].key = nil }), 1, "sim-00003: private key"},
		{"keys-swapped", rebuild(func(r []rawIdentity) { r[0].key, r[1].key = r[1].key, r[0].key }), 2, "not the certificate's"},
		{"other-ca-identity", rebuild(func(r []rawIdentity) {
			c, err := other(2)
			if err != nil {
				t.Fatal(err)
			}
			k, _ := x509.MarshalPKCS8PrivateKey(c.Signer)
			r[2] = rawIdentity{cert: c.Leaf.Raw, key: k}
		}), 1, "sim-00002: not issued by this fleet's issuing CA"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			sum := cacheSum(f)
			sub := filepath.Join(dir, fmt.Sprintf("%x", sum[:16]))
			if err := os.MkdirAll(sub, 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(sub, CacheFile), c.data, 0o600); err != nil {
				t.Fatal(err)
			}
			r := cacheMint(t, f, dir, n)
			if r.Minted != c.minted || !strings.Contains(r.Note, c.note) {
				t.Fatalf("minted %d (want %d), note %q (want %q)", r.Minted, c.minted, r.Note, c.note)
			}
			cacheCheck(t, f, r.Creds)
			if c.minted < n {
				changed := 0
				for i, s := range cacheSerials(r.Creds) {
					if s != orig.Creds[i].Leaf.SerialNumber.String() {
						changed++
					}
				}
				if changed != c.minted || r.Rejected != c.minted {
					t.Fatalf("%d identities changed and %d were refused; want %d", changed, r.Rejected, c.minted)
				}
			}
			// The rewritten cache is whole again.
			if again := cacheMint(t, f, dir, n); again.Minted != 0 || again.Note != "" {
				t.Fatalf("after the rewrite: %+v", again)
			}
		})
	}
}

// TestMintCacheFlipEveryByte: whatever single byte of the file is damaged,
// every identity handed out is sound.
func TestMintCacheFlipEveryByte(t *testing.T) {
	t.Parallel()
	f := cacheFleet(t)
	const n = 2
	orig := cacheMint(t, f, t.TempDir(), n)
	pristine, err := os.ReadFile(orig.Path)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	sum := cacheSum(f)
	path := filepath.Join(dir, fmt.Sprintf("%x", sum[:16]), CacheFile)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	step := 1
	if testing.Short() {
		step = 7
	}
	for off := 0; off < len(pristine); off += step {
		b := bytes.Clone(pristine)
		b[off] ^= 0x5a
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		r, err := f.MintCachedReport(dir, n)
		if err != nil {
			t.Fatalf("byte %d: %v", off, err)
		}
		cacheCheck(t, f, r.Creds)
		if r.Loaded > 0 && r.Minted > 0 && r.Note == "" {
			t.Fatalf("byte %d: minted %d without saying why", off, r.Minted)
		}
	}
}

// TestMintCacheOtherCA: another PKI's fleet neither finds nor accepts
// this one's cache.
func TestMintCacheOtherCA(t *testing.T) {
	t.Parallel()
	a, b := cacheFleet(t), cacheFleet(t)
	dir := t.TempDir()
	ra := cacheMint(t, a, dir, 3)
	rb := cacheMint(t, b, dir, 3)
	if rb.Minted != 3 || rb.Note != "" || filepath.Dir(rb.Path) == filepath.Dir(ra.Path) {
		t.Fatalf("the other CA's run: %+v (a's cache %s)", rb, ra.Path)
	}
	cacheCheck(t, b, rb.Creds)
	// a's file, copied into b's place, is refused by its header...
	data, err := os.ReadFile(ra.Path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(rb.Path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if r := cacheMint(t, b, dir, 3); r.Minted != 3 || !strings.Contains(r.Note, "another issuing CA") {
		t.Fatalf("a's file in b's place: %+v", r)
	}
	// ...and with b's header, each identity by its signature (both PKIs
	// have the same trust domain, so the names alone would pass).
	cacheWrite(t, b, rb.Path, cacheRead(t, a, ra.Path))
	r := cacheMint(t, b, dir, 3)
	if r.Minted != 3 || r.Rejected != 3 || !strings.Contains(r.Note, "not issued by this fleet's issuing CA") {
		t.Fatalf("a's identities under b's header: %+v", r)
	}
	cacheCheck(t, b, r.Creds)
}

// TestMintCacheValidity: a cached certificate that expires within
// CacheMinRemaining, or is not valid yet, is minted again.
func TestMintCacheValidity(t *testing.T) {
	t.Parallel()
	f := cacheFleet(t)
	dir := t.TempDir()
	orig := cacheMint(t, f, dir, 4)
	at := func(d time.Duration) *Fleet {
		return &Fleet{issuer: &authority.Issuer{CA: f.issuer.CA, Policy: f.issuer.Policy, Now: func() time.Time { return time.Now().Add(d) }}, bundle: f.bundle}
	}
	life := f.issuer.Policy.ValidityFor("device")
	raw := func(g *Fleet, i int) rawIdentity {
		c, err := g.mintOne(i)
		if err != nil {
			t.Fatal(err)
		}
		k, _ := x509.MarshalPKCS8PrivateKey(c.Signer)
		return rawIdentity{cert: c.Leaf.Raw, key: k}
	}
	recs := cacheRead(t, f, orig.Path)
	recs[1] = raw(at(-life+30*time.Minute), 1) // expires in 30 minutes
	recs[2] = raw(at(2*time.Hour), 2)          // valid from 2 hours on
	recs[3] = raw(at(-life+2*time.Hour), 3)    // expires in 2 hours: fine
	cacheWrite(t, f, orig.Path, recs)
	r := cacheMint(t, f, dir, 4)
	if r.Minted != 2 || r.Rejected != 2 || !strings.Contains(r.Note, "sim-00001: the certificate expires at") {
		t.Fatalf("%+v", r)
	}
	cacheCheck(t, f, r.Creds)
	if r.Creds[0].Leaf.SerialNumber.Cmp(orig.Creds[0].Leaf.SerialNumber) != 0 {
		t.Fatal("a sound identity was minted again")
	}
	for _, i := range []int{1, 2} {
		if time.Until(r.Creds[i].Leaf.NotAfter) < 80*24*time.Hour {
			t.Fatalf("identity %d was replaced by one expiring at %v", i, r.Creds[i].Leaf.NotAfter)
		}
	}
	if !r.Creds[3].Leaf.Equal(cacheParse(t, recs[3].cert)) {
		t.Fatal("the identity valid for 2 more hours was not loaded")
	}

	// The check itself, at its edges.
	c := recs[3]
	cert := cacheParse(t, c.cert)
	for _, tc := range []struct {
		now time.Time
		ok  bool
	}{
		{cert.NotAfter.Add(-CacheMinRemaining), true},
		{cert.NotAfter.Add(-CacheMinRemaining + time.Second), false},
		{cert.NotBefore, true},
		{cert.NotBefore.Add(-time.Second), false},
	} {
		if _, err := f.loadIdentity(c, 3, tc.now); (err == nil) != tc.ok {
			t.Errorf("at %v: %v", tc.now, err)
		}
	}
	if _, err := f.loadIdentity(c, 4, cert.NotBefore); err == nil {
		t.Error("sim-00003's identity was accepted as sim-00004")
	}
}

// cachePrivOffset finds the private scalar in a P-256 PKCS#8 key: the
// OCTET STRING of 32 bytes after the ECPrivateKey's version 1.
func cachePrivOffset(t testing.TB, pkcs8 []byte) int {
	t.Helper()
	i := bytes.Index(pkcs8, []byte{0x02, 0x01, 0x01, 0x04, 0x20})
	if i < 0 {
		t.Fatal("no P-256 private key in the PKCS#8")
	}
	return i + 5
}

func cacheParse(t testing.TB, der []byte) *x509.Certificate {
	t.Helper()
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// FuzzIdentityCache: decoding and checking any file neither panics nor
// yields an identity whose key is not its certificate's.
func FuzzIdentityCache(fz *testing.F) {
	f := cacheFleet(fz)
	sum := cacheSum(f)
	good, err := f.MintCachedReport(fz.TempDir(), 2)
	if err != nil {
		fz.Fatal(err)
	}
	data, _ := os.ReadFile(good.Path)
	fz.Add(data)
	fz.Add(data[:len(data)/2])
	fz.Add([]byte(cacheMagic))
	now := time.Now()
	fz.Fuzz(func(t *testing.T, b []byte) {
		if len(b) >= cacheHead {
			copy(b[len(cacheMagic):], sum[:]) // get past the header
		}
		recs, err := decodeCache(b, sum)
		if err != nil {
			return
		}
		for i, r := range recs {
			c, err := f.loadIdentity(r, i, now)
			if err == nil && (c.Leaf.Subject.CommonName != deviceID(i) ||
				!c.Leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(c.Signer.Public())) {
				t.Fatalf("identity %d accepted: %s", i, c.Leaf.Subject.CommonName)
			}
		}
	})
}

// BenchmarkMintCached: loading 2,000 cached identities against minting
// them (into an empty cache, as a first run does).
func BenchmarkMintCached(b *testing.B) {
	f := cacheFleet(b)
	const batch = 2000
	dir := b.TempDir()
	cacheMint(b, f, dir, batch)
	b.Run("load", func(b *testing.B) {
		for b.Loop() {
			if r := cacheMint(b, f, dir, batch); r.Loaded != batch {
				b.Fatalf("%+v", r.Note)
			}
		}
		b.ReportMetric(float64(batch*b.N)/b.Elapsed().Seconds(), "ids/s")
	})
	b.Run("mint", func(b *testing.B) {
		fresh, i := b.TempDir(), 0
		for b.Loop() {
			i++
			if r := cacheMint(b, f, filepath.Join(fresh, fmt.Sprint(i)), batch); r.Minted != batch {
				b.Fatalf("%+v", r.Note)
			}
		}
		b.ReportMetric(float64(batch*b.N)/b.Elapsed().Seconds(), "ids/s")
	})
}
