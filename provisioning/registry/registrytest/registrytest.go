// Package registrytest is the conformance suite every registry.Store runs:
// memory, SQLite and PostgreSQL must behave the same, refusals included.
package registrytest

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"fleetkey.dev/provisioning/registry"
)

// Run runs the suite. open returns a new, empty store for each subtest.
func Run(t *testing.T, open func(t *testing.T) registry.Store) {
	tests := []struct {
		name string
		fn   func(*testing.T, registry.Store)
	}{
		{"tokens", testTokens},
		{"issue", testIssue},
		{"issue-refusals", testIssueRefusals},
		{"reprovision", testReprovision},
		{"revoke", testRevoke},
		{"lists", testLists},
		{"concurrent-token-spend", testConcurrentSpend},
		{"concurrent-revocations", testConcurrentRevocations},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := open(t)
			t.Cleanup(func() { s.Close() })
			tc.fn(t, s)
		})
	}
}

// now is a fixed, millisecond-aligned time: stores keep milliseconds.
var now = time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)

func tok(id string, maxUses int) registry.Token {
	h := sha256.Sum256([]byte(id))
	return registry.Token{ID: id, Hash: h[:], Prefix: "dev-", MaxUses: maxUses, ExpiresAt: now.Add(time.Hour),
		Labels: map[string]string{"line": "3"}, CreatedAt: now, CreatedBy: "test"}
}

func record(dev, serial, token, expect string, at time.Time) registry.IssueRecord {
	return registry.IssueRecord{
		Cert: registry.Certificate{Serial: serial, DeviceID: dev, Fingerprint: "fp-" + serial, PublicKeyHash: "pk-" + serial,
			RequestHash: "rq-" + serial, TokenID: token, Issuer: "issuing", NotBefore: at.Add(-time.Minute), NotAfter: at.Add(90 * 24 * time.Hour),
			DER: []byte("der-" + serial), CreatedAt: at},
		Device: registry.Device{ID: dev, Status: registry.DeviceActive, Serial: serial, Fingerprint: "fp-" + serial,
			NotAfter: at.Add(90 * 24 * time.Hour), CreatedAt: at, UpdatedAt: at},
		TokenID: token, ExpectSerial: expect,
		Audit: registry.AuditEvent{At: at, Actor: "token:" + token, Action: "enroll", Subject: dev, Outcome: registry.Allowed, Serial: serial},
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func wantErr(t *testing.T, err, target error) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("err = %v, want %v", err, target)
	}
}

var ctx = context.Background()

func testTokens(t *testing.T, s registry.Store) {
	tk := tok("aaaaaaaaaaaa", 3)
	must(t, s.CreateToken(ctx, tk))
	wantErr(t, s.CreateToken(ctx, tk), registry.ErrExists)
	got, err := s.GetToken(ctx, tk.ID)
	must(t, err)
	if got.Prefix != "dev-" || got.MaxUses != 3 || string(got.Hash) != string(tk.Hash) || got.Labels["line"] != "3" ||
		!got.ExpiresAt.Equal(tk.ExpiresAt) || got.ExpiresAt.Location() != time.UTC {
		t.Fatalf("token round trip: %+v", got)
	}
	_, err = s.GetToken(ctx, "nope")
	wantErr(t, err, registry.ErrNotFound)
	must(t, s.DisableToken(ctx, tk.ID, registry.AuditEvent{At: now, Action: "token.disable", Subject: tk.ID, Outcome: registry.Allowed}))
	wantErr(t, s.DisableToken(ctx, "nope", registry.AuditEvent{}), registry.ErrNotFound)
	if got, _ := s.GetToken(ctx, tk.ID); !got.Disabled {
		t.Fatal("token not disabled")
	}
	must(t, s.CreateToken(ctx, tok("bbbbbbbbbbbb", 1)))
	list, err := s.ListTokens(ctx)
	must(t, err)
	if len(list) != 2 {
		t.Fatalf("ListTokens = %d", len(list))
	}
}

func testIssue(t *testing.T, s registry.Store) {
	must(t, s.CreateToken(ctx, tok("aaaaaaaaaaaa", 2)))
	rec := record("dev-1", "01", "aaaaaaaaaaaa", "", now)
	rec.Device.TPMBound, rec.Device.EKHash, rec.Cert.TPMBound = true, []byte{1, 2, 3}, true
	rec.Device.Labels = map[string]string{"k": "v"}
	must(t, s.RecordIssue(ctx, rec))
	d, err := s.GetDevice(ctx, "dev-1")
	must(t, err)
	if d.Serial != "01" || d.Status != registry.DeviceActive || !d.TPMBound || string(d.EKHash) != "\x01\x02\x03" || d.Labels["k"] != "v" || !d.CreatedAt.Equal(now) {
		t.Fatalf("device = %+v", d)
	}
	c, err := s.GetCertificate(ctx, "01")
	must(t, err)
	if c.DeviceID != "dev-1" || string(c.DER) != "der-01" || c.Revoked() || !c.NotAfter.Equal(rec.Cert.NotAfter) || !c.TPMBound {
		t.Fatalf("certificate = %+v", c)
	}
	if tk, _ := s.GetToken(ctx, "aaaaaaaaaaaa"); tk.Uses != 1 {
		t.Fatalf("uses = %d", tk.Uses)
	}
	f, err := s.FindIssued(ctx, "aaaaaaaaaaaa", "dev-1", "rq-01")
	must(t, err)
	if f.Serial != "01" {
		t.Fatalf("FindIssued = %+v", f)
	}
	_, err = s.FindIssued(ctx, "aaaaaaaaaaaa", "dev-1", "other")
	wantErr(t, err, registry.ErrNotFound)
	// Renewal (no token) keeps CreatedAt and moves the serial.
	later := now.Add(time.Hour)
	ren := record("dev-1", "02", "", "01", later)
	ren.Device.CreatedAt = later
	must(t, s.RecordIssue(ctx, ren))
	d, _ = s.GetDevice(ctx, "dev-1")
	if d.Serial != "02" || !d.CreatedAt.Equal(now) || !d.UpdatedAt.Equal(later) {
		t.Fatalf("after renewal: %+v", d)
	}
	if old, _ := s.GetCertificate(ctx, "01"); old.Revoked() {
		t.Fatal("renewal revoked the previous certificate")
	}
	certs, err := s.ListCertificates(ctx, "dev-1")
	must(t, err)
	if len(certs) != 2 || certs[0].Serial != "01" {
		t.Fatalf("ListCertificates = %+v", certs)
	}
	_, err = s.GetCertificate(ctx, "ff")
	wantErr(t, err, registry.ErrNotFound)
	_, err = s.GetDevice(ctx, "ghost")
	wantErr(t, err, registry.ErrNotFound)
	evs, err := s.ListAudit(ctx, registry.AuditQuery{Subject: "dev-1"})
	must(t, err)
	if len(evs) != 2 || evs[0].Serial != "01" || evs[1].Seq <= evs[0].Seq {
		t.Fatalf("audit = %+v", evs)
	}
}

// snapshot is what a refused write must leave unchanged.
type snapshot struct {
	uses    int
	devices int
	audit   int
	cert    error
}

func snap(t *testing.T, s registry.Store, token, serial string) snapshot {
	t.Helper()
	var sn snapshot
	if tk, err := s.GetToken(ctx, token); err == nil {
		sn.uses = tk.Uses
	}
	ds, err := s.ListDevices(ctx, registry.ListOptions{Limit: 1000})
	must(t, err)
	sn.devices = len(ds)
	evs, err := s.ListAudit(ctx, registry.AuditQuery{Limit: 1000})
	must(t, err)
	sn.audit = len(evs)
	_, sn.cert = s.GetCertificate(ctx, serial)
	return sn
}

func testIssueRefusals(t *testing.T, s registry.Store) {
	spent := tok("spentspentsp", 1)
	spent.Uses = 1
	expired := tok("expiredexpir", 5)
	expired.ExpiresAt = now
	disabled := tok("disableddisa", 5)
	disabled.Disabled = true
	for _, tk := range []registry.Token{spent, expired, disabled, tok("goodgoodgood", 5)} {
		must(t, s.CreateToken(ctx, tk))
	}
	must(t, s.RecordIssue(ctx, record("dev-1", "01", "goodgoodgood", "", now)))
	must(t, s.RecordIssue(ctx, record("dev-r", "0r", "goodgoodgood", "", now)))
	_, err := s.RevokeDevice(ctx, "dev-r", 1, now, registry.AuditEvent{At: now, Action: "revoke"})
	must(t, err)
	cases := []struct {
		name string
		rec  registry.IssueRecord
		want error
	}{
		{"fail/token-spent", record("dev-2", "02", "spentspentsp", "", now), registry.ErrTokenSpent},
		{"fail/token-expired", record("dev-2", "02", "expiredexpir", "", now), registry.ErrTokenExpired},
		{"fail/token-disabled", record("dev-2", "02", "disableddisa", "", now), registry.ErrTokenDisabled},
		{"fail/token-unknown", record("dev-2", "02", "unknownunkno", "", now), registry.ErrNotFound},
		{"fail/stale-serial", record("dev-1", "02", "goodgoodgood", "00", now), registry.ErrConflict},
		{"fail/exists-but-expected-new", record("dev-1", "02", "goodgoodgood", "", now), registry.ErrConflict},
		{"fail/new-but-expected-old", record("dev-9", "02", "goodgoodgood", "01", now), registry.ErrConflict},
		{"fail/revoked-device", record("dev-r", "02", "goodgoodgood", "0r", now), registry.ErrConflict},
		{"fail/duplicate-serial", record("dev-3", "01", "goodgoodgood", "", now), registry.ErrExists},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := snap(t, s, tc.rec.TokenID, tc.rec.Cert.Serial)
			wantErr(t, s.RecordIssue(ctx, tc.rec), tc.want)
			if after := snap(t, s, tc.rec.TokenID, tc.rec.Cert.Serial); after != before {
				t.Fatalf("a refused RecordIssue changed the store: %+v -> %+v", before, after)
			}
		})
	}
}

func testReprovision(t *testing.T, s registry.Store) {
	must(t, s.CreateToken(ctx, tok("aaaaaaaaaaaa", 5)))
	must(t, s.RecordIssue(ctx, record("dev-1", "01", "aaaaaaaaaaaa", "", now)))
	rec := record("dev-1", "02", "aaaaaaaaaaaa", "01", now.Add(time.Minute))
	rec.RevokePrevious = true
	must(t, s.RecordIssue(ctx, rec))
	old, _ := s.GetCertificate(ctx, "01")
	if !old.Revoked() || old.RevocationReason != 4 || old.RevocationSeq != 1 || !old.RevokedAt.Equal(now.Add(time.Minute)) {
		t.Fatalf("previous certificate = %+v", old)
	}
	revs, err := s.RevocationsSince(ctx, 0, 10)
	must(t, err)
	if len(revs) != 1 || revs[0].Serial != "01" {
		t.Fatalf("RevocationsSince = %+v", revs)
	}
}

func testRevoke(t *testing.T, s registry.Store) {
	must(t, s.CreateToken(ctx, tok("aaaaaaaaaaaa", 10)))
	must(t, s.RecordIssue(ctx, record("dev-1", "01", "aaaaaaaaaaaa", "", now)))
	must(t, s.RecordIssue(ctx, record("dev-1", "02", "", "01", now.Add(time.Second))))
	must(t, s.RecordIssue(ctx, record("dev-2", "03", "aaaaaaaaaaaa", "", now)))
	expired := record("dev-3", "04", "aaaaaaaaaaaa", "", now)
	expired.Cert.NotAfter = now.Add(time.Hour)
	must(t, s.RecordIssue(ctx, expired))

	ev := registry.AuditEvent{At: now, Action: "revoke", Subject: "dev-1", Outcome: registry.Allowed, Reason: "keyCompromise"}
	got, err := s.RevokeDevice(ctx, "dev-1", 1, now, ev)
	must(t, err)
	if len(got) != 2 || got[0].Serial != "01" || got[0].RevocationSeq != 1 || got[1].RevocationSeq != 2 || got[1].RevocationReason != 1 {
		t.Fatalf("RevokeDevice = %+v", got)
	}
	if d, _ := s.GetDevice(ctx, "dev-1"); d.Status != registry.DeviceRevoked {
		t.Fatal("device not revoked")
	}
	again, err := s.RevokeDevice(ctx, "dev-1", 1, now, ev)
	must(t, err)
	if len(again) != 0 {
		t.Fatal("revoking twice revoked again")
	}
	_, err = s.RevokeDevice(ctx, "ghost", 1, now, ev)
	wantErr(t, err, registry.ErrNotFound)

	c, err := s.RevokeCertificate(ctx, "03", 5, now, registry.AuditEvent{At: now, Action: "revoke", Subject: "dev-2"})
	must(t, err)
	if c.RevocationSeq != 3 || c.RevocationReason != 5 {
		t.Fatalf("RevokeCertificate = %+v", c)
	}
	if c2, err := s.RevokeCertificate(ctx, "03", 1, now, registry.AuditEvent{}); err != nil || c2.RevocationSeq != 3 || c2.RevocationReason != 5 {
		t.Fatalf("second RevokeCertificate = %+v, %v", c2, err)
	}
	_, err = s.RevokeCertificate(ctx, "ff", 1, now, registry.AuditEvent{})
	wantErr(t, err, registry.ErrNotFound)
	_, err = s.RevokeCertificate(ctx, "04", 1, now, registry.AuditEvent{})
	must(t, err)

	page1, err := s.RevocationsSince(ctx, 0, 2)
	must(t, err)
	page2, err := s.RevocationsSince(ctx, page1[len(page1)-1].RevocationSeq, 10)
	must(t, err)
	if len(page1) != 2 || len(page2) != 2 || page2[0].RevocationSeq != 3 || page2[1].Serial != "04" {
		t.Fatalf("feed pages: %+v / %+v", page1, page2)
	}
	crl, err := s.RevokedUnexpired(ctx, now.Add(2*time.Hour))
	must(t, err)
	if len(crl) != 3 {
		t.Fatalf("RevokedUnexpired = %d certificates, want 3 (the expired one left out)", len(crl))
	}
}

func testLists(t *testing.T, s registry.Store) {
	must(t, s.CreateToken(ctx, tok("aaaaaaaaaaaa", 100)))
	for i := 0; i < 7; i++ {
		must(t, s.RecordIssue(ctx, record(fmt.Sprintf("dev-%d", i), fmt.Sprintf("%02x", i+1), "aaaaaaaaaaaa", "", now)))
	}
	_, err := s.RevokeDevice(ctx, "dev-3", 1, now, registry.AuditEvent{At: now, Action: "revoke", Subject: "dev-3"})
	must(t, err)
	p1, err := s.ListDevices(ctx, registry.ListOptions{Limit: 3})
	must(t, err)
	p2, err := s.ListDevices(ctx, registry.ListOptions{After: p1[2].ID, Limit: 3})
	must(t, err)
	if len(p1) != 3 || len(p2) != 3 || p1[0].ID != "dev-0" || p2[0].ID != "dev-3" {
		t.Fatalf("pages %v / %v", p1, p2)
	}
	rev, err := s.ListDevices(ctx, registry.ListOptions{Status: registry.DeviceRevoked})
	must(t, err)
	if len(rev) != 1 || rev[0].ID != "dev-3" {
		t.Fatalf("revoked = %+v", rev)
	}
	all, err := s.ListAudit(ctx, registry.AuditQuery{Limit: 1000})
	must(t, err)
	if len(all) != 8 {
		t.Fatalf("audit has %d events, want 8", len(all))
	}
	after, err := s.ListAudit(ctx, registry.AuditQuery{AfterSeq: all[5].Seq, Limit: 1})
	must(t, err)
	if len(after) != 1 || after[0].Seq != all[6].Seq {
		t.Fatalf("audit paging: %+v", after)
	}
	one, err := s.ListAudit(ctx, registry.AuditQuery{Subject: "dev-3"})
	must(t, err)
	if len(one) != 2 {
		t.Fatalf("audit for dev-3: %+v", one)
	}
	must(t, s.Audit(ctx, registry.AuditEvent{At: now, Actor: "x", Action: "enroll", Subject: "dev-9", Outcome: registry.Refused, Reason: "bad-token", RemoteAddr: "192.0.2.1"}))
	ev, err := s.ListAudit(ctx, registry.AuditQuery{Subject: "dev-9"})
	must(t, err)
	if len(ev) != 1 || ev[0].Reason != "bad-token" || ev[0].RemoteAddr != "192.0.2.1" || !ev[0].At.Equal(now) {
		t.Fatalf("refusal event = %+v", ev)
	}
	must(t, s.Ping(ctx))
}

// testConcurrentSpend: many enrollments race for one token's five uses.
func testConcurrentSpend(t *testing.T, s registry.Store) {
	must(t, s.CreateToken(ctx, tok("aaaaaaaaaaaa", 5)))
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for i := 0; i < 32; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			errs <- s.RecordIssue(ctx, record(fmt.Sprintf("dev-%02d", i), fmt.Sprintf("%04x", i+1), "aaaaaaaaaaaa", "", now))
		}(i)
	}
	wg.Wait()
	close(errs)
	ok := 0
	for err := range errs {
		switch {
		case err == nil:
			ok++
		case errors.Is(err, registry.ErrTokenSpent):
		default:
			t.Errorf("unexpected error: %v", err)
		}
	}
	tk, _ := s.GetToken(ctx, "aaaaaaaaaaaa")
	devs, _ := s.ListDevices(ctx, registry.ListOptions{Limit: 1000})
	if ok != 5 || tk.Uses != 5 || len(devs) != 5 {
		t.Fatalf("%d succeeded, uses %d, %d devices; want 5 each", ok, tk.Uses, len(devs))
	}
}

// testConcurrentRevocations: numbers are 1..N, no gaps, no repeats, in
// order.
func testConcurrentRevocations(t *testing.T, s registry.Store) {
	must(t, s.CreateToken(ctx, tok("aaaaaaaaaaaa", 100)))
	const n = 16
	for i := 0; i < n; i++ {
		must(t, s.RecordIssue(ctx, record(fmt.Sprintf("dev-%02d", i), fmt.Sprintf("%04x", i+1), "aaaaaaaaaaaa", "", now)))
	}
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			if _, err := s.RevokeDevice(ctx, fmt.Sprintf("dev-%02d", i), 1, now, registry.AuditEvent{At: now, Action: "revoke"}); err != nil {
				t.Error(err)
			}
		}(i)
	}
	wg.Wait()
	revs, err := s.RevocationsSince(ctx, 0, 1000)
	must(t, err)
	if len(revs) != n {
		t.Fatalf("%d revocations, want %d", len(revs), n)
	}
	for i, c := range revs {
		if c.RevocationSeq != int64(i+1) {
			t.Fatalf("revocation %d has sequence %d", i, c.RevocationSeq)
		}
	}
}
