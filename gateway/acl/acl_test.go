package acl

import (
	"strings"
	"testing"

	"fleetkey.dev/certs/identity"
)

var (
	devA  = identity.ID{TrustDomain: "t", Role: identity.RoleDevice, Name: "dev-a"}
	svc   = identity.ID{TrustDomain: "t", Role: identity.RoleService, Name: "ingest"}
	admin = identity.ID{TrustDomain: "t", Role: identity.RoleAdmin, Name: "ops"}
	gw    = identity.ID{TrustDomain: "t", Role: identity.RoleGateway, Name: "gw"}
)

func TestCheck(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name  string
		who   identity.ID
		topic string
		write bool
		ok    bool
	}{
		{"ok/device-kex-req", devA, "devices/dev-a/kex/req", true, true},
		{"ok/device-up", devA, "devices/dev-a/up/telemetry", true, true},
		{"ok/device-sub-resp", devA, "devices/dev-a/kex/resp", false, true},
		{"ok/device-sub-hint", devA, "devices/dev-a/kex/hint", false, true},
		{"ok/device-sub-down", devA, "devices/dev-a/down/+", false, true},
		{"ok/device-sub-down-one", devA, "devices/dev-a/down/cmd", false, true},
		{"fail/device-other-up", devA, "devices/dev-b/up/telemetry", true, false},
		{"fail/device-other-down", devA, "devices/dev-b/down/+", false, false},
		{"fail/device-all-devices", devA, "devices/#", false, false},
		{"fail/device-plus-id", devA, "devices/+/down/+", false, false},
		{"fail/device-hash", devA, "#", false, false},
		{"fail/device-own-hash", devA, "devices/dev-a/#", false, false},
		{"fail/device-pub-resp", devA, "devices/dev-a/kex/resp", true, false},
		{"fail/device-pub-down", devA, "devices/dev-a/down/cmd", true, false},
		{"fail/device-sub-up", devA, "devices/dev-a/up/+", false, false},
		{"fail/device-pub-telemetry", devA, "fleet/telemetry/dev-a/x", true, false},
		{"fail/device-sys", devA, "$SYS/#", false, false},
		{"fail/device-share", devA, "$share/g/devices/dev-a/down/+", false, false},
		{"fail/device-wildcard-publish", devA, "devices/dev-a/up/+", true, false},
		{"fail/device-extra-level", devA, "devices/dev-a/up/x/y", true, false},
		{"fail/device-empty-channel", devA, "devices/dev-a/up/", true, false},
		{"fail/device-prefix-trick", devA, "devices/dev-a2/up/x", true, false},
		{"ok/service-telemetry", svc, "fleet/telemetry/#", false, true},
		{"ok/service-telemetry-narrow", svc, "fleet/telemetry/+/temp", false, true},
		{"ok/service-share", svc, "$share/workers/fleet/telemetry/#", false, true},
		{"ok/service-deliver", svc, "fleet/telemetry/dev-a/temp", false, true},
		{"ok/service-command", svc, "fleet/commands/dev-a/reboot", true, true},
		{"fail/service-command-wildcard", svc, "fleet/commands/+/reboot", true, false},
		{"fail/service-command-bad-id", svc, "fleet/commands/$x/reboot", true, false},
		{"fail/service-hash", svc, "#", false, false},
		{"fail/service-devices", svc, "devices/#", false, false},
		{"fail/service-device-down", svc, "devices/dev-a/down/cmd", true, false},
		{"fail/service-sys", svc, "$SYS/#", false, false},
		{"fail/service-share-sys", svc, "$share/g/$SYS/#", false, false},
		{"fail/service-hash-middle", svc, "fleet/telemetry/#/x", false, false},
		{"ok/admin-sys", admin, "$SYS/#", false, true},
		{"ok/admin-telemetry", admin, "fleet/telemetry/#", false, true},
		{"fail/admin-share-sys", admin, "$share/g/$SYS/#", false, false},
		{"fail/admin-devices", admin, "devices/#", false, false},
		{"fail/gateway", gw, "fleet/telemetry/#", false, false},
		{"fail/nul", svc, "fleet/telemetry/a\x00b", false, false},
		{"fail/long", svc, "fleet/telemetry/" + strings.Repeat("a", 600), false, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := Check(c.who, c.topic, c.write)
			if d.Allowed != c.ok {
				t.Fatalf("Check(%s, %q, write=%v) = %+v", c.who, c.topic, c.write, d)
			}
			if !d.Allowed && d.Reason == "" {
				t.Fatal("a refusal without a reason")
			}
		})
	}
}

// FuzzCheck: whatever the topic, a device is never allowed anything outside
// devices/<its id>/, nothing with a wildcard is publishable, and no
// non-admin reads $SYS.
func FuzzCheck(f *testing.F) {
	for _, s := range []string{"devices/dev-a/up/x", "devices/dev-a/down/+", "#", "$share/g/fleet/telemetry/#", "$SYS/#", "fleet/commands/a/b", "devices/dev-a/kex/req"} {
		f.Add(s, true)
		f.Add(s, false)
	}
	f.Fuzz(func(t *testing.T, topic string, write bool) {
		for _, who := range []identity.ID{devA, svc, admin, gw} {
			d := Check(who, topic, write)
			if !d.Allowed {
				continue
			}
			if who.Role == identity.RoleGateway {
				t.Fatalf("gateway allowed %q", topic)
			}
			if write && strings.ContainsAny(topic, "+#") {
				t.Fatalf("%s may publish to wildcard %q", who.Role, topic)
			}
			if who.Role == identity.RoleDevice && !strings.HasPrefix(topic, "devices/dev-a/") {
				t.Fatalf("device allowed %q", topic)
			}
			if who.Role != identity.RoleAdmin && strings.Contains(topic, "$SYS") {
				t.Fatalf("%s allowed %q", who.Role, topic)
			}
		}
	})
}

func TestLevels4(t *testing.T) {
	for topic, want := range map[string]int{"a": 1, "a/b": 2, "a/b/c/d": 4, "a/b/c/d/e": 5, "": 1, "a//b/": 4, "/": 2} {
		if _, n := levels4(topic); n != want {
			t.Errorf("%q: %d levels, want %d", topic, n, want)
		}
	}
	if l, _ := levels4("devices/d-1/up/temp"); l != [4]string{"devices", "d-1", "up", "temp"} {
		t.Errorf("levels %q", l)
	}
	if allocs := testing.AllocsPerRun(100, func() { _, _ = levels4("devices/d-1/up/temp") }); allocs != 0 {
		t.Errorf("%v allocations", allocs)
	}
}
