package simulator

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"fleetkey.dev/certs/authority"
	"fleetkey.dev/certs/identity"
	"fleetkey.dev/certs/keyfile"
	"fleetkey.dev/certs/trust"
	"fleetkey.dev/device-agent/agent"
)

// The identity cache of --identities fast: minted identities are kept on
// disk so that the next run of the same fleet loads them instead of
// minting them again.
//
// Layout: DIR/<hex of the first 16 bytes of SHA-256(issuing CA cert DER)>/
// identities.bin, the directories 0700 and the file 0600 (it holds private
// keys). A new issuing CA (a rotation, another PKI) therefore gets a cache
// of its own and never sees another CA's identities.
//
// identities.bin, all integers big-endian:
//
//	magic   8 bytes  "FKSIMID1" (the 1 is the format version)
//	ca     32 bytes  SHA-256 of the issuing CA certificate's DER
//	count   u32      number of identities
//	count times, identity i being device deviceID(i) ("sim-%05d"):
//	  u16 length, the certificate (DER)
//	  u16 length, the private key (unencrypted PKCS#8 DER)
//
// and nothing after the last identity. The file is replaced atomically
// (temporary file, fsync, rename) whenever anything was minted.
const (
	// CacheFile is the cache's file name, in its CA's directory.
	CacheFile  = "identities.bin"
	cacheMagic = "FKSIMID1"
	cacheHead  = len(cacheMagic) + sha256.Size + 4
	// CacheMinRemaining: a cached certificate that expires sooner than this
	// is minted again, so a run that loads it does not see it expire.
	CacheMinRemaining = time.Hour
)

// CacheReport is what MintCachedReport did.
type CacheReport struct {
	// Creds are the n identities, Creds[i] being deviceID(i).
	Creds []*agent.Credentials
	// Minted and Loaded add up to n.
	Minted, Loaded int
	// Rejected counts the cached identities (among the first n) that failed
	// a check and were minted again.
	Rejected int
	// Path is the cache file.
	Path string
	// Note says why cached identities went unused: the file was unreadable,
	// corrupt or of another format or CA (then all of it was ignored), or
	// some identities failed their checks (the count and the first reason).
	// It is empty when the cache was absent (a first run) or all of it that
	// was asked for was usable.
	Note string
}

// MintCached returns n identities, reusing those cached in dir from an
// earlier run and minting (in parallel, one worker per CPU) only what is
// missing or unusable; it rewrites the cache when it minted anything. It
// reports how many were minted and how many were loaded. A bad cache is
// not an error (its identities are minted again); MintCachedReport says
// why a cache went unused.
func (f *Fleet) MintCached(dir string, n int) (creds []*agent.Credentials, minted, loaded int, err error) {
	r, err := f.MintCachedReport(dir, n)
	if err != nil {
		return nil, 0, 0, err
	}
	return r.Creds, r.Minted, r.Loaded, nil
}

// MintCachedReport is MintCached with the details. Every cached identity
// is checked before use: its certificate parses, names deviceID(i) in
// this fleet's trust domain, is signed by this issuing CA, is valid now
// and for at least CacheMinRemaining, and the private key is the
// certificate's. If n is less than the cached count the first n are used
// and the rest stay in the file; if more, the rest are minted.
func (f *Fleet) MintCachedReport(dir string, n int) (*CacheReport, error) {
	if n < 0 {
		return nil, fmt.Errorf("identity cache: %d identities asked for", n)
	}
	ca := f.issuer.CA.Cert
	sum := sha256.Sum256(ca.Raw)
	sub := filepath.Join(dir, hex.EncodeToString(sum[:16]))
	if err := os.MkdirAll(sub, 0o700); err != nil {
		return nil, fmt.Errorf("identity cache: %w", err)
	}
	r := &CacheReport{Creds: make([]*agent.Credentials, n), Path: filepath.Join(sub, CacheFile)}
	var recs []rawIdentity
	switch data, err := os.ReadFile(r.Path); {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		r.Note = fmt.Sprintf("cannot read the identity cache (%v); minting every identity", err)
	default:
		if recs, err = decodeCache(data, sum); err != nil {
			recs = nil
			r.Note = fmt.Sprintf("ignoring the identity cache %s: %v; minting every identity", r.Path, err)
		}
	}

	use := min(len(recs), n)
	errs := make([]error, use)
	now := time.Now()
	eachParallel(use, func(i int) {
		r.Creds[i], errs[i] = f.loadIdentity(recs[i], i, now)
	})
	var first error
	for _, err := range errs {
		if err != nil {
			if r.Rejected++; first == nil {
				first = err
			}
		}
	}
	if first != nil {
		r.Note = fmt.Sprintf("%d cached identities refused and minted again (first: %v)", r.Rejected, first)
	}

	var missing []int
	for i, c := range r.Creds {
		if c == nil {
			missing = append(missing, i)
		}
	}
	if err := f.mintInto(r.Creds, missing); err != nil {
		return nil, err
	}
	r.Minted, r.Loaded = len(missing), n-len(missing)
	if r.Minted == 0 {
		return r, nil
	}
	out := make([]rawIdentity, n, max(n, len(recs)))
	for i, c := range r.Creds {
		key, err := x509.MarshalPKCS8PrivateKey(c.Signer)
		if err != nil {
			return nil, fmt.Errorf("identity cache: %s: %w", deviceID(i), err)
		}
		out[i] = rawIdentity{cert: c.Leaf.Raw, key: key}
	}
	if len(recs) > n {
		out = append(out, recs[n:]...) // kept unchecked for a later, larger run
	}
	data, err := encodeCache(sum, out)
	if err != nil {
		return nil, fmt.Errorf("identity cache: %w", err)
	}
	if err := keyfile.WriteFile(r.Path, data, 0o600, true); err != nil {
		return nil, fmt.Errorf("identity cache: %w", err)
	}
	return r, nil
}

// rawIdentity is one identity as the cache holds it.
type rawIdentity struct{ cert, key []byte }

// decodeCache splits a cache file into its identities, which alias data.
// Any fault in the header or the framing refuses the whole file.
func decodeCache(data []byte, ca [sha256.Size]byte) ([]rawIdentity, error) {
	if len(data) < cacheHead {
		return nil, fmt.Errorf("%d bytes is too short for its header", len(data))
	}
	if string(data[:len(cacheMagic)]) != cacheMagic {
		return nil, fmt.Errorf("it does not start with %q", cacheMagic)
	}
	if !bytes.Equal(data[len(cacheMagic):len(cacheMagic)+sha256.Size], ca[:]) {
		return nil, errors.New("it was made for another issuing CA")
	}
	count := binary.BigEndian.Uint32(data[cacheHead-4:])
	rest := data[cacheHead:]
	if uint64(count) > uint64(len(rest))/4 {
		return nil, fmt.Errorf("it claims %d identities in %d bytes", count, len(rest))
	}
	recs := make([]rawIdentity, count)
	for i := range recs {
		var ok bool
		if recs[i].cert, rest, ok = cut16(rest); ok {
			recs[i].key, rest, ok = cut16(rest)
		}
		if !ok {
			return nil, fmt.Errorf("it is truncated in identity %d of %d", i, count)
		}
	}
	if len(rest) != 0 {
		return nil, fmt.Errorf("%d bytes follow the last identity", len(rest))
	}
	return recs, nil
}

// cut16 splits a field with a u16 length off b.
func cut16(b []byte) (field, rest []byte, ok bool) {
	if len(b) < 2 {
		return nil, nil, false
	}
	n := int(binary.BigEndian.Uint16(b))
	if len(b)-2 < n {
		return nil, nil, false
	}
	return b[2 : 2+n : 2+n], b[2+n:], true
}

// encodeCache builds a cache file.
func encodeCache(ca [sha256.Size]byte, recs []rawIdentity) ([]byte, error) {
	size := cacheHead
	for _, r := range recs {
		size += 4 + len(r.cert) + len(r.key)
	}
	b := make([]byte, 0, size)
	b = append(b, cacheMagic...)
	b = append(b, ca[:]...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(recs)))
	for i, r := range recs {
		if len(r.cert) > 0xffff || len(r.key) > 0xffff {
			return nil, fmt.Errorf("identity %d does not fit the format (%d, %d bytes)", i, len(r.cert), len(r.key))
		}
		b = binary.BigEndian.AppendUint16(b, uint16(len(r.cert)))
		b = append(b, r.cert...)
		b = binary.BigEndian.AppendUint16(b, uint16(len(r.key)))
		b = append(b, r.key...)
	}
	return b, nil
}

// loadIdentity checks cached identity i and returns it, or says why it
// cannot be used at now.
func (f *Fleet) loadIdentity(r rawIdentity, i int, now time.Time) (*agent.Credentials, error) {
	want := deviceID(i)
	cert, err := x509.ParseCertificate(r.cert)
	if err != nil {
		return nil, fmt.Errorf("%s: certificate: %w", want, err)
	}
	id, err := trust.Identity([]*x509.Certificate{cert})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", want, err)
	}
	if id.TrustDomain != f.issuer.Policy.TrustDomain || id.Role != identity.RoleDevice || id.Name != want {
		return nil, fmt.Errorf("%s: the certificate is for %s", want, id)
	}
	if now.Before(cert.NotBefore) {
		return nil, fmt.Errorf("%s: the certificate is not valid before %s", want, cert.NotBefore.UTC().Format(time.RFC3339))
	}
	if cert.NotAfter.Sub(now) < CacheMinRemaining {
		return nil, fmt.Errorf("%s: the certificate expires at %s, within %s", want, cert.NotAfter.UTC().Format(time.RFC3339), CacheMinRemaining)
	}
	k, err := x509.ParsePKCS8PrivateKey(r.key)
	if err != nil {
		return nil, fmt.Errorf("%s: private key: %w", want, err)
	}
	// The parser derives the public key from the private one, so this
	// compares the key itself, not a copy of the public key beside it.
	key, ok := k.(crypto.Signer)
	if ok {
		pub, eq := key.Public().(interface{ Equal(crypto.PublicKey) bool })
		ok = eq && pub.Equal(cert.PublicKey)
	}
	if !ok {
		return nil, fmt.Errorf("%s: the private key is not the certificate's", want)
	}
	if err := cert.CheckSignatureFrom(f.issuer.CA.Cert); err != nil {
		return nil, fmt.Errorf("%s: not issued by this fleet's issuing CA: %w", want, err)
	}
	return &agent.Credentials{Signer: key, Leaf: cert, Bundle: f.bundle}, nil
}

// mintInto mints the identities idx into out, in parallel. (Mint holds
// the same per-identity steps for 0..n-1; it cannot mint a given set.)
func (f *Fleet) mintInto(out []*agent.Credentials, idx []int) error {
	errs := make([]error, len(idx))
	eachParallel(len(idx), func(j int) {
		out[idx[j]], errs[j] = f.mintOne(idx[j])
	})
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// mintOne makes identity i: a new P-256 key and its certificate.
func (f *Fleet) mintOne(i int) (*agent.Credentials, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	c, err := f.issuer.Issue(&authority.Request{Role: identity.RoleDevice, Name: deviceID(i), PublicKey: key.Public()})
	if err != nil {
		return nil, fmt.Errorf("minting %s: %w", deviceID(i), err)
	}
	return &agent.Credentials{Signer: key, Leaf: c, Bundle: f.bundle}, nil
}

// eachParallel calls fn(0) … fn(n-1) on one worker per CPU.
func eachParallel(n int, fn func(i int)) {
	var next atomic.Int64
	var wg sync.WaitGroup
	for range min(runtime.GOMAXPROCS(0), n) {
		wg.Go(func() {
			for i := int(next.Add(1) - 1); i < n; i = int(next.Add(1) - 1) {
				fn(i)
			}
		})
	}
	wg.Wait()
}
