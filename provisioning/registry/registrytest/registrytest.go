// Package registrytest is the conformance suite every registry.Store runs:
// memory, SQLite and PostgreSQL must behave the same, refusals included.
//
// Cases named ok/... check what a store does; fail/... check what it
// refuses, and that a refused write changed nothing at all.
package registrytest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"reflect"
	"sync"
	"testing"
	"time"

	"fleetkey.dev/provisioning/registry"
)

// Run runs the suite. open must return a new, empty store each time it is
// called (once per case); Run closes it when the case ends.
func Run(t *testing.T, open func(t *testing.T) registry.Store) {
	t.Helper()
	for _, tc := range cases() {
		t.Run(tc.name, func(t *testing.T) {
			s := open(t)
			t.Cleanup(func() {
				if err := s.Close(); err != nil {
					t.Errorf("Close: %v", err)
				}
			})
			tc.run(t, s)
		})
	}
}

type testCase struct {
	name string
	run  func(t *testing.T, s registry.Store)
}

func cases() []testCase {
	cs := []testCase{
		{"ok/token-create-get", testTokenCreateGet},
		{"ok/ek-allowlist", testEKAllowlist},
		{"ok/token-list", testTokenList},
		{"ok/token-disable", testTokenDisable},
		{"fail/token-duplicate", testTokenDuplicate},
		{"fail/token-not-found", testTokenNotFound},
		{"ok/issue", testIssue},
		{"ok/issue-renewal", testIssueRenewal},
		{"ok/issue-judged-at-created-at", testIssueJudgedAtCreatedAt},
		{"ok/issue-reprovision-revokes-previous", testReprovision},
		{"fail/not-found", testNotFound},
		{"ok/revoke-device", testRevokeDevice},
		{"ok/revoke-device-idempotent", testRevokeDeviceIdempotent},
		{"ok/revoke-certificate", testRevokeCertificate},
		{"fail/revoke-zero-time", testRevokeZeroTime},
		{"ok/revocations-since", testRevocationsSince},
		{"ok/revoked-unexpired", testRevokedUnexpired},
		{"ok/list-devices", testListDevices},
		{"ok/list-audit", testListAudit},
		{"ok/audit-round-trip", testAuditRoundTrip},
		{"ok/times-utc", testTimesUTC},
		{"ok/returns-copies", testCopies},
		{"ok/ping", func(t *testing.T, s registry.Store) { must(t, s.Ping(ctx)) }},
		{"ok/concurrent-token-spend", testConcurrentSpend},
		{"ok/concurrent-first-enrollment", testConcurrentFirstEnrollment},
		{"ok/concurrent-revocations", testConcurrentRevocations},
	}
	for _, r := range refusals() {
		cs = append(cs, testCase{"fail/issue-" + r.name, r.run})
	}
	return cs
}

// now is a fixed time: stores keep at least milliseconds.
var now = time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)

var ctx = context.Background()

// Token ids of the fixture.
const (
	tokGood     = "goodgoodgood"
	tokSpent    = "spentspentsp"
	tokExpired  = "expiredexpir"
	tokDisabled = "disableddisa"
)

func tok(id string, maxUses int) registry.Token {
	h := sha256.Sum256([]byte("secret-" + id))
	return registry.Token{ID: id, Hash: h[:], Prefix: "dev-", MaxUses: maxUses, ExpiresAt: now.Add(time.Hour),
		Labels: map[string]string{"line": "3"}, CreatedAt: now, CreatedBy: "test"}
}

// record is an IssueRecord for a certificate serial of device dev, paid
// by token (may be ""), replacing expect (may be ""), at at.
func record(dev, serial, token, expect string, at time.Time) registry.IssueRecord {
	notAfter := at.Add(90 * 24 * time.Hour)
	return registry.IssueRecord{
		Cert: registry.Certificate{Serial: serial, DeviceID: dev, Fingerprint: "fp-" + serial, PublicKeyHash: "pk-" + serial,
			RequestHash: "rq-" + serial, TokenID: token, Issuer: "issuing", NotBefore: at.Add(-time.Minute), NotAfter: notAfter,
			DER: []byte("der-" + serial), CreatedAt: at},
		Device: registry.Device{ID: dev, Status: registry.DeviceActive, Serial: serial, Fingerprint: "fp-" + serial,
			NotAfter: notAfter, CreatedAt: at, UpdatedAt: at},
		TokenID: token, ExpectSerial: expect,
		Audit: registry.AuditEvent{At: at, Actor: "token:" + token, Action: "enroll", Subject: dev, Outcome: registry.Allowed,
			Reason: "enrolled", Serial: serial},
	}
}

func revokeEvent(subject string) registry.AuditEvent {
	return registry.AuditEvent{At: now, Actor: "admin:test", Action: "revoke", Subject: subject, Outcome: registry.Allowed, Reason: "keyCompromise"}
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

func getToken(t *testing.T, s registry.Store, id string) registry.Token {
	t.Helper()
	tk, err := s.GetToken(ctx, id)
	must(t, err)
	return tk
}

func getDevice(t *testing.T, s registry.Store, id string) registry.Device {
	t.Helper()
	d, err := s.GetDevice(ctx, id)
	must(t, err)
	return d
}

func getCert(t *testing.T, s registry.Store, serial string) registry.Certificate {
	t.Helper()
	c, err := s.GetCertificate(ctx, serial)
	must(t, err)
	return c
}

func allAudit(t *testing.T, s registry.Store) []registry.AuditEvent {
	t.Helper()
	evs, err := s.ListAudit(ctx, registry.AuditQuery{Limit: 1000})
	must(t, err)
	return evs
}

func issue(t *testing.T, s registry.Store, rec registry.IssueRecord) {
	t.Helper()
	if err := s.RecordIssue(ctx, rec); err != nil {
		t.Fatalf("RecordIssue(%s, %s): %v", rec.Device.ID, rec.Cert.Serial, err)
	}
}

// state is everything a store holds, as far as the API shows it.
type state struct {
	Tokens   []registry.Token
	Devices  []registry.Device
	Certs    map[string][]registry.Certificate
	Revoked  []registry.Certificate
	Audit    []registry.AuditEvent
	NotFound map[string]bool
}

// snapshot reads the whole store, plus the devices and serials named
// (which may not exist yet).
func snapshot(t *testing.T, s registry.Store, devices, serials []string) state {
	t.Helper()
	var st state
	var err error
	st.Tokens, err = s.ListTokens(ctx)
	must(t, err)
	st.Devices, err = s.ListDevices(ctx, registry.ListOptions{Limit: 1000})
	must(t, err)
	st.Certs = map[string][]registry.Certificate{}
	for _, d := range st.Devices {
		devices = append(devices, d.ID)
	}
	for _, id := range devices {
		st.Certs[id], err = s.ListCertificates(ctx, id)
		must(t, err)
	}
	st.Revoked, err = s.RevocationsSince(ctx, 0, 1000)
	must(t, err)
	st.Audit = allAudit(t, s)
	st.NotFound = map[string]bool{}
	for _, serial := range serials {
		_, err := s.GetCertificate(ctx, serial)
		st.NotFound[serial] = errors.Is(err, registry.ErrNotFound)
	}
	return st
}

func unchanged(t *testing.T, before, after state) {
	t.Helper()
	if !reflect.DeepEqual(before, after) {
		t.Fatalf("a refused write changed the store:\nbefore %+v\nafter  %+v", before, after)
	}
}

func testTokenCreateGet(t *testing.T, s registry.Store) {
	tk := tok(tokGood, 3)
	tk.RequireTPM, tk.AllowReprovision, tk.Uses = true, true, 1
	must(t, s.CreateToken(ctx, tk))
	got := getToken(t, s, tk.ID)
	if !reflect.DeepEqual(got, tk) {
		t.Fatalf("token round trip:\n got %+v\nwant %+v", got, tk)
	}
}

func testTokenList(t *testing.T, s registry.Store) {
	list, err := s.ListTokens(ctx)
	must(t, err)
	if len(list) != 0 {
		t.Fatalf("empty store lists %d tokens", len(list))
	}
	b, a := tok("bbbbbbbbbbbb", 1), tok("aaaaaaaaaaaa", 2)
	a.CreatedAt = now.Add(time.Second)
	must(t, s.CreateToken(ctx, b))
	must(t, s.CreateToken(ctx, a))
	list, err = s.ListTokens(ctx)
	must(t, err)
	if len(list) != 2 || list[0].ID != b.ID || list[1].ID != a.ID || list[1].MaxUses != 2 {
		t.Fatalf("ListTokens = %+v, want bbbb then aaaa (creation order)", list)
	}
}

func testTokenDisable(t *testing.T, s registry.Store) {
	must(t, s.CreateToken(ctx, tok(tokGood, 3)))
	ev := registry.AuditEvent{At: now, Actor: "admin:test", Action: "token.disable", Subject: tokGood, Outcome: registry.Allowed}
	must(t, s.DisableToken(ctx, tokGood, ev))
	if !getToken(t, s, tokGood).Disabled {
		t.Fatal("token not disabled")
	}
	evs := allAudit(t, s)
	if len(evs) != 1 || evs[0].Action != "token.disable" || evs[0].Subject != tokGood {
		t.Fatalf("audit after DisableToken = %+v", evs)
	}
	must(t, s.DisableToken(ctx, tokGood, ev)) // again: not an error
	if !getToken(t, s, tokGood).Disabled {
		t.Fatal("token enabled by a second DisableToken")
	}
}

func testTokenDuplicate(t *testing.T, s registry.Store) {
	tk := tok(tokGood, 3)
	must(t, s.CreateToken(ctx, tk))
	other := tok(tokGood, 9)
	other.Prefix = "other-"
	wantErr(t, s.CreateToken(ctx, other), registry.ErrExists)
	if got := getToken(t, s, tokGood); got.MaxUses != 3 || got.Prefix != "dev-" {
		t.Fatalf("duplicate CreateToken changed the token: %+v", got)
	}
}

func testTokenNotFound(t *testing.T, s registry.Store) {
	_, err := s.GetToken(ctx, "nonexistent1")
	wantErr(t, err, registry.ErrNotFound)
	wantErr(t, s.DisableToken(ctx, "nonexistent1", registry.AuditEvent{At: now, Action: "token.disable"}), registry.ErrNotFound)
	if evs := allAudit(t, s); len(evs) != 0 {
		t.Fatalf("refused DisableToken wrote audit events: %+v", evs)
	}
}

func testIssue(t *testing.T, s registry.Store) {
	must(t, s.CreateToken(ctx, tok(tokGood, 2)))
	rec := record("dev-1", "01", tokGood, "", now)
	rec.Device.TPMBound, rec.Device.EKHash, rec.Cert.TPMBound = true, []byte{1, 2, 3}, true
	rec.Device.Labels = map[string]string{"site": "berlin", "line": "3"}
	must(t, s.RecordIssue(ctx, rec))

	if d := getDevice(t, s, "dev-1"); !reflect.DeepEqual(d, rec.Device) {
		t.Fatalf("device:\n got %+v\nwant %+v", d, rec.Device)
	}
	if c := getCert(t, s, "01"); !reflect.DeepEqual(c, rec.Cert) || c.Revoked() {
		t.Fatalf("certificate:\n got %+v\nwant %+v", c, rec.Cert)
	}
	if tk := getToken(t, s, tokGood); tk.Uses != 1 {
		t.Fatalf("token uses = %d, want 1", tk.Uses)
	}
	evs := allAudit(t, s)
	if len(evs) != 1 || evs[0].Seq <= 0 {
		t.Fatalf("audit = %+v", evs)
	}
	want := rec.Audit
	want.Seq = evs[0].Seq
	if !reflect.DeepEqual(evs[0], want) {
		t.Fatalf("audit event:\n got %+v\nwant %+v", evs[0], want)
	}
	certs, err := s.ListCertificates(ctx, "dev-1")
	must(t, err)
	if len(certs) != 1 || certs[0].Serial != "01" {
		t.Fatalf("ListCertificates = %+v", certs)
	}
}

func testIssueRenewal(t *testing.T, s registry.Store) {
	must(t, s.CreateToken(ctx, tok(tokGood, 1)))
	issue(t, s, record("dev-1", "01", tokGood, "", now))
	// A renewal: no token, the device's CreatedAt is kept, the previous
	// certificate is left alone.
	later := now.Add(time.Hour)
	ren := record("dev-1", "02", "", "01", later)
	ren.Device.Labels = map[string]string{"renewed": "yes"}
	issue(t, s, ren)
	d := getDevice(t, s, "dev-1")
	if d.Serial != "02" || !d.CreatedAt.Equal(now) || !d.UpdatedAt.Equal(later) || d.Labels["renewed"] != "yes" {
		t.Fatalf("after renewal: %+v", d)
	}
	if c := getCert(t, s, "01"); c.Revoked() {
		t.Fatal("a renewal without RevokePrevious revoked the previous certificate")
	}
	if tk := getToken(t, s, tokGood); tk.Uses != 1 {
		t.Fatalf("a renewal spent a token use: uses = %d", tk.Uses)
	}
	certs, err := s.ListCertificates(ctx, "dev-1")
	must(t, err)
	if len(certs) != 2 || certs[0].Serial != "01" || certs[1].Serial != "02" {
		t.Fatalf("ListCertificates = %+v, want 01 then 02", certs)
	}
}

// testIssueJudgedAtCreatedAt: the token is judged at Cert.CreatedAt, not
// at the store's clock.
func testIssueJudgedAtCreatedAt(t *testing.T, s registry.Store) {
	tk := tok(tokGood, 5)
	tk.ExpiresAt = now.Add(-time.Hour) // long expired by the wall clock of any test run after 2026
	must(t, s.CreateToken(ctx, tk))
	issue(t, s, record("dev-1", "01", tokGood, "", now.Add(-2*time.Hour)))
	wantErr(t, s.RecordIssue(ctx, record("dev-2", "02", tokGood, "", now.Add(-time.Hour))), registry.ErrTokenExpired)
}

func testReprovision(t *testing.T, s registry.Store) {
	must(t, s.CreateToken(ctx, tok(tokGood, 5)))
	issue(t, s, record("dev-1", "01", tokGood, "", now))
	at := now.Add(time.Minute)
	rec := record("dev-1", "02", tokGood, "01", at)
	rec.RevokePrevious = true
	issue(t, s, rec)
	old := getCert(t, s, "01")
	if !old.Revoked() || old.RevocationReason != 4 || old.RevocationSeq != 1 || !old.RevokedAt.Equal(at) {
		t.Fatalf("previous certificate = %+v, want revoked (superseded, seq 1) at %v", old, at)
	}
	if c := getCert(t, s, "02"); c.Revoked() {
		t.Fatal("new certificate revoked")
	}
	if d := getDevice(t, s, "dev-1"); d.Serial != "02" || d.Status != registry.DeviceActive || !d.CreatedAt.Equal(now) {
		t.Fatalf("device = %+v", d)
	}
	if tk := getToken(t, s, tokGood); tk.Uses != 2 {
		t.Fatalf("uses = %d, want 2", tk.Uses)
	}
	revs, err := s.RevocationsSince(ctx, 0, 10)
	must(t, err)
	if len(revs) != 1 || revs[0].Serial != "01" || revs[0].RevocationSeq != 1 {
		t.Fatalf("RevocationsSince = %+v", revs)
	}
}

func testNotFound(t *testing.T, s registry.Store) {
	_, err := s.GetDevice(ctx, "dev-ghost")
	wantErr(t, err, registry.ErrNotFound)
	_, err = s.GetCertificate(ctx, "ff")
	wantErr(t, err, registry.ErrNotFound)
	_, err = s.RevokeDevice(ctx, "dev-ghost", 1, now, revokeEvent("dev-ghost"))
	wantErr(t, err, registry.ErrNotFound)
	_, err = s.RevokeCertificate(ctx, "ff", 1, now, revokeEvent("ff"))
	wantErr(t, err, registry.ErrNotFound)
	_, err = s.GetToken(ctx, "nonexistent1")
	wantErr(t, err, registry.ErrNotFound)
	certs, err := s.ListCertificates(ctx, "dev-ghost")
	must(t, err)
	if len(certs) != 0 {
		t.Fatalf("ListCertificates of an unknown device = %+v", certs)
	}
	if evs := allAudit(t, s); len(evs) != 0 {
		t.Fatalf("refused revocations wrote audit events: %+v", evs)
	}
}

// refusal is one RecordIssue the fixture store must refuse, changing
// nothing.
type refusal struct {
	name string
	run  func(t *testing.T, s registry.Store)
}

// issueFixture: tokens good (5 uses, 2 spent), spent, expired, disabled;
// device dev-1 with 01, dev-r revoked (0r).
func issueFixture(t *testing.T, s registry.Store) {
	t.Helper()
	spent := tok(tokSpent, 1)
	spent.Uses = 1
	expired := tok(tokExpired, 5)
	expired.ExpiresAt = now // expired at exactly now: ExpiresAt is the first instant it is invalid
	disabled := tok(tokDisabled, 5)
	disabled.Disabled = true
	for _, tk := range []registry.Token{tok(tokGood, 5), spent, expired, disabled} {
		must(t, s.CreateToken(ctx, tk))
	}
	issue(t, s, record("dev-1", "01", tokGood, "", now))
	issue(t, s, record("dev-r", "0r", tokGood, "", now))
	_, err := s.RevokeDevice(ctx, "dev-r", 1, now, revokeEvent("dev-r"))
	must(t, err)
}

func refusals() []refusal {
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	reprovisionRevoked := record("dev-r", "02", tokGood, "0r", now)
	reprovisionRevoked.RevokePrevious = true
	stale := record("dev-1", "02", tokGood, "00", now)
	stale.RevokePrevious = true
	mismatch := record("dev-3", "03", tokGood, "", now)
	mismatch.Device.Serial = "99"
	type tc struct {
		name string
		ctx  context.Context
		rec  registry.IssueRecord
		want error // nil: any error
	}
	tcs := []tc{
		{"token-spent", ctx, record("dev-2", "02", tokSpent, "", now), registry.ErrTokenSpent},
		{"token-expired", ctx, record("dev-2", "02", tokExpired, "", now), registry.ErrTokenExpired},
		{"token-expired-later", ctx, record("dev-2", "02", tokExpired, "", now.Add(time.Hour)), registry.ErrTokenExpired},
		{"token-disabled", ctx, record("dev-2", "02", tokDisabled, "", now), registry.ErrTokenDisabled},
		{"token-unknown", ctx, record("dev-2", "02", "unknownunkno", "", now), registry.ErrNotFound},
		{"stale-serial", ctx, stale, registry.ErrConflict},
		{"exists-but-expected-new", ctx, record("dev-1", "02", tokGood, "", now), registry.ErrConflict},
		{"new-but-expected-existing", ctx, record("dev-9", "02", tokGood, "01", now), registry.ErrConflict},
		{"revoked-device", ctx, record("dev-r", "02", tokGood, "0r", now), registry.ErrConflict},
		{"revoked-device-renewal", ctx, record("dev-r", "02", "", "0r", now), registry.ErrConflict},
		{"revoked-device-reprovision", ctx, reprovisionRevoked, registry.ErrConflict},
		{"duplicate-serial", ctx, record("dev-3", "01", tokGood, "", now), registry.ErrExists},
		{"duplicate-serial-renewal", ctx, record("dev-1", "0r", "", "01", now), registry.ErrExists},
		{"invalid-record", ctx, mismatch, nil},
		{"cancelled-context", cancelled, record("dev-3", "03", tokGood, "", now), context.Canceled},
	}
	var out []refusal
	for _, c := range tcs {
		out = append(out, refusal{c.name, func(t *testing.T, s registry.Store) {
			issueFixture(t, s)
			devices := []string{c.rec.Device.ID}
			serials := []string{c.rec.Cert.Serial, c.rec.ExpectSerial}
			before := snapshot(t, s, devices, serials)
			err := s.RecordIssue(c.ctx, c.rec)
			if c.want == nil && err == nil {
				t.Fatal("RecordIssue succeeded, want an error")
			}
			if c.want != nil {
				wantErr(t, err, c.want)
			}
			unchanged(t, before, snapshot(t, s, devices, serials))
			if tk, err := s.GetToken(ctx, tokGood); err != nil || tk.Uses != 2 {
				t.Fatalf("token %s: uses %d, %v; want 2 (unchanged)", tokGood, tk.Uses, err)
			}
		}})
	}
	return out
}

// issueN records n certificates for devices dev-000..., one each, paid by
// tokGood (which must have the uses), at now.
func issueN(t *testing.T, s registry.Store, n int) {
	t.Helper()
	for i := range n {
		issue(t, s, record(fmt.Sprintf("dev-%03d", i), fmt.Sprintf("%04x", i+1), tokGood, "", now))
	}
}

func testRevokeDevice(t *testing.T, s registry.Store) {
	must(t, s.CreateToken(ctx, tok(tokGood, 10)))
	issue(t, s, record("dev-1", "01", tokGood, "", now))
	issue(t, s, record("dev-1", "02", "", "01", now.Add(time.Second)))
	issue(t, s, record("dev-2", "03", tokGood, "", now))
	auditBefore := len(allAudit(t, s))

	at := now.Add(time.Hour)
	got, err := s.RevokeDevice(ctx, "dev-1", 1, at, revokeEvent("dev-1"))
	must(t, err)
	if len(got) != 2 || got[0].Serial != "01" || got[1].Serial != "02" {
		t.Fatalf("RevokeDevice = %+v, want 01 and 02, oldest first", got)
	}
	for i, c := range got {
		if c.RevocationSeq != int64(i+1) || c.RevocationReason != 1 || !c.RevokedAt.Equal(at) || !c.Revoked() {
			t.Fatalf("revoked certificate %d = %+v", i, c)
		}
		if stored := getCert(t, s, c.Serial); !reflect.DeepEqual(stored, c) {
			t.Fatalf("RevokeDevice returned %+v, store has %+v", c, stored)
		}
	}
	d := getDevice(t, s, "dev-1")
	if d.Status != registry.DeviceRevoked || !d.UpdatedAt.Equal(at) || !d.CreatedAt.Equal(now) {
		t.Fatalf("device after RevokeDevice = %+v", d)
	}
	if c := getCert(t, s, "03"); c.Revoked() || getDevice(t, s, "dev-2").Status != registry.DeviceActive {
		t.Fatal("RevokeDevice touched another device")
	}
	evs := allAudit(t, s)
	if len(evs) != auditBefore+1 || evs[len(evs)-1].Action != "revoke" || evs[len(evs)-1].Subject != "dev-1" {
		t.Fatalf("audit after RevokeDevice = %+v", evs)
	}
	revoked, err := s.ListDevices(ctx, registry.ListOptions{Status: registry.DeviceRevoked})
	must(t, err)
	if len(revoked) != 1 || revoked[0].ID != "dev-1" {
		t.Fatalf("revoked devices = %+v", revoked)
	}
}

func testRevokeDeviceIdempotent(t *testing.T, s registry.Store) {
	must(t, s.CreateToken(ctx, tok(tokGood, 10)))
	issue(t, s, record("dev-1", "01", tokGood, "", now))
	_, err := s.RevokeDevice(ctx, "dev-1", 1, now, revokeEvent("dev-1"))
	must(t, err)
	before := snapshot(t, s, nil, nil)
	again, err := s.RevokeDevice(ctx, "dev-1", 5, now.Add(time.Hour), revokeEvent("dev-1"))
	must(t, err)
	if len(again) != 0 {
		t.Fatalf("revoking a revoked device revoked %+v", again)
	}
	unchanged(t, before, snapshot(t, s, nil, nil))
}

func testRevokeCertificate(t *testing.T, s registry.Store) {
	must(t, s.CreateToken(ctx, tok(tokGood, 10)))
	issue(t, s, record("dev-1", "01", tokGood, "", now))
	issue(t, s, record("dev-2", "02", tokGood, "", now))
	at := now.Add(time.Minute)
	c, err := s.RevokeCertificate(ctx, "01", 5, at, revokeEvent("dev-1"))
	must(t, err)
	if c.Serial != "01" || c.RevocationSeq != 1 || c.RevocationReason != 5 || !c.RevokedAt.Equal(at) {
		t.Fatalf("RevokeCertificate = %+v", c)
	}
	if stored := getCert(t, s, "01"); !reflect.DeepEqual(stored, c) {
		t.Fatalf("RevokeCertificate returned %+v, store has %+v", c, stored)
	}
	if d := getDevice(t, s, "dev-1"); d.Status != registry.DeviceActive {
		t.Fatalf("RevokeCertificate changed the device: %+v", d)
	}
	if evs := allAudit(t, s); evs[len(evs)-1].Action != "revoke" {
		t.Fatalf("no audit event for RevokeCertificate: %+v", evs)
	}
	// Again: nothing changes, the first revocation is returned.
	before := snapshot(t, s, nil, nil)
	c2, err := s.RevokeCertificate(ctx, "01", 1, now.Add(time.Hour), revokeEvent("dev-1"))
	must(t, err)
	if !reflect.DeepEqual(c2, c) {
		t.Fatalf("second RevokeCertificate = %+v, want %+v", c2, c)
	}
	unchanged(t, before, snapshot(t, s, nil, nil))
	// The next one gets the next number.
	c3, err := s.RevokeCertificate(ctx, "02", 1, at, revokeEvent("dev-2"))
	must(t, err)
	if c3.RevocationSeq != 2 {
		t.Fatalf("second revocation has sequence %d, want 2", c3.RevocationSeq)
	}
}

func testRevokeZeroTime(t *testing.T, s registry.Store) {
	must(t, s.CreateToken(ctx, tok(tokGood, 10)))
	issue(t, s, record("dev-1", "01", tokGood, "", now))
	before := snapshot(t, s, nil, nil)
	if _, err := s.RevokeCertificate(ctx, "01", 1, time.Time{}, revokeEvent("dev-1")); err == nil {
		t.Fatal("RevokeCertificate with a zero time succeeded (a zero RevokedAt reads as not revoked)")
	}
	if _, err := s.RevokeDevice(ctx, "dev-1", 1, time.Time{}, revokeEvent("dev-1")); err == nil {
		t.Fatal("RevokeDevice with a zero time succeeded")
	}
	unchanged(t, before, snapshot(t, s, nil, nil))
}

func testRevocationsSince(t *testing.T, s registry.Store) {
	must(t, s.CreateToken(ctx, tok(tokGood, 100)))
	revs, err := s.RevocationsSince(ctx, 0, 10)
	must(t, err)
	if len(revs) != 0 {
		t.Fatalf("RevocationsSince on no revocations = %+v", revs)
	}
	const n = 7
	issueN(t, s, n)
	for i := range n {
		_, err := s.RevokeCertificate(ctx, fmt.Sprintf("%04x", n-i), 1, now, revokeEvent("x")) // in reverse serial order
		must(t, err)
	}
	var all []registry.Certificate
	cursor := int64(0)
	for page := 0; ; page++ {
		revs, err := s.RevocationsSince(ctx, cursor, 3)
		must(t, err)
		if len(revs) > 3 {
			t.Fatalf("page %d has %d revocations, limit 3", page, len(revs))
		}
		if len(revs) == 0 {
			break
		}
		all = append(all, revs...)
		cursor = revs[len(revs)-1].RevocationSeq
		if page > n {
			t.Fatal("the cursor does not advance")
		}
	}
	if len(all) != n {
		t.Fatalf("followed the feed to %d revocations, want %d", len(all), n)
	}
	for i, c := range all {
		if c.RevocationSeq != int64(i+1) || c.Serial != fmt.Sprintf("%04x", n-i) || !c.Revoked() {
			t.Fatalf("revocation %d = %+v", i, c)
		}
	}
	// Limit 0 is the default page (100), more than there are.
	revs, err = s.RevocationsSince(ctx, 2, 0)
	must(t, err)
	if len(revs) != n-2 || revs[0].RevocationSeq != 3 {
		t.Fatalf("RevocationsSince(2, 0) = %d revocations from %+v", len(revs), revs)
	}
}

func testRevokedUnexpired(t *testing.T, s registry.Store) {
	must(t, s.CreateToken(ctx, tok(tokGood, 10)))
	short := record("dev-0", "01", tokGood, "", now)
	short.Cert.NotAfter, short.Device.NotAfter = now.Add(time.Hour), now.Add(time.Hour)
	issue(t, s, short)
	issue(t, s, record("dev-1", "02", tokGood, "", now))
	issue(t, s, record("dev-2", "03", tokGood, "", now)) // not revoked
	for _, serial := range []string{"01", "02"} {
		_, err := s.RevokeCertificate(ctx, serial, 1, now, revokeEvent(serial))
		must(t, err)
	}
	crl, err := s.RevokedUnexpired(ctx, now)
	must(t, err)
	if len(crl) != 2 || crl[0].Serial != "01" || crl[1].Serial != "02" {
		t.Fatalf("RevokedUnexpired(now) = %+v, want 01, 02", crl)
	}
	// At NotAfter the certificate has expired: it leaves the CRL.
	crl, err = s.RevokedUnexpired(ctx, now.Add(time.Hour))
	must(t, err)
	if len(crl) != 1 || crl[0].Serial != "02" || !crl[0].Revoked() {
		t.Fatalf("RevokedUnexpired(now+1h) = %+v, want 02 only", crl)
	}
}

func testListDevices(t *testing.T, s registry.Store) {
	must(t, s.CreateToken(ctx, tok(tokGood, 200)))
	devs, err := s.ListDevices(ctx, registry.ListOptions{})
	must(t, err)
	if len(devs) != 0 {
		t.Fatalf("ListDevices on an empty store = %+v", devs)
	}
	const n = 105
	issueN(t, s, n)
	for _, id := range []string{"dev-003", "dev-004", "dev-050"} {
		_, err := s.RevokeDevice(ctx, id, 1, now, revokeEvent(id))
		must(t, err)
	}
	// Pages of 40 in id order.
	var all []registry.Device
	after := ""
	for {
		p, err := s.ListDevices(ctx, registry.ListOptions{After: after, Limit: 40})
		must(t, err)
		if len(p) > 40 {
			t.Fatalf("page of %d devices, limit 40", len(p))
		}
		if len(p) == 0 {
			break
		}
		all = append(all, p...)
		after = p[len(p)-1].ID
	}
	if len(all) != n {
		t.Fatalf("paged through %d devices, want %d", len(all), n)
	}
	for i, d := range all {
		if d.ID != fmt.Sprintf("dev-%03d", i) {
			t.Fatalf("device %d is %q, want id order", i, d.ID)
		}
	}
	def, err := s.ListDevices(ctx, registry.ListOptions{})
	must(t, err)
	if len(def) != 100 {
		t.Fatalf("Limit 0 gave %d devices, want the default 100", len(def))
	}
	rev, err := s.ListDevices(ctx, registry.ListOptions{Status: registry.DeviceRevoked})
	must(t, err)
	if len(rev) != 3 || rev[0].ID != "dev-003" || rev[1].ID != "dev-004" || rev[2].ID != "dev-050" {
		t.Fatalf("revoked devices = %+v", rev)
	}
	rev, err = s.ListDevices(ctx, registry.ListOptions{Status: registry.DeviceRevoked, After: "dev-003", Limit: 1})
	must(t, err)
	if len(rev) != 1 || rev[0].ID != "dev-004" {
		t.Fatalf("revoked devices after dev-03, limit 1 = %+v", rev)
	}
	act, err := s.ListDevices(ctx, registry.ListOptions{Status: registry.DeviceActive, After: "dev-002", Limit: 2})
	must(t, err)
	if len(act) != 2 || act[0].ID != "dev-005" || act[1].ID != "dev-006" {
		t.Fatalf("active devices after dev-002, limit 2 = %+v, want dev-005, dev-006", act)
	}
}

func testListAudit(t *testing.T, s registry.Store) {
	must(t, s.CreateToken(ctx, tok(tokGood, 100)))
	issueN(t, s, 7)
	_, err := s.RevokeDevice(ctx, "dev-003", 1, now, revokeEvent("dev-003"))
	must(t, err)
	all := allAudit(t, s)
	if len(all) != 8 {
		t.Fatalf("audit has %d events, want 8", len(all))
	}
	for i := 1; i < len(all); i++ {
		if all[i].Seq <= all[i-1].Seq {
			t.Fatalf("audit not in increasing Seq order: %+v", all)
		}
	}
	// Pages of 3 by cursor.
	var paged []registry.AuditEvent
	for after := int64(0); ; {
		p, err := s.ListAudit(ctx, registry.AuditQuery{AfterSeq: after, Limit: 3})
		must(t, err)
		if len(p) > 3 {
			t.Fatalf("page of %d events, limit 3", len(p))
		}
		if len(p) == 0 {
			break
		}
		paged = append(paged, p...)
		after = p[len(p)-1].Seq
	}
	if !reflect.DeepEqual(paged, all) {
		t.Fatalf("paging gave %+v, want %+v", paged, all)
	}
	one, err := s.ListAudit(ctx, registry.AuditQuery{Subject: "dev-003"})
	must(t, err)
	if len(one) != 2 || one[0].Action != "enroll" || one[1].Action != "revoke" {
		t.Fatalf("audit for dev-003 = %+v", one)
	}
	last, err := s.ListAudit(ctx, registry.AuditQuery{Subject: "dev-003", AfterSeq: one[0].Seq})
	must(t, err)
	if len(last) != 1 || last[0].Seq != one[1].Seq {
		t.Fatalf("audit for dev-003 after %d = %+v", one[0].Seq, last)
	}
	none, err := s.ListAudit(ctx, registry.AuditQuery{Subject: "nobody"})
	must(t, err)
	if len(none) != 0 {
		t.Fatalf("audit for an unknown subject = %+v", none)
	}
}

func testAuditRoundTrip(t *testing.T, s registry.Store) {
	ev := registry.AuditEvent{Seq: 999, At: now, Actor: "device:dev-9", Action: "reenroll", Subject: "dev-9", Outcome: registry.Refused,
		Reason: "not-current: certificate 01 is no longer current", RemoteAddr: "192.0.2.1:4433", Serial: "01"}
	must(t, s.Audit(ctx, ev))
	must(t, s.Audit(ctx, ev))
	evs, err := s.ListAudit(ctx, registry.AuditQuery{Subject: "dev-9"})
	must(t, err)
	if len(evs) != 2 || evs[0].Seq == 999 || evs[1].Seq <= evs[0].Seq {
		t.Fatalf("Seq must be assigned by the store, increasing: %+v", evs)
	}
	want := ev
	want.Seq = evs[0].Seq
	if !reflect.DeepEqual(evs[0], want) {
		t.Fatalf("audit event:\n got %+v\nwant %+v", evs[0], want)
	}
}

// testTimesUTC: times given in another zone come back equal, in UTC, to
// the millisecond.
func testTimesUTC(t *testing.T, s registry.Store) {
	zone := time.FixedZone("UTC+5:30", 5*3600+1800)
	at := time.Date(2026, 11, 26, 17, 31, 2, 345_000_000, zone) // milliseconds set
	tk := tok(tokGood, 5)
	tk.CreatedAt, tk.ExpiresAt = at, at.Add(time.Hour)
	must(t, s.CreateToken(ctx, tk))
	issue(t, s, record("dev-1", "01", tokGood, "", at))
	_, err := s.RevokeCertificate(ctx, "01", 1, at.Add(time.Second), revokeEvent("dev-1"))
	must(t, err)

	gt := getToken(t, s, tokGood)
	d := getDevice(t, s, "dev-1")
	c := getCert(t, s, "01")
	ev := allAudit(t, s)[0]
	for _, x := range []struct {
		name      string
		got, want time.Time
	}{
		{"Token.CreatedAt", gt.CreatedAt, at},
		{"Token.ExpiresAt", gt.ExpiresAt, at.Add(time.Hour)},
		{"Device.CreatedAt", d.CreatedAt, at},
		{"Device.UpdatedAt", d.UpdatedAt, at},
		{"Device.NotAfter", d.NotAfter, at.Add(90 * 24 * time.Hour)},
		{"Certificate.NotBefore", c.NotBefore, at.Add(-time.Minute)},
		{"Certificate.NotAfter", c.NotAfter, at.Add(90 * 24 * time.Hour)},
		{"Certificate.CreatedAt", c.CreatedAt, at},
		{"Certificate.RevokedAt", c.RevokedAt, at.Add(time.Second)},
		{"AuditEvent.At", ev.At, at},
	} {
		if !x.got.Equal(x.want) || x.got.Location() != time.UTC {
			t.Errorf("%s = %v, want %v in UTC", x.name, x.got, x.want.UTC())
		}
	}
}

// testCopies: what a store returns is the caller's to change, and what
// the caller passed in is not kept either.
func testCopies(t *testing.T, s registry.Store) {
	tk := tok(tokGood, 5)
	must(t, s.CreateToken(ctx, tk))
	tk.Hash[0] ^= 0xff
	tk.Labels["line"] = "changed"
	rec := record("dev-1", "01", tokGood, "", now)
	rec.Device.EKHash = []byte{1, 2, 3}
	rec.Device.Labels = map[string]string{"k": "v"}
	issue(t, s, rec)
	rec.Device.EKHash[0], rec.Device.Labels["k"], rec.Cert.DER[0] = 9, "changed", 'X'

	for range 2 { // read, scribble over the result, read again
		gt := getToken(t, s, tokGood)
		want := sha256.Sum256([]byte("secret-" + tokGood))
		if string(gt.Hash) != string(want[:]) || gt.Labels["line"] != "3" {
			t.Fatalf("token changed through a caller's slice or map: %+v", gt)
		}
		gt.Hash[0] ^= 0xff
		gt.Labels["line"] = "scribbled"
		d := getDevice(t, s, "dev-1")
		if string(d.EKHash) != "\x01\x02\x03" || d.Labels["k"] != "v" {
			t.Fatalf("device changed through a caller's slice or map: %+v", d)
		}
		d.EKHash[0], d.Labels["k"] = 7, "scribbled"
		c := getCert(t, s, "01")
		if string(c.DER) != "der-01" {
			t.Fatalf("certificate changed through a caller's slice: %q", c.DER)
		}
		c.DER[0] = 'Y'
		list, err := s.ListCertificates(ctx, "dev-1")
		must(t, err)
		list[0].DER[0] = 'Z'
		devs, err := s.ListDevices(ctx, registry.ListOptions{})
		must(t, err)
		devs[0].Labels["k"] = "scribbled"
	}
}

// testConcurrentSpend: many enrollments race for one token's five uses.
func testConcurrentSpend(t *testing.T, s registry.Store) {
	must(t, s.CreateToken(ctx, tok(tokGood, 5)))
	const n = 32
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			errs[i] = s.RecordIssue(ctx, record(fmt.Sprintf("dev-%02d", i), fmt.Sprintf("%04x", i+1), tokGood, "", now))
		})
	}
	wg.Wait()
	ok := 0
	for i, err := range errs {
		switch {
		case err == nil:
			ok++
		case errors.Is(err, registry.ErrTokenSpent):
		default:
			t.Errorf("RecordIssue %d: %v, want success or ErrTokenSpent", i, err)
		}
	}
	certs := 0
	for i := range n {
		if _, err := s.GetCertificate(ctx, fmt.Sprintf("%04x", i+1)); err == nil {
			certs++
		}
	}
	devs, err := s.ListDevices(ctx, registry.ListOptions{Limit: 1000})
	must(t, err)
	evs := allAudit(t, s)
	if tk := getToken(t, s, tokGood); ok != 5 || tk.Uses != 5 || certs != 5 || len(devs) != 5 || len(evs) != 5 {
		t.Fatalf("%d succeeded, uses %d, %d certificates, %d devices, %d audit events; want 5 each", ok, tk.Uses, certs, len(devs), len(evs))
	}
}

// testConcurrentFirstEnrollment: several first enrollments of one id at
// once (each expecting no device) — exactly one wins, the others get
// ErrConflict and spend nothing.
func testConcurrentFirstEnrollment(t *testing.T, s registry.Store) {
	must(t, s.CreateToken(ctx, tok(tokGood, 100)))
	const n = 8
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { errs[i] = s.RecordIssue(ctx, record("dev-1", fmt.Sprintf("%04x", i+1), tokGood, "", now)) })
	}
	wg.Wait()
	ok, winner := 0, ""
	for i, err := range errs {
		switch {
		case err == nil:
			ok++
			winner = fmt.Sprintf("%04x", i+1)
		case errors.Is(err, registry.ErrConflict):
		default:
			t.Errorf("RecordIssue %d: %v, want success or ErrConflict", i, err)
		}
	}
	certs, err := s.ListCertificates(ctx, "dev-1")
	must(t, err)
	if tk := getToken(t, s, tokGood); ok != 1 || tk.Uses != 1 || len(certs) != 1 || certs[0].Serial != winner || getDevice(t, s, "dev-1").Serial != winner {
		t.Fatalf("%d succeeded, uses %d, certificates %+v; want one winner", ok, tk.Uses, certs)
	}
}

// testConcurrentRevocations: numbers are 1..N, no gaps, no repeats, and
// the feed returns them in order.
func testConcurrentRevocations(t *testing.T, s registry.Store) {
	must(t, s.CreateToken(ctx, tok(tokGood, 100)))
	const n = 16
	issueN(t, s, n)
	got := make([][]registry.Certificate, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			var err error
			id := fmt.Sprintf("dev-%03d", i)
			if got[i], err = s.RevokeDevice(ctx, id, 1, now, revokeEvent(id)); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	seen := map[int64]string{}
	for i, certs := range got {
		if len(certs) != 1 {
			t.Fatalf("RevokeDevice %d revoked %d certificates, want 1", i, len(certs))
		}
		if prev, dup := seen[certs[0].RevocationSeq]; dup {
			t.Fatalf("sequence %d given to %s and %s", certs[0].RevocationSeq, prev, certs[0].Serial)
		}
		seen[certs[0].RevocationSeq] = certs[0].Serial
	}
	revs, err := s.RevocationsSince(ctx, 0, 1000)
	must(t, err)
	if len(revs) != n {
		t.Fatalf("%d revocations, want %d", len(revs), n)
	}
	for i, c := range revs {
		if c.RevocationSeq != int64(i+1) || seen[c.RevocationSeq] != c.Serial {
			t.Fatalf("revocation %d = %s with sequence %d; want sequence %d as RevokeDevice returned", i, c.Serial, c.RevocationSeq, i+1)
		}
	}
}

func testEKAllowlist(t *testing.T, s registry.Store) {
	ctx := context.Background()
	h1, h2 := bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 32)
	now := time.Now().UTC().Truncate(time.Microsecond)
	must(t, s.AddEKs(ctx, []registry.EKEntry{{Hash: h1, Label: "line 3", AddedAt: now, AddedBy: "admin"}, {Hash: h2, AddedAt: now.Add(time.Second)}},
		registry.AuditEvent{At: now, Actor: "admin", Action: "ek-add", Subject: "2 EKs", Outcome: registry.Allowed}))
	// Adding again keeps the first entry and is not an error.
	must(t, s.AddEKs(ctx, []registry.EKEntry{{Hash: h1, Label: "relabelled", AddedAt: now.Add(time.Hour)}}, registry.AuditEvent{At: now, Action: "ek-add", Outcome: registry.Allowed}))
	for _, h := range [][]byte{h1, h2} {
		if ok, err := s.HasEK(ctx, h); err != nil || !ok {
			t.Fatalf("HasEK(%x): %v %v", h[:2], ok, err)
		}
	}
	if ok, _ := s.HasEK(ctx, bytes.Repeat([]byte{3}, 32)); ok {
		t.Fatal("an EK never added is on the allowlist")
	}
	list, err := s.ListEKs(ctx)
	if err != nil || len(list) != 2 || list[0].Label != "line 3" || !bytes.Equal(list[1].Hash, h2) || !list[0].AddedAt.Equal(now) {
		t.Fatalf("ListEKs: %+v %v", list, err)
	}
	must(t, s.RemoveEK(ctx, h1, registry.AuditEvent{At: now, Action: "ek-remove", Outcome: registry.Allowed}))
	if ok, _ := s.HasEK(ctx, h1); ok {
		t.Fatal("a removed EK is still on the allowlist")
	}
	wantErr(t, s.RemoveEK(ctx, h1, registry.AuditEvent{At: now}), registry.ErrNotFound)
	if err := s.AddEKs(ctx, []registry.EKEntry{{Hash: []byte{1, 2, 3}}}, registry.AuditEvent{At: now}); err == nil {
		t.Fatal("a 3-byte EK hash was accepted")
	}
}
